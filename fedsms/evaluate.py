"""Accuracy, loss and calibration, clean and under corruptions, for one model or an ensemble.

Everything goes through ``predict_logits``: eval mode, no gradients, batches from
``fedsms.data.arrays.batches``, logits gathered as float32 on the CPU. The prediction
ensemble averages the models' softmax probabilities; it is scored through the same
``metrics_from_logits`` by handing it ``log(mean probabilities)``, which are valid logits.

Corrupted images are drawn from a generator seeded by (seed, corruption, severity), so the
same seed (and batch size) gives the same corrupted images for every model and device.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsms import FedSMSError
from fedsms.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from fedsms.data.arrays import ArrayData, batches


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """The CPU generator whose draws corrupt the data for (seed, name, severity)."""
    mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 8 + int(severity)) % (2**63)
    return torch.Generator().manual_seed(mixed)


def predict_logits(
    model: nn.Module,
    data: ArrayData,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(N, classes) float32 CPU logits of ``model`` (already on ``device``) on ``data``,
    optionally with every batch corrupted by ``corruption = (name, severity)``. The model
    runs in eval mode without gradients; each module's train/eval mode is restored after."""
    generator = None
    if corruption is not None:
        name, severity = corruption
        check_corruption(name, severity)
        generator = corruption_generator(seed, name, severity)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for x, _ in batches(data, batch_size, device=device):
                if generator is not None:
                    x = corrupt(x, name, severity, generator)
                outputs.append(model(x).float().cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not outputs:
        raise FedSMSError("there are no examples to evaluate; check the data set or shard size")
    return torch.cat(outputs)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """accuracy, loss (mean cross-entropy) and ece: expected calibration error over
    ``num_bins`` equal-width bins of confidence (max softmax probability), bins (i/B, (i+1)/B]:
    sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|."""
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


def evaluate(model: nn.Module, data: ArrayData, batch_size: int = 512, device: torch.device | str = "cpu") -> dict[str, float]:
    """{"accuracy", "loss", "ece"} of ``model`` on ``data``."""
    return metrics_from_logits(predict_logits(model, data, batch_size, device), data.labels)


def _ood(
    logits_of: Callable[[ArrayData, tuple[str, int]], torch.Tensor],
    data: ArrayData,
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
    if max_examples is not None:
        data = data.head(max_examples)
    per_corruption: dict[str, dict[int, float]] = {}
    accuracies, eces = [], []
    for name in corruptions:
        per_corruption[name] = {}
        for severity in severities:
            metrics = metrics_from_logits(logits_of(data, (name, severity)), data.labels)
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
    data: ArrayData,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_examples: int | None = None,
) -> dict:
    """{"ood_accuracy": mean accuracy over all (corruption, severity), "ood_ece": mean ECE,
    "per_corruption": {name: {severity: accuracy}}} on the first ``max_examples`` of ``data``."""
    return _ood(
        lambda d, c: predict_logits(model, d, batch_size, device, corruption=c, seed=seed),
        data, corruptions, severities, max_examples,
    )


def ensemble_logits(
    models: Sequence[nn.Module],
    data: ArrayData,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """log of the mean softmax probabilities of ``models`` (all see the same corrupted images)."""
    if not models:
        raise FedSMSError("the prediction ensemble needs at least one model")
    log_probs = torch.stack([
        predict_logits(m, data, batch_size, device, corruption=corruption, seed=seed).log_softmax(dim=1)
        for m in models
    ])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(models))


def ensemble_metrics(
    models: Sequence[nn.Module],
    data: ArrayData,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ood: bool = False,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    max_examples: int | None = None,
) -> dict:
    """The prediction ensemble (mean of softmax probabilities): {"accuracy", "loss", "ece"}
    on clean ``data``, or with ``ood=True`` the ``evaluate_ood`` dict under corruptions."""
    if ood:
        return _ood(
            lambda d, c: ensemble_logits(models, d, batch_size, device, corruption=c, seed=seed),
            data, corruptions, severities, max_examples,
        )
    return metrics_from_logits(ensemble_logits(models, data, batch_size, device), data.labels)
