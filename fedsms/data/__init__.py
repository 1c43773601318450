"""Data sets (digits embedded, MNIST-1D generated; torchvision sets from ``--data-dir``), partitioners, and
``make_splits`` for a user's own image arrays."""

from __future__ import annotations

from pathlib import Path

import torch

from fedsms import FedSMSError
from fedsms.data.arrays import (
    ArrayData,
    Augmentation,
    DataSource,
    batches,
    count_examples,
    is_image,
    iterate_batches,
    num_batches,
    prepare_inputs,
    to_float,
)
from fedsms.data.mnist1d import ZERO_LEVEL as MNIST1D_ZERO_LEVEL
from fedsms.data.splits import DatasetSplits, channel_stats, split_heldout

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "mnist", "fashion-mnist")

_AUGMENTATION = {
    "digits": Augmentation(crop_padding=1),
    # Random shifts along the signal (the 1-D analogue of random crops) by up to 10 % of its
    # 40 samples, padded with the level of a zero signal (see fedsms.data.mnist1d).
    "mnist1d": Augmentation(crop_padding=4, fill=MNIST1D_ZERO_LEVEL),
    "mnist": Augmentation(crop_padding=2),
    "fashion-mnist": Augmentation(crop_padding=2, flip=True),
    "cifar10": Augmentation(crop_padding=4, flip=True),
    "cifar100": Augmentation(crop_padding=4, flip=True),
}


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
) -> DatasetSplits:
    """Load ``name`` split into train / held-out (``heldout_fraction`` of train, seeded) / test.

    Parameters
    ----------
    name : str
        One of ``DATASETS``, or ``mnist1d-N`` for N generated MNIST-1D samples.
    data_dir : str or Path, optional
        Where the data set's files are; needed for the torchvision sets (for MNIST-1D,
        optional).
    heldout_fraction : float, optional
        Fraction of the training data held out (default 0.1).
    seed : int, optional
        Seed of the held-out split (default 0).
    download : bool, optional
        Whether a torchvision set missing from ``data_dir`` is downloaded (default True).

    Returns
    -------
    DatasetSplits
        The train, held-out and test splits with the set's augmentation (see ``make_splits``).

    Raises
    ------
    FedSMSError
        An unknown ``name``, or a torchvision set without ``data_dir``.
    """
    family = "mnist1d" if name.startswith("mnist1d") else name  # mnist1d-N: N generated samples
    if name == "digits":
        from fedsms.data.digits import load_digits_arrays

        train_all, test = load_digits_arrays()
        num_classes = 10
    elif family == "mnist1d":
        from fedsms.data.mnist1d import load_mnist1d_arrays

        train_all, test = load_mnist1d_arrays(name, Path(data_dir) if data_dir else None)
        num_classes = 10
    elif name in DATASETS:
        from fedsms.data.vision import load_vision_arrays

        if data_dir is None:
            raise FedSMSError(f"data set {name!r} needs --data-dir pointing at its files (see the README)")
        train_all, test, num_classes = load_vision_arrays(name, Path(data_dir), download=download)
    else:
        raise FedSMSError(f"unknown data set {name!r}; use one of {', '.join(DATASETS)} (or mnist1d-N for N samples)")
    return make_splits(
        name,
        train_all,
        test,
        num_classes=num_classes,
        augmentation=_AUGMENTATION[family],
        heldout_fraction=heldout_fraction,
        seed=seed,
    )


