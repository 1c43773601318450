"""Masked retraining of one candidate: fresh SGD, a learning-rate schedule, mask after every step.

The mask is kept by :func:`fedsms.masks.enforce_mask` (an optimizer step post-hook), the
same rule a user's own training loop attaches through the client toolkit. The data may be
any :data:`fedsms.data.arrays.DataSource`; the loss is pluggable (classification
cross-entropy with the candidate's label smoothing by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.data.arrays import Augmentation, DataSource, count_batches, count_examples, iterate_batches, resident
from fedsms.masks import Mask, enforce_mask
from fedsms.recipe import CandidateConfig
from fedsms.schema import PRECISIONS

ProgressFn = Callable[[int, int, float], None]  # (epoch, epochs, mean loss of the epoch)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, labels) -> mean loss


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a ``device`` setting names.

    Parameters
    ----------
    name : str, default "auto"
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``, or any other name ``torch.device`` accepts.

    Returns
    -------
    torch.device
        The device; its availability is checked for CUDA only.

    Raises
    ------
    FedSMSError
        If CUDA is asked for but not available, or ``torch.device`` does not know the name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedSMSError(f"device {name!r} was asked for but CUDA is not available; pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FedSMSError(f"unknown device {name!r}; pass auto, cpu or cuda[:N]") from None


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    A linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps,
    then a linear or cosine decay towards 0 at ``total_steps``.

    Parameters
    ----------
    step : int
        The optimizer step, 0-based.
    total_steps : int
        Steps of the whole retraining.
    schedule : str
        ``"constant"`` (always 1, no warm-up), ``"linear"`` or ``"cosine"`` (any other
        value is treated as cosine).
    warmup_steps : int
        Steps of the warm-up, >= 0.

    Returns
    -------
    float
        The factor, in [0, 1].
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_optimizer(model: nn.Module, config: CandidateConfig) -> torch.optim.SGD:
    """A fresh SGD optimizer over all of ``model``'s parameters, as ``config`` describes.

    Parameters
    ----------
    model : torch.nn.Module
        The model to optimise.
    config : CandidateConfig
        Its ``lr``, ``momentum`` and ``weight_decay`` are used; Nesterov momentum is on when
        both weight decay and momentum are positive.

    Returns
    -------
    torch.optim.SGD
        The optimizer; the learning rate is later set per step by ``train_candidate``.
    """
    # Nesterov only with weight decay, as in the paper's retraining recipe.
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.weight_decay > 0 and config.momentum > 0,
    )


def autocast_for(device: torch.device, precision: str = "auto"):
    """(autocast context, gradient scaler or None) of a ``precision`` setting on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the model runs.
    precision : str, default "auto"
        ``auto``: mixed precision on CUDA (bf16 where supported, fp16 with a loss scaler
        otherwise), fp32 elsewhere; ``fp32``: none; ``bf16``: bf16 autocast on any device.

    Returns
    -------
    tuple
        A context manager to run the forward pass and the loss in, and a
        ``torch.amp.GradScaler`` (fp16 only) or None.

    Raises
    ------
    FedSMSError
        If ``precision`` is not one of ``fedsms.schema.PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise FedSMSError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext(), None
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def uses_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` has a 2-D convolution, the layer the channels-last layout speeds up."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def train_candidate(
    model: nn.Module,
    mask: Mask,
    data: DataSource,
    config: CandidateConfig,
    *,
    augmentation: Augmentation | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    loss_fn: LossFn | None = None,
    precision: str = "auto",
    channels_last: bool = False,
) -> dict[str, float]:
    """Retrain ``model`` in place under ``mask`` (pruned weights stay exactly zero).

    On a CUDA device an ``ArrayData`` that fits is moved there once and batched there
    (:func:`fedsms.data.arrays.resident`); no step waits on the host.

    Parameters
    ----------
    model : torch.nn.Module
        The model, trained in place.
    mask : dict of str to torch.Tensor
        The pruning mask, kept after every optimizer step.
    data : DataSource
        An ``ArrayData``, a torch ``Dataset`` of (x, y) pairs (batched by
        ``config.batch_size`` and shuffled with ``config.seed``), a ``DataLoader`` or a
        callable returning an iterable of (x, y) batches (both used as they are). Integer
        inputs stay integer; only uint8 images are scaled to [0, 1].
    config : CandidateConfig
        Learning rate and its schedule, weight decay, momentum, label smoothing, epochs,
        batch size, seed, whether to augment.
    augmentation : Augmentation, optional
        Translation/flip for image data, used when ``config.augment``; an active one on
        non-image data raises :class:`FedSMSError`.
    device : torch.device or str
        Where to train.
    progress : callable, optional
        Called as ``progress(epoch, epochs, mean loss)`` after every epoch.
    loss_fn : callable, optional
        ``loss_fn(output, labels) -> scalar loss``; by default cross-entropy with
        ``config.label_smoothing``.
    precision : str, default "auto"
        ``auto``, ``fp32`` or ``bf16`` (see :func:`autocast_for`).
    channels_last : bool, default False
        Train a model with 2-D convolutions in the channels-last memory layout (faster on
        recent GPUs); its parameters are handed back in the usual layout.

    Returns
    -------
    dict
        ``train_loss`` of the last epoch, ``train_accuracy`` (classification outputs
        only), ``steps``, ``examples`` (seen over all epochs), ``num_examples`` (in the
        data) and ``seconds``.

    Raises
    ------
    FedSMSError
        If the mask does not fit the model, there are no examples, the loss becomes NaN or
        Inf (training diverged), or an active augmentation meets non-image data.
    """
    device = torch.device(device)
    autocast, scaler = autocast_for(device, precision)
    channels_last = channels_last and uses_channels_last(model)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data = resident(data, device)
    optimizer = make_optimizer(model, config)
    hook = enforce_mask(optimizer, model, mask)  # zeroes now and after every optimizer step
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout and any other in-model randomness
    augment = augmentation if config.augment else None
    size = count_examples(data)
    # A last batch of a few examples gives a noisy step and noisy norm statistics: drop it.
    drop_last = size is not None and size > config.batch_size
    steps_per_epoch = count_batches(data, config.batch_size, drop_last)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total_steps)
    step, examples, started = 0, 0, time.perf_counter()
    classification = True
    try:
        for epoch in range(config.epochs):
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for x, y in iterate_batches(
                data,
                config.batch_size,
                shuffle=True,
                generator=generator,
                augment=augment,
                drop_last=drop_last,
                device=device,
            ):
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total_steps, config.lr_schedule, warmup)
                with autocast:
                    logits = model(x)
                    loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                loss_sum += loss.detach() * len(y)
                classification = classification and _is_classification(logits, y)
                if classification:
                    correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                step += 1
            if seen == 0:
                raise FedSMSError("there are no examples to train on; check the data set or shard size")
            examples += seen
            epoch_loss = float(loss_sum) / seen
            if not math.isfinite(epoch_loss):
                raise FedSMSError(
                    f"training diverged (loss {epoch_loss}) in epoch {epoch + 1} with lr={config.lr}; lower the learning rate"
                )
            if progress is not None:
                progress(epoch + 1, config.epochs, epoch_loss)
    finally:
        hook.remove()
        if channels_last:
            model.to(memory_format=torch.contiguous_format)  # what state dicts, masks and the codec expect
    result = {"train_loss": epoch_loss}
    if classification:
        result["train_accuracy"] = float(correct) / seen
    return {
        **result,
        "steps": step,
        "examples": examples,
        "num_examples": size if size is not None else seen,
        "seconds": time.perf_counter() - started,
    }


def _is_classification(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """(N, classes) outputs with (N,) integer class labels."""
    return logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point() and not labels.is_complex()
