"""Data: the embedded digits, the batch iterator and augmentation, and the vision loaders
on tiny files written in the real on-disk formats (never the network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import socket
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsms import FedSMSError
from fedsms.data import ArrayData, Augmentation, batches, load_dataset, num_batches, vision
from fedsms.data.arrays import random_translate
from fedsms.data.vision import load_vision_arrays

# --- digits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _rows(data: ArrayData) -> Counter:
    return Counter(x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(data.images, data.labels))


def test_digits_sizes_and_pixels(digits):
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    n_train_all = len(digits.train) + len(digits.heldout)
    assert n_train_all + len(digits.test) == 1797
    assert len(digits.heldout) == round(0.1 * n_train_all)
    for part in (digits.train, digits.heldout, digits.test):
        assert part.images.shape[1:] == (1, 8, 8)
        assert part.labels.dtype == torch.int64
        x = part.float_images()
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.train.float_images().max() == 1.0
    assert set(digits.train.labels.tolist()) == set(range(10))
    assert len(digits.mean) == len(digits.std) == 1


def test_digits_train_and_heldout_partition_the_training_pool(digits):
    from fedsms.data.digits import load_digits_arrays

    pool, test = load_digits_arrays()
    # as multisets (digits has a few duplicate images): train + held-out == pool, exactly
    assert _rows(digits.train) + _rows(digits.heldout) == _rows(pool)
    assert _rows(digits.test) == _rows(test)


def test_digits_heldout_split_is_seeded():
    a0, b0, a1 = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a0.heldout.images, b0.heldout.images)
    assert torch.equal(a0.train.labels, b0.train.labels)
    assert not torch.equal(a0.heldout.images, a1.heldout.images)
    # the test set never depends on the seed; train + held-out is the same pool for every seed
    assert torch.equal(a0.test.images, a1.test.images)
    pool0 = torch.cat([a0.train.images, a0.heldout.images]).flatten(1)
    pool1 = torch.cat([a1.train.images, a1.heldout.images]).flatten(1)
    assert torch.equal(pool0.sort(dim=0).values, pool1.sort(dim=0).values)
    assert a0.mean == a1.mean and a0.std == a1.std


def test_digits_heldout_indices_disjoint():
    # identify every example by its position in the pool: images carry an id channel here
    from fedsms.data.splits import split_heldout

    n = 1797
    data = ArrayData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.zeros(n, dtype=torch.long))
    train, held = split_heldout(data, 0.1, seed=3)
    ids_train, ids_held = train.images.flatten().long(), held.images.flatten().long()
    assert len(ids_held) == 180
    assert not set(ids_train.tolist()) & set(ids_held.tolist())
    assert sorted(ids_train.tolist() + ids_held.tolist()) == list(range(n))


def test_unknown_dataset_and_missing_data_dir():
    with pytest.raises(FedSMSError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(FedSMSError, match="--data-dir"):
        load_dataset("cifar10")


# --- batches and augmentation -------------------------------------------------------------


def _id_data(n: int = 23) -> ArrayData:
    """uint8 images whose first pixel is the example's id."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ArrayData(images, torch.arange(n) % 3)


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_batches_unshuffled_order_and_sizes():
    data = _id_data(23)
    out = list(batches(data, 5))
    assert [len(y) for _, y in out] == [5, 5, 5, 5, 3] and len(out) == num_batches(23, 5)
    assert sum((_ids(x) for x, _ in out), []) == list(range(23))
    x, y = out[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (5, 1, 4, 4)
    assert [len(y) for _, y in batches(data, 5, drop_last=True)] == [5] * 4 == [5] * num_batches(23, 5, True)


def test_batches_shuffle_is_fixed_by_seed_and_covers_every_example_once():
    data = _id_data(23)

    def epoch(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [_ids(x) for x, _ in batches(data, 4, shuffle=True, generator=g)]

    a, b, c = epoch(7), epoch(7), epoch(8)
    assert a == b
    assert a != c
    for e in (a, c):
        flat = sum(e, [])
        assert sorted(flat) == list(range(23)) and flat != list(range(23))
    # labels travel with their images
    g = torch.Generator().manual_seed(7)
    for x, y in batches(data, 4, shuffle=True, generator=g):
        assert y.tolist() == [i % 3 for i in _ids(x)]
    # consecutive epochs from one generator differ, and the sequence is reproducible
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    e1 = [[_ids(x) for x, _ in batches(data, 4, shuffle=True, generator=g1)] for _ in range(2)]
    e2 = [[_ids(x) for x, _ in batches(data, 4, shuffle=True, generator=g2)] for _ in range(2)]
    assert e1 == e2 and e1[0] != e1[1]


def test_batches_need_a_generator_to_shuffle_or_augment():
    data = _id_data(5)
    with pytest.raises(ValueError):
        next(batches(data, 2, shuffle=True))
    with pytest.raises(ValueError):
        next(batches(data, 2, augment=Augmentation(crop_padding=1)))


def test_translate_keeps_shape_and_moves_a_pixel_within_padding():
    n, pad = 64, 2
    x = torch.zeros(n, 3, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre of every channel
    out = random_translate(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.sum(dim=(2, 3)), torch.ones(n, 3))  # the pixel stays inside the frame
    moved = 0
    for i in range(n):
        rows, cols = torch.nonzero(out[i, 0], as_tuple=True)
        r, c = int(rows), int(cols)
        assert abs(r - 4) <= pad and abs(c - 4) <= pad
        assert torch.equal(out[i, 1], out[i, 0]) and torch.equal(out[i, 2], out[i, 0])  # same shift per channel
        moved += (r, c) != (4, 4)
    assert moved > n // 2
    # zero padding enters at the borders
    ones = random_translate(torch.ones(n, 1, 6, 6), pad, torch.Generator().manual_seed(0))
    assert (ones == 0).any() and ((ones == 0) | (ones == 1)).all()
    # and the same generator seed gives the same shifts
    again = random_translate(x, pad, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_translate_moves_a_signal_along_its_length_only():
    """A (C, 1, L) signal never shifts off its single row, and the fill value enters at the ends."""
    n, pad, fill = 64, 4, 0.5
    x = torch.full((n, 1, 1, 40), fill)
    x[..., 20] = 1.0  # one spike in the middle
    out = Augmentation(crop_padding=pad, fill=fill)(x, torch.Generator().manual_seed(0))
    spikes = (out == 1.0).nonzero()[:, -1]
    assert len(spikes) == n  # every spike is still there: no vertical shift wiped a row out
    assert (spikes - 20).abs().max() <= pad and len(set(spikes.tolist())) > pad
    assert ((out == fill) | (out == 1.0)).all()  # padding is the fill value, not 0


def test_mnist1d_trains_with_random_shifts_padded_at_the_zero_level():
    from fedsms.data import _AUGMENTATION
    from fedsms.data.mnist1d import HIGH, LOW

    aug = _AUGMENTATION["mnist1d"]
    assert aug.active and aug.crop_padding > 0 and not aug.flip
    assert aug.fill == (0.0 - LOW) / (HIGH - LOW)


def test_flip_mirrors_about_half_the_batch():
    n = 64
    x = torch.arange(5, dtype=torch.float32).view(1, 1, 1, 5).expand(n, 2, 3, 5).contiguous() / 4
    out = Augmentation(flip=True)(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())
    assert 10 < int(flipped.sum()) < n - 10


def test_augmented_batches_are_reproducible_and_in_range():
    data = _id_data(16)
    aug = Augmentation(crop_padding=1, flip=True)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([x for x, _ in batches(data, 8, shuffle=True, generator=g, augment=aug)])

    a, b = run(3), run(3)
    assert torch.equal(a, b) and a.shape == (16, 1, 4, 4)
    assert a.min() >= 0 and a.max() <= 1


# --- tiny files in the real on-disk formats ----------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _tagged_images(rng: np.random.Generator, n: int, shape: tuple[int, ...], start: int) -> np.ndarray:
    """Random uint8 images whose first byte is a unique id (start .. start + n - 1)."""
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = np.arange(start, start + n, dtype=np.uint8)
    return images


def write_cifar10(root: Path, per_file: int = 10, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 binary batches: per record 1 label byte + 1024 R + 1024 G + 1024 B bytes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        images = _tagged_images(rng, per_file, (3, 32, 32), k * per_file)
        labels = rng.integers(0, 10, size=per_file, dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        records.tofile(root / name)
        written[name] = (images, labels)
    return written


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, (name, n) in enumerate((("train.bin", n_train), ("test.bin", n_test))):
        images = _tagged_images(rng, n, (3, 32, 32), 100 * k)
        coarse = rng.integers(0, 20, size=n, dtype=np.uint8)
        fine = rng.integers(0, 100, size=n, dtype=np.uint8)
        fine[0] = 99
        np.concatenate([coarse[:, None], fine[:, None], images.reshape(n, -1)], axis=1).tofile(root / name)
        written[name] = (images, fine)
    return written


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train: int = 20, n_test: int = 8, gz: bool = False, seed: int = 2):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, start in (("train", n_train, 0), ("t10k", n_test, 100)):
        images = _tagged_images(rng, n, (28, 28), start)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        written[split] = (images, labels)
    return written


def _by_id(data: ArrayData) -> ArrayData:
    """Undo the seeded train/held-out shuffle: order examples by their id byte."""
    ids = data.images.reshape(len(data), -1)[:, 0].long()
    return data.subset(torch.argsort(ids))


def _joined(splits) -> ArrayData:
    return _by_id(
        ArrayData(
            torch.cat([splits.train.images, splits.heldout.images]),
            torch.cat([splits.train.labels, splits.heldout.labels]),
        )
    )


@pytest.mark.parametrize("in_folder", [True, False])
def test_cifar10_binary_round_trip(tmp_path, in_folder):
    written = write_cifar10(tmp_path / "cifar-10-batches-bin" if in_folder else tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path, download=False, seed=0)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) + len(splits.heldout) == 50 and len(splits.heldout) == 5
    train_images = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    pool = _joined(splits)
    assert pool.images.dtype == torch.uint8 and pool.labels.dtype == torch.int64
    assert np.array_equal(pool.images.numpy(), train_images)
    assert np.array_equal(pool.labels.numpy(), train_labels)
    assert np.array_equal(splits.test.images.numpy(), written["test_batch.bin"][0])
    assert np.array_equal(splits.test.labels.numpy(), written["test_batch.bin"][1])
    # channel planes: record bytes 1..1024 are red, i.e. images[:, 0]
    raw = np.fromfile((tmp_path / "cifar-10-batches-bin" if in_folder else tmp_path) / "test_batch.bin", np.uint8)
    assert np.array_equal(splits.test.images[0, 0].numpy().ravel(), raw[1:1025])
    assert np.array_equal(splits.test.images[0, 2].numpy().ravel(), raw[2049:3073])
    assert int(splits.test.images[1, 1, 31, 0]) == raw[3073 + 1 + 1024 + 31 * 32]


def test_cifar10_direct_loader_keeps_file_order(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-bin")
    train, test, num_classes = load_vision_arrays("cifar10", tmp_path, download=False)
    assert num_classes == 10 and train.images.shape == (50, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.is_contiguous()
    assert np.array_equal(train.images[10:20].numpy(), written["data_batch_2.bin"][0])


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-binary")
    train, test, num_classes = load_vision_arrays("cifar100", tmp_path, download=False)
    assert num_classes == 100
    assert np.array_equal(train.images.numpy(), written["train.bin"][0])
    assert np.array_equal(train.labels.numpy(), written["train.bin"][1])
    assert np.array_equal(test.images.numpy(), written["test.bin"][0])
    assert np.array_equal(test.labels.numpy(), written["test.bin"][1])
    splits = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert splits.num_classes == 100 and splits.input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    "name, layout, gz",
    [("mnist", ".", False), ("mnist", "MNIST/raw", True), ("fashion-mnist", "FashionMNIST/raw", False)],
)
def test_idx_round_trip(tmp_path, name, layout, gz):
    written = write_idx_set(tmp_path / layout, gz=gz)
    splits = load_dataset(name, data_dir=tmp_path, download=False, seed=1)
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28)
    assert len(splits.heldout) == 2 and len(splits.train) == 18
    pool = _joined(splits)
    assert pool.images.dtype == torch.uint8 and pool.labels.dtype == torch.int64
    assert np.array_equal(pool.images[:, 0].numpy(), written["train"][0])
    assert np.array_equal(pool.labels.numpy(), written["train"][1])
    assert np.array_equal(splits.test.images[:, 0].numpy(), written["t10k"][0])
    assert np.array_equal(splits.test.labels.numpy(), written["t10k"][1])


@pytest.mark.parametrize(
    "name, url, target",
    [
        ("cifar10", CIFAR10_URL, "."),
        ("cifar100", CIFAR100_URL, "."),
        ("mnist", MNIST_URL, "MNIST/raw"),
        ("fashion-mnist", FASHION_URL, "FashionMNIST/raw"),
    ],
)
def test_missing_files_say_what_to_download_and_where(tmp_path, name, url, target):
    with pytest.raises(FedSMSError) as info:
        load_dataset(name, data_dir=tmp_path, download=False)
    message = str(info.value)
    assert url in message
    assert str(tmp_path / target) in message
    assert "\n" not in message


def test_failed_download_is_caught_quickly_and_explained(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    seen = []

    def offline(url, root, filename=None, md5=None, **_):
        seen.append((url, socket.getdefaulttimeout(), md5))
        Path(root, filename).write_bytes(b"partial")  # a half-written file must not be left behind
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(FedSMSError) as info:
        load_vision_arrays("cifar10", tmp_path, download=True)
    assert seen == [(CIFAR10_URL, vision.DOWNLOAD_TIMEOUT_S, "c32a1d4ab5d03f1284b67883e8d87530")]
    assert socket.getdefaulttimeout() == before
    assert CIFAR10_URL in str(info.value) and str(tmp_path) in str(info.value) and "failed" in str(info.value)
    assert not (tmp_path / "cifar-10-binary.tar.gz").exists()

    seen.clear()
    with pytest.raises(FedSMSError, match="MNIST/raw"):
        load_vision_arrays("mnist", tmp_path, download=True)
    assert [u for u, _, _ in seen] == [
        MNIST_URL + "train-images-idx3-ubyte.gz",
        "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz",
    ]


def test_archive_already_in_data_dir_is_verified_and_extracted(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    written = write_cifar10(staging / "cifar-10-batches-bin", per_file=3)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    # a wrong checksum is refused ...
    with pytest.raises(FedSMSError, match="MD5"):
        load_vision_arrays("cifar10", data_dir, download=False)
    # ... the right one is extracted without any download
    monkeypatch.setitem(vision._CIFAR, "cifar10", dataclasses.replace(vision._CIFAR["cifar10"], md5=md5))
    train, test, _ = load_vision_arrays("cifar10", data_dir, download=False)
    assert (data_dir / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert np.array_equal(test.images.numpy(), written["test_batch.bin"][0])
    assert len(train) == 15


def test_truncated_cifar_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(FedSMSError, match="data_batch_3.bin") as info:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert "truncated" in str(info.value)


def test_cifar_label_out_of_range_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    bad = folder / "test_batch.bin"
    raw = bytearray(bad.read_bytes())
    raw[0] = 42
    bad.write_bytes(bytes(raw))
    with pytest.raises(FedSMSError, match="test_batch.bin"):
        load_vision_arrays("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_is_named(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(raw, gz=gz)
    suffix = ".gz" if gz else ""
    bad = raw / f"train-images-idx3-ubyte{suffix}"
    if gz:  # a valid gzip stream of a truncated file
        bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-28]))
    else:
        bad.write_bytes(bad.read_bytes()[:-28])
    with pytest.raises(FedSMSError, match="train-images-idx3-ubyte") as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert "truncated" in str(info.value)


def test_cut_gzip_stream_is_named(tmp_path):
    write_idx_set(tmp_path, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-6])
    with pytest.raises(FedSMSError, match="t10k-labels-idx1-ubyte.gz"):
        load_vision_arrays("mnist", tmp_path, download=False)


def test_wrong_idx_files_are_named(tmp_path):
    write_idx_set(tmp_path)
    # labels where images belong: wrong magic number
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(FedSMSError, match="t10k-images-idx3-ubyte.*magic"):
        load_vision_arrays("mnist", tmp_path, download=False)
    # images and labels that disagree in count
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(FedSMSError, match="train-labels-idx1-ubyte"):
        load_vision_arrays("mnist", tmp_path, download=False)


def test_unknown_vision_name(tmp_path):
    with pytest.raises(FedSMSError, match="unknown"):
        load_vision_arrays("svhn", tmp_path, download=False)


def test_digits_are_read_without_scikit_learn_and_equal_its_loader(monkeypatch):
    """The bundled CSV read directly gives exactly ``sklearn.datasets.load_digits``'s images
    and labels, without importing scikit-learn (about 2 s in a fresh client process); where
    the file is not found, scikit-learn's loader is used."""
    import subprocess
    import sys

    from fedsms.data import digits

    code = "import sys; from fedsms.data.digits import digits_images; digits_images(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    images, labels = digits.digits_images()
    monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
    fallback_images, fallback_labels = digits.digits_images()
    assert images.shape == (1797, 8, 8) and images.dtype == fallback_images.dtype == np.float64
    assert np.array_equal(images, fallback_images) and np.array_equal(labels, fallback_labels)
    assert labels.dtype == fallback_labels.dtype == np.int64