def make_splits(
    name: str,
    train: ArrayData,
    test: ArrayData,
    *,
    num_classes: int | None = None,
    augmentation: Augmentation | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplits:
    """Turn a user's own arrays into the splits the built-in trainer, the server's central
    evaluation and norm recalibration use (the same rule as :func:`load_dataset`).

    Any inputs work: images (N, C, H, W), tabular features (N, F), token ids (N, L), any
    (N, ...) tensor; and any targets: integer class labels (give ``num_classes``), float
    values or multi-dimensional targets (leave ``num_classes`` out, and score them with a
    ``fedsms.task.Task`` such as ``REGRESSION``).

    Parameters
    ----------
    name : str
        A name for the data set (recorded in results).
    train : ArrayData
        All training inputs (images: ``uint8`` in 0..255 or floating in [0, 1]) and their
        targets. A seeded ``heldout_fraction`` of it becomes the held-out split.
    test : ArrayData
        The test inputs, of the same per-example shape as ``train``; never used for
        training or for choosing between candidates.
    num_classes : int, optional
        For class labels: the number of classes, every label an integer in
        ``[0, num_classes)``. None (default): the targets are values, kept as they are.
    augmentation : Augmentation, optional
        What "augment on" means for these images, e.g. ``Augmentation(crop_padding=2,
        flip=True)`` (default: ``Augmentation()``, none); images only.
    heldout_fraction : float, optional
        Fraction of ``train`` held out, in [0, 1) (default 0.1).
    seed : int, optional
        Seed of the held-out split (default 0).

    Returns
    -------
    DatasetSplits
        Train, held-out and test data with the per-example input shape; for images also the
        per-channel mean and std of all of ``train`` (computed before the split, so they do
        not depend on the seed), None for other inputs.

    Raises
    ------
    FedSMSError
        If a split is not an ``ArrayData``, train and test differ in per-example shape, a
        class label is out of range, or augmentation is asked of inputs that are not images.

    Examples
    --------
    >>> import torch
    >>> images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    >>> labels = torch.arange(50) % 2
    >>> splits = make_splits("mine", ArrayData(images, labels), ArrayData(images[:10], labels[:10]), num_classes=2)
    >>> len(splits.train), len(splits.heldout), splits.input_shape
    (45, 5, (3, 8, 8))
    >>> table = make_splits("rows", ArrayData(torch.randn(40, 10), torch.randn(40)), ArrayData(torch.randn(8, 10), torch.randn(8)))
    >>> table.input_shape, table.num_classes, table.mean
    ((10,), 0, None)
    """
    for part, data in (("train", train), ("test", test)):
        if not isinstance(data, ArrayData):
            raise FedSMSError(
                f"make_splits needs {part} as an ArrayData(inputs, targets), but got {type(data).__name__}"
            )
        if num_classes is not None:
            _check_labels(part, data.labels, num_classes)
    if num_classes is not None:
        train, test = (ArrayData(d.images, d.labels.long()) for d in (train, test))  # what cross-entropy takes
    if train.images.shape[1:] != test.images.shape[1:]:
        raise FedSMSError(
            f"train inputs are {tuple(train.images.shape[1:])} per example but test inputs are "
            f"{tuple(test.images.shape[1:])}; give both the same shape"
        )
    images = train.is_image and test.is_image
    if augmentation is not None and (augmentation.crop_padding or augmentation.flip) and not images:
        raise FedSMSError(
            f"augmentation translates and flips images (N, C, H, W), but the inputs are "
            f"{tuple(train.images.shape[1:])} per example; leave augmentation out for other inputs"
        )
    train_part, heldout = split_heldout(train, heldout_fraction, seed)
    mean, std = channel_stats(train) if images else (None, None)  # before the seeded split: same for every seed
    return DatasetSplits(
        name=name,
        num_classes=num_classes or 0,
        input_shape=tuple(train.images.shape[1:]),
        mean=mean,
        std=std,
        augmentation=augmentation or Augmentation(),
        train=train_part,
        heldout=heldout,
        test=test,
    )


def _check_labels(part: str, labels: torch.Tensor, num_classes: int) -> None:
    integer = labels.ndim == 1 and not labels.dtype.is_floating_point and labels.dtype != torch.bool
    if not integer or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes):
        raise FedSMSError(
            f"the {part} labels must be integer class indices in [0, {num_classes}); check num_classes and the "
            "labels, or leave num_classes out for value targets"
        )


__all__ = [
    "ArrayData",
    "Augmentation",
    "DATASETS",
    "DataSource",
    "DatasetSplits",
    "batches",
    "count_examples",
    "is_image",
    "iterate_batches",
    "load_dataset",
    "make_splits",
    "num_batches",
    "prepare_inputs",
    "split_heldout",
    "to_float",
]
