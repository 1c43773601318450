"""CIFAR-10/100, MNIST and Fashion-MNIST read from their official files under ``--data-dir``.

Nothing read from disk or the network is unpickled: CIFAR comes from the *binary*
distributions (fixed-length records: label byte(s) + 3,072 pixel bytes, red plane then
green then blue, each 32x32 row-major) and MNIST / Fashion-MNIST from their IDX files
(plain or ``.gz``). Both are parsed with numpy in one vectorised pass per file.

Where files are looked for:

- CIFAR-10: ``data_dir/cifar-10-batches-bin/`` or ``data_dir/`` itself
  (``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``).
- CIFAR-100: ``data_dir/cifar-100-binary/`` or ``data_dir/`` (``train.bin``, ``test.bin``;
  the fine labels are used).
- MNIST: ``data_dir/`` or ``data_dir/MNIST/raw/`` (torchvision's layout); Fashion-MNIST:
  ``data_dir/`` or ``data_dir/FashionMNIST/raw/``.

When they are missing and ``download`` is true, the official archives are fetched with
torchvision's download helpers (MD5-checked, short socket timeout); when that fails, or
``download`` is false, a ``FedSMSError`` says which URL to fetch and where to put it.
A CIFAR archive that is already in ``data_dir`` with the right MD5 is extracted without
any download.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import socket
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsms import FedSMSError
from fedsms.data.arrays import ArrayData

DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation, so a dead network fails fast


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    url: str
    md5: str
    folder: str  # what the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # label bytes in front of each record; the last one is the label we use
    num_classes: int

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class _IdxSpec:
    title: str
    mirrors: tuple[str, ...]  # tried in order, as torchvision does
    md5: dict[str, str]  # of the .gz files
    folder: str  # torchvision's layout below data_dir

    num_classes: int = 10


_CIFAR = {
    "cifar10": _CifarSpec(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        md5="c32a1d4ab5d03f1284b67883e8d87530",
        folder="cifar-10-batches-bin",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",),
        label_bytes=1,
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        md5="03b5dce01913d631647c71ecec9e9cb8",
        folder="cifar-100-binary",
        train_files=("train.bin",),
        test_files=("test.bin",),
        label_bytes=2,  # coarse label, fine label
        num_classes=100,
    ),
}

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

_IDX = {
    "mnist": _IdxSpec(
        title="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        folder="MNIST/raw",
    ),
    "fashion-mnist": _IdxSpec(
        title="Fashion-MNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        folder="FashionMNIST/raw",
    ),
}

VISION_DATASETS = tuple(_CIFAR) + tuple(_IDX)


def load_vision_arrays(name: str, data_dir: Path, download: bool = True) -> tuple[ArrayData, ArrayData, int]:
    """(train, test, num_classes) with uint8 images (N, C, H, W) and int64 labels.

    Where the files are looked for and how they are fetched is in the module docstring.

    Parameters
    ----------
    name : str
        ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"fashion-mnist"``.
    data_dir : pathlib.Path
        The data folder (``~`` is expanded).
    download : bool, default True
        Fetch the official archives when the files are missing.

    Returns
    -------
    tuple of (ArrayData, ArrayData, int)
        Train and test data and the number of classes (10 or 100).

    Raises
    ------
    FedSMSError
        If the name is unknown, the files are missing and cannot be downloaded (the message
        names the URL and the folder), or a file is damaged.
    """
    data_dir = Path(data_dir).expanduser()
    if name in _CIFAR:
        return _load_cifar(_CIFAR[name], data_dir, download)
    if name in _IDX:
        return _load_idx_set(_IDX[name], data_dir, download)
    raise FedSMSError(f"unknown vision data set {name!r}; use one of {', '.join(VISION_DATASETS)}")


# --- CIFAR (binary version) -------------------------------------------------------------


def _load_cifar(spec: _CifarSpec, data_dir: Path, download: bool) -> tuple[ArrayData, ArrayData, int]:
    names = spec.train_files + spec.test_files
    found = _find_files([data_dir / spec.folder, data_dir], names, allow_gz=False)
    if found is None:
        archive = data_dir / spec.archive
        if download:  # torchvision's helper skips the download when the archive is there and valid
            reason = _download(spec.url, data_dir, spec.archive, spec.md5)
        else:
            reason = None if archive.is_file() else "downloading is off"
        if reason is None:
            reason = _extract(archive, spec.md5, data_dir)
        found = _find_files([data_dir / spec.folder, data_dir], names, allow_gz=False)
        if found is None:
            if reason is None:
                reason = f"{archive} did not contain {spec.folder}/{names[0]}"
            raise FedSMSError(
                f"{spec.title} binary files were not found in {data_dir / spec.folder} or {data_dir} "
                f"({reason}); download {spec.url} and extract it into {data_dir} so that "
                f"{data_dir / spec.folder / names[-1]} exists"
            )
    train = _concat([_read_cifar_file(found[f], spec) for f in spec.train_files])
    test = _concat([_read_cifar_file(found[f], spec) for f in spec.test_files])
    return train, test, spec.num_classes


def _read_cifar_file(path: Path, spec: _CifarSpec) -> ArrayData:
    raw = _read_bytes(path)
    record = spec.label_bytes + 3 * 32 * 32
    if raw.size == 0 or raw.size % record != 0:
        raise FedSMSError(
            f"{path} is truncated or not a {spec.title} binary batch ({raw.size} bytes is not a whole "
            f"number of {record}-byte records); download {spec.url} again and re-extract it"
        )
    records = raw.reshape(-1, record)
    labels = records[:, spec.label_bytes - 1].astype(np.int64)
    _check_labels(labels, spec.num_classes, path, spec.url)
    images = records[:, spec.label_bytes :].reshape(-1, 3, 32, 32)
    return ArrayData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def _concat(parts: list[ArrayData]) -> ArrayData:
    if len(parts) == 1:
        return parts[0]
    return ArrayData(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _extract(archive: Path, md5: str, dest: Path) -> str | None:
    """Extract a verified tarball into ``dest``; a reason string when that is impossible."""
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(str(archive), md5):
        return f"{archive} does not have MD5 {md5}, so it is incomplete or a different file"
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, **safe)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        return f"extracting {archive} failed: {_one_line(e)}"
    return None


# --- MNIST / Fashion-MNIST (IDX) --------------------------------------------------------


def _load_idx_set(spec: _IdxSpec, data_dir: Path, download: bool) -> tuple[ArrayData, ArrayData, int]:
    raw_dir = data_dir / spec.folder
    candidates = [data_dir, raw_dir]
    found = _find_files(candidates, IDX_FILES, allow_gz=True)
    if found is None:
        reason = _download_idx(spec, raw_dir) if download else "downloading is off"
        found = _find_files(candidates, IDX_FILES, allow_gz=True)
        if found is None:
            names = [f"{f}.gz" for f in IDX_FILES]
            raise FedSMSError(
                f"{spec.title} files were not found in {data_dir} or {raw_dir} ({reason}); download "
                f"{', '.join(names[:-1])} and {names[-1]} from {spec.mirrors[0]} "
                f"(for example {spec.mirrors[0]}{names[0]}) into {raw_dir}, gzipped or not"
            )
    train = _idx_pair(found[IDX_FILES[0]], found[IDX_FILES[1]], spec)
    test = _idx_pair(found[IDX_FILES[2]], found[IDX_FILES[3]], spec)
    return train, test, spec.num_classes


def _idx_pair(images_path: Path, labels_path: Path, spec: _IdxSpec) -> ArrayData:
    images = _read_idx(images_path, ndim=3, title=spec.title)
    labels = _read_idx(labels_path, ndim=1, title=spec.title).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise FedSMSError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            f"replace both with the official {spec.title} files"
        )
    _check_labels(labels, spec.num_classes, labels_path, spec.mirrors[0])
    n, h, w = images.shape
    return ArrayData(torch.from_numpy(np.array(images.reshape(n, 1, h, w))), torch.from_numpy(labels))


def _read_idx(path: Path, *, ndim: int, title: str) -> np.ndarray:
    """An IDX array of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, ndim big-endian uint32
    sizes, then the data; the file must be exactly that long."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if raw.size < header:
        raise FedSMSError(f"{path} is truncated ({raw.size} bytes, shorter than its header); download it again")
    magic = bytes(raw[:4])
    if magic != bytes((0, 0, 0x08, ndim)):
        raise FedSMSError(
            f"{path} is not a {title} IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic {magic.hex()}, expected {bytes((0, 0, 8, ndim)).hex()}); replace it with the official file"
        )
    dims = tuple(int(d) for d in np.frombuffer(bytes(raw[4:header]), dtype=">u4"))
    expected = header + math.prod(dims)  # a Python int: no overflow
    if raw.size != expected:
        raise FedSMSError(
            f"{path} is truncated or corrupt (its header promises {expected} bytes for shape {dims}, "
            f"the file has {raw.size}); download it again"
        )
    return raw[header:].reshape(dims)


