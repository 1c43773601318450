"""Norm-layer recalibration: averaged BatchNorm statistics do not match the averaged
weights, so after merging they are reset and re-estimated by forward passes."""

from __future__ import annotations

import torch
from torch import nn

from fedsms.data.arrays import ArrayData, batches


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norms(
    model: nn.Module,
    data: ArrayData,
    *,
    fraction: float = 0.2,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> int:
    """Reset BatchNorm running statistics and re-estimate them in train mode over a seeded
    ``fraction`` of ``data`` (cumulative average, not momentum). Returns examples used."""
    layers = norm_layers(model)
    if not layers:
        return 0
    n = max(1, int(round(fraction * len(data))))
    subset = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n])
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average over all recalibration batches
    model.to(device).train()
    for x, _ in batches(subset, batch_size, device=device):
        model(x)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
    return n
