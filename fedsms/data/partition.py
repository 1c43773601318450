"""Seeded partitioners that split a training set across federated clients.

Each returns one sorted int64 index tensor per partition; together they use every index
exactly once, and the same arguments (seed included) always give the same partitions, so
every client can compute its own part locally without talking to the others.

- ``iid``: a random permutation cut into near-equal parts (sizes differ by at most 1).
- ``dirichlet``: label skew; for each class the share of each partition is drawn from
  Dir(alpha) (small alpha: each client sees few classes), redrawn until every partition
  has at least ``min_size`` examples.
- ``shards``: the pathological non-IID split of McMahan et al. (2017): sort by label, cut
  into ``num_partitions * shards_per_partition`` shards, deal the shards at random.

Flower's own partitioners (``flwr-datasets``) work on HuggingFace ``datasets`` objects;
our data are in-memory tensors, so we deliberately keep these small, tested ones instead
of converting back and forth.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsms import FedSMSError
from fedsms.schema import PARTITIONINGS as SCHEMES

MAX_DIRICHLET_DRAWS = 10_000


def iid_partition(n: int, num_partitions: int, seed: int) -> list[torch.Tensor]:
    """``n`` indices shuffled with ``seed`` and cut into ``num_partitions`` near-equal parts.

    Parameters
    ----------
    n : int
        Number of examples.
    num_partitions : int
        Number of parts, 1 to ``n``.
    seed : int
        Seed of the permutation.

    Returns
    -------
    list of torch.Tensor
        ``num_partitions`` sorted int64 index tensors that together hold every index once.
        Sizes differ by at most 1.

    Raises
    ------
    FedSMSError
        If ``num_partitions`` is not a whole number in [1, ``n``].
    """
    _check_count(n, num_partitions)
    order = np.random.default_rng(seed).permutation(n)
    return [_to_tensor(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: torch.Tensor, num_partitions: int, alpha: float, seed: int, min_size: int = 1
) -> list[torch.Tensor]:
    """Label-skewed partitions: class c is shared out in proportions drawn from Dir(alpha).

    The draw is repeated (at most ``MAX_DIRICHLET_DRAWS`` times) until every partition has at
    least ``min_size`` examples.

    Parameters
    ----------
    labels : torch.Tensor
        1-D class labels of the examples.
    num_partitions : int
        Number of partitions, 1 to the number of examples.
    alpha : float
        Concentration, > 0: small (e.g. 0.1) gives each partition few classes, large (e.g.
        100) is near IID.
    seed : int
        Seed of every draw.
    min_size : int, default 1
        Fewest examples a partition may get, 0 to ``n // num_partitions``.

    Returns
    -------
    list of torch.Tensor
        ``num_partitions`` sorted int64 index tensors that together hold every index once.

    Raises
    ------
    FedSMSError
        If the labels are not 1-D, ``num_partitions``, ``alpha`` or ``min_size`` is out of
        range, or no draw meets ``min_size``.
    """
    y = _labels(labels)
    n = y.size
    _check_count(n, num_partitions)
    if not alpha > 0:
        raise FedSMSError(
            f"Dirichlet alpha must be positive (got {alpha}); use e.g. 0.1 for strong skew or 100 for near-IID"
        )
    if min_size < 0 or min_size * num_partitions > n:
        raise FedSMSError(
            f"min_size {min_size} per partition is impossible with {n} examples and {num_partitions} partitions; "
            f"use a min_size between 0 and {n // num_partitions}"
        )
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(y, return_counts=True)
    # examples grouped by class (in the order of ``classes``), random order inside a class
    order = rng.permutation(n)
    by_class = order[np.argsort(y[order], kind="stable")]
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares = rng.dirichlet(np.full(num_partitions, float(alpha)), size=classes.size)  # (C, K)
        if not np.all(np.isfinite(shares)):
            continue
        # cut each class at the rounded cumulative shares: counts sum exactly to the class size
        bounds = np.rint(np.cumsum(shares, axis=1) * class_counts[:, None]).astype(np.int64)
        bounds[:, -1] = class_counts
        np.maximum.accumulate(bounds, axis=1, out=bounds)
        counts = np.diff(bounds, axis=1, prepend=0)  # (C, K), examples of class c for partition k
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise FedSMSError(
            f"no Dirichlet draw in {MAX_DIRICHLET_DRAWS} gave every one of {num_partitions} partitions at least "
            f"{min_size} examples with alpha={alpha}; use a larger alpha, fewer partitions or a smaller min_size"
        )
    owner = np.repeat(np.tile(np.arange(num_partitions), classes.size), counts.ravel())
    return _group(by_class, owner, num_partitions)


def shard_partition(
    labels: torch.Tensor, num_partitions: int, shards_per_partition: int, seed: int
) -> list[torch.Tensor]:
    """Sort by label, cut into ``num_partitions * shards_per_partition`` near-equal shards and
    give each partition ``shards_per_partition`` shards chosen at random.

    Parameters
    ----------
    labels : torch.Tensor
        1-D class labels of the examples.
    num_partitions : int
        Number of partitions, 1 to the number of examples.
    shards_per_partition : int
        Shards each partition gets, 1 to ``n // num_partitions``.
    seed : int
        Seed of the order within a label and of the dealing.

    Returns
    -------
    list of torch.Tensor
        ``num_partitions`` sorted int64 index tensors that together hold every index once.

    Raises
    ------
    FedSMSError
        If the labels are not 1-D or ``num_partitions`` or ``shards_per_partition`` is out
        of range.
    """
    y = _labels(labels)
    n = y.size
    _check_count(n, num_partitions)
    if shards_per_partition < 1 or num_partitions * shards_per_partition > n:
        raise FedSMSError(
            f"{shards_per_partition} shards per partition for {num_partitions} partitions does not fit {n} "
            f"examples; use shards_per_partition between 1 and {n // num_partitions}"
        )
    rng = np.random.default_rng(seed)
    num_shards = num_partitions * shards_per_partition
    order = rng.permutation(n)
    by_label = order[np.argsort(y[order], kind="stable")]  # random order among equal labels
    shard_of_position = np.repeat(np.arange(num_shards), [len(s) for s in np.array_split(np.arange(n), num_shards)])
    owner_of_shard = np.empty(num_shards, dtype=np.int64)
    owner_of_shard[rng.permutation(num_shards)] = np.repeat(np.arange(num_partitions), shards_per_partition)
    return _group(by_label, owner_of_shard[shard_of_position], num_partitions)


def partition(
    labels: torch.Tensor,
    scheme: str,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """Partition the examples with ``labels`` by ``scheme`` (one of ``SCHEMES``).

    Parameters
    ----------
    labels : torch.Tensor
        1-D class labels of the examples (``iid`` uses only their count).
    scheme : str
        ``"iid"``, ``"dirichlet"`` or ``"shards"``.
    num_partitions : int
        Number of partitions (clients).
    seed : int
        Seed; the same arguments always give the same partitions.
    alpha : float, default 0.5
        Dirichlet concentration (``dirichlet`` only).
    shards_per_partition : int, default 2
        Shards per partition (``shards`` only).
    min_size : int, default 1
        Fewest examples per partition (``dirichlet`` only).

    Returns
    -------
    list of torch.Tensor
        ``num_partitions`` sorted int64 index tensors that together hold every index once.

    Raises
    ------
    FedSMSError
        If ``scheme`` is unknown, or as the chosen partitioner.
    """
    if scheme == "iid":
        return iid_partition(_labels(labels).size, num_partitions, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed, min_size=min_size)
    if scheme == "shards":
        return shard_partition(labels, num_partitions, shards_per_partition, seed)
    raise FedSMSError(f"unknown partitioning scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def _labels(labels: torch.Tensor) -> np.ndarray:
    y = torch.as_tensor(labels).detach().cpu().numpy()
    if y.ndim != 1:
        raise FedSMSError(f"labels must be a 1-D tensor, got shape {tuple(y.shape)}; pass data.labels")
    return y


def _check_count(n: int, num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or int(num_partitions) != num_partitions:
        raise FedSMSError(f"the number of partitions must be a whole number, got {num_partitions!r}")
    if not 1 <= num_partitions <= n:
        raise FedSMSError(
            f"cannot split {n} examples into {num_partitions} partitions; use between 1 and {n} partitions"
        )


def _group(positions: np.ndarray, owner: np.ndarray, num_partitions: int) -> list[torch.Tensor]:
    """Indices ``positions[i]`` grouped by ``owner[i]``, each group sorted."""
    sizes = np.bincount(owner, minlength=num_partitions)
    grouped = positions[np.argsort(owner, kind="stable")]
    return [_to_tensor(part) for part in np.split(grouped, np.cumsum(sizes)[:-1])]


def _to_tensor(indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(indices).astype(np.int64))