def _download_idx(spec: _IdxSpec, raw_dir: Path) -> str | None:
    """Fetch the four .gz files into ``raw_dir``; a reason string on failure."""
    for name in IDX_FILES:
        if (raw_dir / name).is_file() or (raw_dir / f"{name}.gz").is_file():
            continue
        errors = []
        for mirror in spec.mirrors:
            error = _download(f"{mirror}{name}.gz", raw_dir, f"{name}.gz", spec.md5[name])
            if error is None:
                break
            errors.append(error)
        else:
            return errors[0]
    return None


# --- shared helpers ----------------------------------------------------------------------


def _find_files(dirs: list[Path], names: tuple[str, ...], *, allow_gz: bool) -> dict[str, Path] | None:
    """The first directory holding every one of ``names`` (or ``name.gz``): name -> path."""
    for d in dirs:
        found = {}
        for name in names:
            for path in (d / name, d / f"{name}.gz") if allow_gz else (d / name,):
                if path.is_file():
                    found[name] = path
                    break
        if len(found) == len(names):
            return found
    return None


MAX_DATA_FILE = 512 << 20  # bytes one data file may hold (decompressed); the official ones are far smaller


def _read_bytes(path: Path, limit: int = MAX_DATA_FILE) -> np.ndarray:
    """The whole file as a flat uint8 array (decompressed when it ends in ``.gz``); a file
    or a decompressed stream larger than ``limit`` is refused before it is read whole."""
    too_big = FedSMSError(
        f"{path} holds more than {limit >> 20} MiB, more than any official data file; replace it with the official file"
    )
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise too_big
            return np.frombuffer(bytearray(data), dtype=np.uint8)
        if path.stat().st_size > limit:
            raise too_big
        return np.fromfile(path, dtype=np.uint8)
    except (OSError, EOFError, zlib.error) as e:
        raise FedSMSError(f"cannot read {path} ({_one_line(e)}); download it again") from None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path, url: str) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise FedSMSError(
            f"{path} has label {int(labels.max())} but the data set has {num_classes} classes, so it is "
            f"corrupt or a different data set; download it again from {url}"
        )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _download(url: str, root: Path, filename: str, md5: str) -> str | None:
    """Download with torchvision's helper (MD5-checked); a reason string on failure."""
    from torchvision.datasets.utils import download_url

    target = root / filename
    existed = target.exists()
    if not existed:
        print(f"downloading {url} into {root}", file=sys.stderr, flush=True)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            download_url(url, str(root), filename=filename, md5=md5)
    except Exception as e:  # network, HTTP, disk or checksum: all mean "do it by hand"
        if not existed:  # leave no partial download behind (never delete what the user put there)
            with contextlib.suppress(OSError):
                target.unlink()
        return f"downloading {url} failed: {_one_line(e)}"
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text.rstrip(".")
