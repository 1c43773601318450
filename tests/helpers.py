"""Helpers shared by the tests. Nothing here loads data at import time."""

from __future__ import annotations

from functools import lru_cache

from fedsms.data import DatasetSplits, load_dataset
from fedsms_flower.local_grid import LocalGrid, partitions

__all__ = ["LocalGrid", "digits", "partitions"]


@lru_cache(maxsize=1)
def digits() -> DatasetSplits:
    """The embedded digits data, loaded once per test process on first use."""
    return load_dataset("digits")
