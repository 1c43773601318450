"""MNIST-1D (Greydanus & Steinbach): 10 classes of 40-sample 1-D signals, generated locally
by the ``mnist1d`` package's ``make_dataset`` (its default arguments and fixed generation
seed, our sample count); its download path is never used.

Signals are stored as images of shape (1, 1, 40) so every trainer, model and corruption
works unchanged: a corruption's height axis has size 1, so blurs act along the signal.
The generator's standardised values are mapped to [0, 1] by a fixed affine map
(``(x - LOW) / (HIGH - LOW)``, clipped); the models normalise them back themselves.
"""

from __future__ import annotations

import os
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from fedsms import FedSMSError
from fedsms.data.arrays import ArrayData

DEFAULT_SAMPLES = 10_000
MAX_SAMPLES = 1_000_000  # generated on the fly in memory (about 160 MB of float32 signals at most)
LOW, HIGH = -6.0, 6.0  # the generated data lies within about ±5.5 standard deviations
ZERO_LEVEL = (0.0 - LOW) / (HIGH - LOW)  # where a zero of the generator's signal lands in [0, 1]
SIGNAL_LENGTH = 40


def parse_samples(name: str) -> int:
    """Sample count of ``mnist1d`` (the default) or ``mnist1d-N``.

    Parameters
    ----------
    name : str
        ``"mnist1d"`` or ``"mnist1d-N"`` with 100 <= N <= ``MAX_SAMPLES``.

    Returns
    -------
    int
        ``DEFAULT_SAMPLES`` or N (train and test together).

    Raises
    ------
    FedSMSError
        If ``name`` is neither form or N is outside [100, ``MAX_SAMPLES``].
    """
    if name == "mnist1d":
        return DEFAULT_SAMPLES
    match = re.fullmatch(r"mnist1d-(\d{1,9})", name)
    if not match or not 100 <= int(match[1]) <= MAX_SAMPLES:
        raise FedSMSError(
            f"MNIST-1D is named mnist1d or mnist1d-N with 100 <= N <= {MAX_SAMPLES:,} samples, got {name[:40]!r}"
        )
    return int(match[1])


def _generate(num_samples: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise FedSMSError("MNIST-1D needs the mnist1d package; run pip install -e '.[bench]'") from None
    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds the global numpy and random generators; give the caller theirs back.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _arrays(x: np.ndarray, y: np.ndarray) -> ArrayData:
    signals = torch.from_numpy(((x - LOW) / (HIGH - LOW)).clip(0.0, 1.0).astype(np.float32))
    return ArrayData(signals.view(-1, 1, 1, SIGNAL_LENGTH).contiguous(), torch.from_numpy(y.astype(np.int64)))


_CACHE_KEYS = {"x", "y", "x_test", "y_test"}


def _read_cache(cache: Path, num_samples: int) -> dict[str, np.ndarray]:
    """The cached arrays, checked: the four keys, sizes bounded before reading, float
    signals of length 40 that are finite, integer labels 0..9, ``num_samples`` in all."""

    def refuse(why: str) -> FedSMSError:
        return FedSMSError(f"the MNIST-1D cache {cache} {why}; delete it and it is generated again")

    limit = num_samples * SIGNAL_LENGTH * 8 + 4096  # bytes any one member may inflate to
    try:
        with zipfile.ZipFile(cache) as archive:
            members = {info.filename.removesuffix(".npy"): info.file_size for info in archive.infolist()}
        if set(members) != _CACHE_KEYS:
            raise refuse(f"holds {sorted(members)[:6]}, not {sorted(_CACHE_KEYS)}")
        if max(members.values()) > limit:
            raise refuse("declares arrays larger than its samples need")
        with np.load(cache, allow_pickle=False) as stored:
            data = {k: stored[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise refuse(f"cannot be read ({str(error)[:80]})") from None
    train, test = (data["x"], data["y"]), (data["x_test"], data["y_test"])
    for x, y in (train, test):
        if (
            x.ndim != 2
            or x.shape[1] != SIGNAL_LENGTH
            or x.dtype.kind != "f"
            or y.shape != (len(x),)
            or y.dtype.kind not in "iu"
        ):
            raise refuse("has arrays of the wrong shape or type")
        if not np.isfinite(x).all() or (y.size and (y.min() < 0 or y.max() >= 10)):
            raise refuse("has NaN/Inf signals or labels outside 0..9")
    if len(train[0]) + len(test[0]) != num_samples or not len(train[0]) or not len(test[0]):
        raise refuse(f"holds {len(train[0])} + {len(test[0])} samples, not {num_samples}")
    return data


def load_mnist1d_arrays(name: str, data_dir: Path | None = None) -> tuple[ArrayData, ArrayData]:
    """(train, test): mnist1d's own 80/20 split of ``parse_samples(name)`` signals, cached
    as ``data_dir/mnist1d-N.npz`` when a data folder is given (never a pickle).

    Parameters
    ----------
    name : str
        ``"mnist1d"`` or ``"mnist1d-N"`` (see :func:`parse_samples`).
    data_dir : pathlib.Path, optional
        Folder of the cache; None: generate every time, write nothing.

    Returns
    -------
    tuple of (ArrayData, ArrayData)
        Train and test signals as float32 images (N, 1, 1, 40) in [0, 1], int64 labels.

    Raises
    ------
    FedSMSError
        If the name is bad, or the data must be generated and the ``mnist1d`` package is
        not installed.
    """
    num_samples = parse_samples(name)
    cache = data_dir / f"mnist1d-{num_samples}.npz" if data_dir is not None else None
    if cache is not None and cache.exists():
        data = _read_cache(cache, num_samples)
    else:
        data = _generate(num_samples)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **data)
            os.replace(tmp, cache)  # a reader never sees half a cache
    return _arrays(data["x"], data["y"]), _arrays(data["x_test"], data["y_test"])
