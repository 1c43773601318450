"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from fedsms.data.arrays import ArrayData

TEST_FRACTION = 0.2
SPLIT_SEED = 1234  # fixed, so every run and every client sees the same test set


def load_digits_arrays() -> tuple[ArrayData, ArrayData]:
    """(train, test): a fixed stratification-free 80/20 split of the 1,797 images."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # pixel range 0..16
    labels = torch.from_numpy(bunch.target).long()
    data = ArrayData(images.contiguous(), labels)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(data)))
    return data.subset(order[n_test:]), data.subset(order[:n_test])
