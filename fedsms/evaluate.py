"""Accuracy, loss and calibration, clean and under corruptions, for one model or an ensemble.

Everything goes through ``predict``: eval mode, no gradients, batches of any
:data:`fedsms.data.arrays.DataSource` (an ``ArrayData``, a ``Dataset``, a ``DataLoader`` or a
callable yielding (x, y) batches), outputs gathered as float32 on the CPU with their labels.
Accuracy and calibration are classification metrics ((N, classes) outputs, integer labels);
``evaluate`` takes a ``loss_fn`` for the loss of any other task. The prediction
ensemble averages the models' softmax probabilities; it is scored through the same
``metrics_from_logits`` by handing it ``log(mean probabilities)``, which are valid logits.

Corrupted images are drawn from a generator seeded by (seed, corruption, severity), so the
same seed (and batch size) gives the same corrupted images for every model and device.
Corruptions are image operations: out-of-distribution evaluation of non-image data
(tokens, tabular features) raises one sentence saying so.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsms import FedSMSError
from fedsms.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from fedsms.data.arrays import ArrayData, DataSource, is_image, iterate_batches


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """The CPU generator whose draws corrupt the data for (seed, name, severity).

    Parameters
    ----------
    seed : int
        The evaluation seed.
    name : str
        The corruption's name (see ``fedsms.corruptions.CORRUPTIONS``).
    severity : int
        The severity, 1 to 5.

    Returns
    -------
    torch.Generator
        A fresh generator; the same arguments always give the same draws.
    """
    mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 8 + int(severity)) % (2**63)
    return torch.Generator().manual_seed(mixed)


def check_ood_data(data: DataSource) -> None:
    """Raise one sentence if ``data`` is an ``ArrayData`` whose inputs are not images
    (other sources are checked batch by batch).

    Parameters
    ----------
    data : DataSource
        The data about to be corrupted.

    Raises
    ------
    FedSMSError
        If ``data`` is an ``ArrayData`` whose inputs are not images (N, C, H, W).
    """
    if isinstance(data, ArrayData) and not data.is_image:
        _not_images(data.images)


def _not_images(x: torch.Tensor) -> None:
    raise FedSMSError(
        f"OOD evaluation applies image corruptions and needs image inputs (N, C, H, W), but the inputs have "
        f"shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}; turn ood off for non-image data"
    )


def predict(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
    max_examples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels): float32 CPU outputs of ``model`` (already on ``device``) on the
    first ``max_examples`` (all by default) of ``data``, and the labels they answer, in the
    order the data gave them. With ``corruption = (name, severity)`` every batch is
    corrupted first (image data only). The model runs in eval mode without gradients;
    each module's train/eval mode is restored after.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset`` (a ``DataLoader`` keeps its own).
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws (see ``corruption_generator``).
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor)
        The outputs (float32, CPU, one row per example) and the labels (CPU, as the data
        gave them).

    Raises
    ------
    FedSMSError
        If there are no examples, the corruption or severity is unknown, or a corruption
        is asked of non-image inputs.
    """
    generator = None
    if corruption is not None:
        name, severity = corruption
        check_corruption(name, severity)
        check_ood_data(data)
        generator = corruption_generator(seed, name, severity)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    outputs, labels = [], []
    try:
        with torch.no_grad():
            for x, y in iterate_batches(data, batch_size, device=device, limit=max_examples):
                if generator is not None:
                    if not is_image(x):
                        _not_images(x)
                    x = corrupt(x, name, severity, generator)
                outputs.append(model(x).float().cpu())
                labels.append(y.cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not outputs:
        raise FedSMSError("there are no examples to evaluate; check the data set or shard size")
    return torch.cat(outputs), torch.cat(labels)


def predict_logits(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(N, classes) float32 CPU logits of ``model`` on ``data`` (see :func:`predict`).

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws.

    Returns
    -------
    torch.Tensor
        The model's outputs for every example of ``data``.

    Raises
    ------
    FedSMSError
        As :func:`predict`.
    """
    return predict(model, data, batch_size, device, corruption, seed)[0]


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """accuracy, loss (mean cross-entropy) and ece: expected calibration error over
    ``num_bins`` equal-width bins of confidence (max softmax probability), bins (i/B, (i+1)/B]:
    sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.

    Parameters
    ----------
    logits : torch.Tensor
        (N, classes) outputs (logits or log-probabilities; any float dtype).
    labels : torch.Tensor
        (N,) integer class labels.
    num_bins : int, default 15
        Number of confidence bins of the ECE.

    Returns
    -------
    dict of str to float
        ``{"accuracy", "loss", "ece"}``; accuracy and ece in [0, 1].

    Raises
    ------
    FedSMSError
        If there are no examples.
    """
    if logits.shape[0] == 0:
        raise FedSMSError("there are no examples to evaluate; check the data set or shard size")
    logits = logits.float()
    labels = labels.to(logits.device, torch.long)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    correct = (predicted == labels).float()
    bins = (confidence * num_bins).ceil().long().sub(1).clamp(0, num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).float()
    gap = torch.bincount(bins, weights=correct - confidence, minlength=num_bins)  # sum(acc - conf) per bin
    ece = gap.abs().sum() / count.sum()
    return {
        "accuracy": correct.mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "ece": ece.item(),
    }


def evaluate(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str
        Where the batches go.
    loss_fn : callable, optional
        ``loss_fn(outputs, labels) -> scalar`` over all examples; by default the mean
        cross-entropy.

    Returns
    -------
    dict
        ``{"accuracy", "loss", "ece"}`` for classification outputs ((N, classes), integer
        labels); ``{"loss"}`` alone otherwise (which needs ``loss_fn``).

    Raises
    ------
    FedSMSError
        If there are no examples, or the outputs are not classification outputs and no
        ``loss_fn`` is given.
    """
    logits, labels = predict(model, data, batch_size, device)
    if not _is_classification(logits, labels):
        if loss_fn is None:
            raise FedSMSError(
                f"accuracy needs (N, classes) outputs and (N,) integer labels, got outputs {tuple(logits.shape)} and "
                f"labels {tuple(labels.shape)} of {str(labels.dtype).removeprefix('torch.')}; pass loss_fn for other tasks"
            )
        return {"loss": float(loss_fn(logits, labels))}
    metrics = metrics_from_logits(logits, data.labels if isinstance(data, ArrayData) else labels)
    if loss_fn is not None:
        metrics["loss"] = float(loss_fn(logits, labels.to(torch.long)))
    return metrics


def _is_classification(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point() and not labels.is_complex()


def _ood(
    predict_of: Callable[[DataSource, tuple[str, int], int | None], tuple[torch.Tensor, torch.Tensor]],
    data: DataSource,
    corruptions: Iterable[str],
    severities: Iterable[int],
    max_examples: int | None,
) -> dict:
    corruptions, severities = tuple(corruptions), tuple(severities)
    if not corruptions or not severities:
        raise FedSMSError(f"OOD evaluation needs at least one corruption ({', '.join(CORRUPTIONS)}) and severity (1-5)")
    for name in corruptions:
        for severity in severities:
            check_corruption(name, severity)
    check_ood_data(data)
    if max_examples is not None and isinstance(data, ArrayData):
        data, max_examples = data.head(max_examples), None
    per_corruption: dict[str, dict[int, float]] = {}
    accuracies, eces = [], []
    for name in corruptions:
        per_corruption[name] = {}
        for severity in severities:
            logits, labels = predict_of(data, (name, severity), max_examples)
            metrics = metrics_from_logits(logits, data.labels if isinstance(data, ArrayData) else labels)
            per_corruption[name][int(severity)] = metrics["accuracy"]
            accuracies.append(metrics["accuracy"])
            eces.append(metrics["ece"])
    return {
        "ood_accuracy": sum(accuracies) / len(accuracies),
        "ood_ece": sum(eces) / len(eces),
        "per_corruption": per_corruption,
    }


def evaluate_ood(
    model: nn.Module,
    data: DataSource,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_examples: int | None = None,
) -> dict:
    """{"ood_accuracy": mean accuracy over all (corruption, severity), "ood_ece": mean ECE,
    "per_corruption": {name: {severity: accuracy}}} on the first ``max_examples`` of ``data``.

    Corruptions are image operations: data whose inputs are not images (N, C, H, W) raises
    :class:`FedSMSError` saying so.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    corruptions : sequence of str, default CORRUPTIONS
        The corruptions to apply (at least one).
    severities : sequence of int, default SEVERITIES
        The severities, each 1 to 5 (at least one).
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``; with the seed it fixes the draws.
    device : torch.device or str, default "cpu"
        Where the batches go.
    seed : int, default 0
        Seed of the corruption draws; the same seed gives every model the same images.
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.

    Returns
    -------
    dict
        ``ood_accuracy`` and ``ood_ece`` (floats) and ``per_corruption``
        (``{name: {severity: accuracy}}``).

    Raises
    ------
    FedSMSError
        If no corruption or severity is given, one is unknown, the inputs are not images,
        or there are no examples.
    """
    return _ood(
        lambda d, c, limit: predict(model, d, batch_size, device, corruption=c, seed=seed, max_examples=limit),
        data,
        corruptions,
        severities,
        max_examples,
    )


def ensemble_predict(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
    max_examples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of the mean softmax probabilities of ``models``, labels); all models see the
    same (corrupted) inputs, so ``data`` must give its examples in the same order each pass.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws (the same for every member).
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor)
        (N, classes) float32 log mean probabilities, usable as logits, and the labels.

    Raises
    ------
    FedSMSError
        If ``models`` is empty, the data gives its examples in another order for another
        member, or as :func:`predict`.
    """
    if not models:
        raise FedSMSError("the prediction ensemble needs at least one model")
    log_probs, labels = [], None
    for m in models:
        logits, these = predict(
            m, data, batch_size, device, corruption=corruption, seed=seed, max_examples=max_examples
        )
        if labels is not None and not torch.equal(labels, these):
            raise FedSMSError(
                "the data gave its examples in another order for each model; evaluate an ensemble on "
                "data without shuffling"
            )
        labels = these
        log_probs.append(logits.log_softmax(dim=1))
    return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(models)), labels


def ensemble_logits(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """log of the mean softmax probabilities of ``models`` (all see the same corrupted images).

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws.

    Returns
    -------
    torch.Tensor
        (N, classes) float32 log mean probabilities.

    Raises
    ------
    FedSMSError
        As :func:`ensemble_predict`.
    """
    return ensemble_predict(models, data, batch_size, device, corruption, seed)[0]


def ensemble_metrics(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ood: bool = False,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    max_examples: int | None = None,
) -> dict:
    """The prediction ensemble (mean of softmax probabilities): {"accuracy", "loss", "ece"}
    on clean ``data``, or with ``ood=True`` the ``evaluate_ood`` dict under corruptions.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    ood : bool, default False
        Evaluate under corruptions instead of on clean data.
    corruptions : sequence of str, default CORRUPTIONS
        The corruptions, with ``ood``.
    severities : sequence of int, default SEVERITIES
        The severities (1 to 5), with ``ood``.
    seed : int, default 0
        Seed of the corruption draws, with ``ood``.
    max_examples : int, optional
        Use only the first ``max_examples`` examples, with ``ood`` (clean evaluation uses
        all of ``data``).

    Returns
    -------
    dict
        ``{"accuracy", "loss", "ece"}``, or with ``ood`` the dict :func:`evaluate_ood` returns.

    Raises
    ------
    FedSMSError
        As :func:`ensemble_predict` and :func:`evaluate_ood`.
    """
    if ood:
        return _ood(
            lambda d, c, limit: ensemble_predict(
                models, d, batch_size, device, corruption=c, seed=seed, max_examples=limit
            ),
            data,
            corruptions,
            severities,
            max_examples,
        )
    logits, labels = ensemble_predict(models, data, batch_size, device)
    return metrics_from_logits(logits, data.labels if isinstance(data, ArrayData) else labels)
