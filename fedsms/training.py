"""Masked retraining of one candidate: fresh SGD, a learning-rate schedule, mask after every step."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.data.arrays import ArrayData, Augmentation, batches, num_batches
from fedsms.masks import Mask, MaskEnforcer
from fedsms.recipe import CandidateConfig

ProgressFn = Callable[[int, int, float], None]  # (epoch, epochs, mean loss of the epoch)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedSMSError(f"device {name!r} was asked for but CUDA is not available; pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FedSMSError(f"unknown device {name!r}; pass auto, cpu or cuda[:N]") from None


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_optimizer(model: nn.Module, config: CandidateConfig) -> torch.optim.SGD:
    # Nesterov only with weight decay, as in the paper's retraining recipe.
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, nesterov=config.weight_decay > 0 and config.momentum > 0,
    )


def _autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, fp16 with a scaler otherwise)."""
    if device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def train_candidate(
    model: nn.Module,
    mask: Mask,
    data: ArrayData,
    config: CandidateConfig,
    *,
    augmentation: Augmentation | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Retrain ``model`` in place under ``mask`` (pruned weights stay exactly zero).

    Returns train loss/accuracy of the last epoch, step and example counts and seconds.
    """
    device = torch.device(device)
    model.to(device).train()
    enforcer = MaskEnforcer(model, mask)
    enforcer.apply()
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout and any other in-model randomness
    augment = augmentation if config.augment else None
    # A last batch of a few examples gives a noisy step and noisy norm statistics: drop it.
    drop_last = len(data) > config.batch_size
    steps_per_epoch = num_batches(len(data), config.batch_size, drop_last)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total_steps)
    autocast, scaler = _autocast(device)
    step, examples, started = 0, 0, time.perf_counter()
    for epoch in range(config.epochs):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for x, y in batches(data, config.batch_size, shuffle=True, generator=generator, augment=augment,
                            drop_last=drop_last, device=device):
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
            enforcer.apply()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
        examples += seen
        epoch_loss = float(loss_sum) / seen
        if not math.isfinite(epoch_loss):
            raise FedSMSError(
                f"training diverged (loss {epoch_loss}) in epoch {epoch + 1} with lr={config.lr}; lower the learning rate"
            )
        if progress is not None:
            progress(epoch + 1, config.epochs, epoch_loss)
    return {
        "train_loss": epoch_loss,
        "train_accuracy": float(correct) / seen,
        "steps": step,
        "examples": examples,
        "num_examples": len(data),
        "seconds": time.perf_counter() - started,
    }
