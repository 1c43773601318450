"""A data set split into train / held-out / test, with what models and trainers need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsms import FedSMSError
from fedsms.data.arrays import ArrayData, Augmentation


@dataclass(frozen=True)
class DatasetSplits:
    """A data set's train, held-out and test splits, with what models and trainers need.

    Attributes
    ----------
    name : str
        The data set's name, e.g. ``"digits"`` or ``"cifar10"``.
    num_classes : int
        Number of classes (the model's output width); 0 for targets that are not classes.
    input_shape : tuple of int
        The shape of one input: (C, H, W) for images, (F,) for tabular features, (L,) for tokens.
    mean, std : tuple of float or None
        Per-channel mean and std of the [0, 1] training images (see :func:`channel_stats`);
        None for inputs that are not images.
    augmentation : Augmentation
        What ``augment`` means for this data (translation, flips).
    train : ArrayData
        The training examples, less the held-out ones.
    heldout : ArrayData
        A seeded slice of the training data for greedy soups and best-of-m; never the test set.
    test : ArrayData
        The test examples.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images
    mean: tuple[float, ...] | None  # per channel, of the [0, 1] training images; None for other inputs
    std: tuple[float, ...] | None
    augmentation: Augmentation  # what "augment on" means for this data
    train: ArrayData
    heldout: ArrayData  # seeded slice of the training data; never the test set
    test: ArrayData


def split_heldout(data: ArrayData, fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """(train, held-out): a seeded random ``fraction`` of ``data`` is held out.

    Parameters
    ----------
    data : ArrayData
        The training data to split.
    fraction : float
        Fraction held out, in [0, 1) (rounded to whole examples).
    seed : int
        Seed of the random split.

    Returns
    -------
    tuple of (ArrayData, ArrayData)
        The remaining training data and the held-out data, disjoint.

    Raises
    ------
    ValueError
        If ``fraction`` is outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_held = int(round(fraction * len(data)))
    return data.subset(order[n_held:]), data.subset(order[:n_held])


def channel_stats(data: ArrayData, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in chunks so no float copy of the whole set is made.

    Parameters
    ----------
    data : ArrayData
        Image data (N, C, H, W); values are read as floats in [0, 1] (``float_images``).
    chunk : int, default 4096
        Examples converted at a time.

    Returns
    -------
    tuple of (tuple of float, tuple of float)
        Per-channel mean and (population) std; std is at least 1e-6.
    """
    total = torch.zeros(data.images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(data), chunk):
        x = data.float_images(slice(start, start + chunk)).double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = len(data) * data.images.shape[2] * data.images.shape[3]
    if n == 0:
        raise FedSMSError("the data set is empty (no examples or zero-sized images); check the data files")
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
