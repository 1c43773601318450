"""A data set split into train / held-out / test, with what models and trainers need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsms.data.arrays import ArrayData, Augmentation


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of the [0, 1] training images
    std: tuple[float, ...]
    augmentation: Augmentation  # what "augment on" means for this data
    train: ArrayData
    heldout: ArrayData  # seeded slice of the training data; never the test set
    test: ArrayData


def split_heldout(data: ArrayData, fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """(train, held-out): a seeded random ``fraction`` of ``data`` is held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_held = int(round(fraction * len(data)))
    return data.subset(order[n_held:]), data.subset(order[:n_held])


def channel_stats(data: ArrayData, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in chunks so no float copy of the whole set is made."""
    total = torch.zeros(data.images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(data), chunk):
        x = data.float_images(slice(start, start + chunk)).double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = len(data) * data.images.shape[2] * data.images.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
