"""Data sets (digits embedded, MNIST-1D generated; torchvision sets from ``--data-dir``) and partitioners."""

from __future__ import annotations

from pathlib import Path

from fedsms import FedSMSError
from fedsms.data.arrays import (
    ArrayData, Augmentation, DataSource, batches, count_examples, is_image, iterate_batches, num_batches,
    prepare_inputs, to_float,
)
from fedsms.data.splits import DatasetSplits, channel_stats, split_heldout

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "mnist", "fashion-mnist")

_AUGMENTATION = {
    "digits": Augmentation(crop_padding=1),
    "mnist1d": Augmentation(),  # the generator already shifts, scales and shears every signal
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
    """Load ``name`` split into train / held-out (``heldout_fraction`` of train, seeded) / test."""
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
    train, heldout = split_heldout(train_all, heldout_fraction, seed)
    mean, std = channel_stats(train_all)  # before the seeded split: same model for every seed
    c, h, w = train.images.shape[1:]
    return DatasetSplits(
        name=name, num_classes=num_classes, input_shape=(c, h, w), mean=mean, std=std,
        augmentation=_AUGMENTATION[family], train=train, heldout=heldout, test=test,
    )


__all__ = [
    "ArrayData", "Augmentation", "DATASETS", "DataSource", "DatasetSplits", "batches", "count_examples",
    "is_image", "iterate_batches", "load_dataset", "num_batches", "prepare_inputs", "split_heldout", "to_float",
]
