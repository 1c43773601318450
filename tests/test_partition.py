"""Partitioners: every index exactly once, sizes, determinism, skew, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsms import FedSMSError
from fedsms.data.partition import dirichlet_partition, iid_partition, partition, shard_partition


def balanced_labels(n_per_class: int = 100, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def assert_exact_cover(parts: list[torch.Tensor], n: int) -> None:
    for p in parts:
        assert p.dtype == torch.int64 and p.ndim == 1
        assert torch.equal(p, p.sort().values)
    flat = torch.cat(parts)
    assert len(flat) == n
    assert torch.equal(flat.sort().values, torch.arange(n))


def mean_label_entropy(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> float:
    entropies = []
    for p in parts:
        counts = torch.bincount(labels[p], minlength=num_classes).double()
        q = counts[counts > 0] / counts.sum()
        entropies.append(float(-(q * q.log()).sum()))
    return float(np.mean(entropies))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- iid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(1, 1), (10, 10), (103, 7), (1000, 1), (1797, 30)])
def test_iid_covers_every_index_once_with_near_equal_sizes(n, k):
    parts = iid_partition(n, k, seed=0)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_seeded():
    assert same(iid_partition(500, 8, seed=3), iid_partition(500, 8, seed=3))
    assert not same(iid_partition(500, 8, seed=3), iid_partition(500, 8, seed=4))
    # shuffled, not contiguous blocks
    assert not torch.equal(iid_partition(500, 8, seed=3)[0], torch.arange(63))


# --- dirichlet --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("k", [2, 10, 25])
def test_dirichlet_covers_every_index_once(alpha, k):
    labels = balanced_labels()
    parts = dirichlet_partition(labels, k, alpha, seed=1)
    assert len(parts) == k
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


SEEDS = range(8)  # properties hold for every seed here, not for what one seed happens to draw


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_near_iid():
    labels = balanced_labels()
    for seed in SEEDS:
        iid = mean_label_entropy(labels, iid_partition(len(labels), 10, seed=seed), 10)
        skewed = mean_label_entropy(labels, dirichlet_partition(labels, 10, 0.1, seed=seed), 10)
        mild = mean_label_entropy(labels, dirichlet_partition(labels, 10, 1000.0, seed=seed), 10)
        assert skewed < 0.6 * iid, seed
        assert mild > 0.95 * iid, seed
        assert iid > 0.95 * np.log(10), seed


def test_dirichlet_respects_min_size():
    labels = balanced_labels()
    unconstrained = [min(len(p) for p in dirichlet_partition(labels, 10, 0.1, seed=s, min_size=0)) for s in SEEDS]
    assert min(unconstrained) < 30  # at alpha 0.1 small partitions happen: min_size has work to do
    for seed in SEEDS:
        parts = dirichlet_partition(labels, 10, 0.1, seed=seed, min_size=30)
        assert_exact_cover(parts, len(labels))
        assert min(len(p) for p in parts) >= 30, seed
        assert mean_label_entropy(labels, parts, 10) < 0.6 * np.log(10), seed  # still skewed
    # min_size 0 allows empty partitions, and they come back as empty int64 tensors
    empty = 0
    for seed in SEEDS:
        parts0 = dirichlet_partition(labels, 100, 0.01, seed=seed, min_size=0)
        assert_exact_cover(parts0, len(labels))
        empty += sum(len(p) == 0 for p in parts0)
    assert empty > 0


def test_dirichlet_is_seeded():
    labels = balanced_labels()
    assert same(dirichlet_partition(labels, 10, 0.3, seed=7), dirichlet_partition(labels, 10, 0.3, seed=7))
    assert not same(dirichlet_partition(labels, 10, 0.3, seed=7), dirichlet_partition(labels, 10, 0.3, seed=8))


def test_dirichlet_handles_uneven_and_sparse_class_ids():
    labels = torch.tensor([3] * 50 + [7] * 5 + [42] * 20)
    parts = dirichlet_partition(labels, 4, 0.5, seed=0)
    assert_exact_cover(parts, 75)


def test_dirichlet_impossible_request_names_the_fix():
    labels = balanced_labels(10)  # 100 examples
    with pytest.raises(FedSMSError, match="larger alpha"):
        dirichlet_partition(labels, 50, 0.01, seed=0, min_size=2)
    with pytest.raises(FedSMSError, match="min_size"):
        dirichlet_partition(labels, 50, 0.5, seed=0, min_size=3)
    with pytest.raises(FedSMSError, match="alpha must be positive"):
        dirichlet_partition(labels, 5, 0.0, seed=0)


# --- shards -------------------------------------------------------------------------------------


def test_shards_give_each_partition_few_classes():
    labels = balanced_labels()  # 10 classes x 100
    parts = shard_partition(labels, 50, 2, seed=0)  # 100 shards of 10, each a single class
    assert_exact_cover(parts, 1000)
    assert {len(p) for p in parts} == {20}
    for p in parts:
        assert len(labels[p].unique()) <= 2
    assert mean_label_entropy(labels, parts, 10) < 0.3 * np.log(10)


def test_shards_uneven_sizes_and_seed():
    labels = balanced_labels(37, 7)  # 259 examples
    parts = shard_partition(labels, 6, 3, seed=1)
    assert_exact_cover(parts, 259)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 3  # shards differ by at most one example
    assert same(parts, shard_partition(labels, 6, 3, seed=1))
    assert not same(parts, shard_partition(labels, 6, 3, seed=2))
    for p in parts:
        assert len(labels[p].unique()) <= 3 + 2  # a shard can straddle one class boundary


# --- dispatcher and errors ----------------------------------------------------------------------


def test_partition_dispatches():
    labels = balanced_labels()
    assert same(partition(labels, "iid", 5, seed=2), iid_partition(1000, 5, seed=2))
    assert same(partition(labels, "dirichlet", 5, seed=2, alpha=0.2), dirichlet_partition(labels, 5, 0.2, seed=2))
    assert same(partition(labels, "shards", 5, seed=2, shards_per_partition=3), shard_partition(labels, 5, 3, seed=2))
    # the defaults the client relies on
    assert same(partition(labels, "dirichlet", 5, seed=2), dirichlet_partition(labels, 5, 0.5, seed=2))
    assert same(partition(labels, "shards", 5, seed=2), shard_partition(labels, 5, 2, seed=2))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_single_partition_is_everything(scheme):
    labels = balanced_labels(5)
    (only,) = partition(labels, scheme, 1, seed=0)
    assert torch.equal(only, torch.arange(50))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="noniid", num_partitions=2), "iid, dirichlet, shards"),
        (dict(scheme="iid", num_partitions=0), "between 1 and 30"),
        (dict(scheme="iid", num_partitions=31), "between 1 and 30"),
        (dict(scheme="dirichlet", num_partitions=31), "between 1 and 30"),
        (dict(scheme="shards", num_partitions=0), "between 1 and 30"),
        (dict(scheme="dirichlet", num_partitions=3, alpha=0.0), "positive"),
        (dict(scheme="dirichlet", num_partitions=3, alpha=-1.0), "positive"),
        (dict(scheme="shards", num_partitions=4, shards_per_partition=8), "between 1 and 7"),
        (dict(scheme="shards", num_partitions=4, shards_per_partition=0), "between 1 and 7"),
        (dict(scheme="iid", num_partitions=2.5), "whole number"),
    ],
)
def test_bad_arguments_raise_fedsms_error(kwargs, match):
    labels = balanced_labels(3)  # 30 examples
    with pytest.raises(FedSMSError, match=match):
        partition(labels, seed=0, **kwargs)


def test_labels_must_be_one_dimensional():
    with pytest.raises(FedSMSError, match="1-D"):
        partition(torch.zeros(4, 2, dtype=torch.long), "dirichlet", 2, seed=0)
