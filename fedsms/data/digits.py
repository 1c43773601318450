"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download.

The images are read straight from the CSV file scikit-learn ships
(``sklearn/datasets/data/digits.csv.gz``) without importing scikit-learn, whose import
takes about 2 s: a Flower SuperNode starts a fresh ClientApp process for every message, so
that import would be paid per message. Where the file is not found (another packaging of
scikit-learn) ``sklearn.datasets.load_digits`` reads it.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fedsms.data.arrays import ArrayData

TEST_FRACTION = 0.2
SPLIT_SEED = 1234  # fixed, so every run and every client sees the same test set
SHAPE = (1797, 65)  # 64 pixels and the label per row


def _bundled_csv() -> Path | None:
    """The digits file inside the installed scikit-learn, located without importing it."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as ``load_digits`` gives them."""
    path = _bundled_csv()
    if path is not None:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        if data.shape == SHAPE:
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout of scikit-learn's files

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_arrays() -> tuple[ArrayData, ArrayData]:
    """(train, test): a fixed stratification-free 80/20 split of the 1,797 images."""
    images, target = digits_images()
    images = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)  # pixel range 0..16
    labels = torch.from_numpy(target).long()
    data = ArrayData(images.contiguous(), labels)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(data)))
    return data.subset(order[n_test:]), data.subset(order[:n_test])
