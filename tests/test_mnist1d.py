"""MNIST-1D: generated locally by the mnist1d package (never downloaded), split like every
other data set, stored as (1, 1, 40) images so the corruptions act along the signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

from fedsms import FedSMSError
from fedsms.corruptions import CORRUPTIONS, corrupt
from fedsms.data import load_dataset, mnist1d
from fedsms.models import build_for

N = 500  # mnist1d keeps 80 % for training: 400 train + held-out, 100 test


@pytest.fixture(scope="module")
def splits():
    return load_dataset(f"mnist1d-{N}", seed=0)


def test_shapes_split_sizes_and_range(splits):
    assert splits.num_classes == 10 and splits.input_shape == (1, 1, 40)
    assert len(splits.train) + len(splits.heldout) == 400 and len(splits.test) == 100
    assert len(splits.heldout) == 40
    for part in (splits.train, splits.heldout, splits.test):
        assert part.images.dtype == torch.float32 and part.images.shape[1:] == (1, 1, 40)
        assert part.images.min() > 0.0 and part.images.max() < 1.0  # the affine map clips nothing
    assert set(splits.train.labels.tolist()) == set(range(10))
    logits = build_for("mlp-32", splits)(splits.test.float_images())
    assert logits.shape == (100, 10)


def test_generation_is_fixed_and_the_heldout_split_seeded(splits):
    again, other = load_dataset(f"mnist1d-{N}", seed=0), load_dataset(f"mnist1d-{N}", seed=1)
    assert torch.equal(splits.train.images, again.train.images)
    assert torch.equal(splits.test.images, other.test.images)  # the test set never depends on the seed
    assert not torch.equal(splits.heldout.images, other.heldout.images)
    pool = lambda s: torch.cat([s.train.images, s.heldout.images]).flatten(1).sort(dim=0).values  # noqa: E731
    assert torch.equal(pool(splits), pool(other))


def test_generation_leaves_the_global_random_state_alone():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    load_dataset("mnist1d-200")
    assert np.random.rand() == expected


def test_npz_cache_round_trips(tmp_path, splits):
    first = load_dataset(f"mnist1d-{N}", data_dir=tmp_path, seed=0)
    assert (tmp_path / f"mnist1d-{N}.npz").exists()
    cached = load_dataset(f"mnist1d-{N}", data_dir=tmp_path, seed=0)
    for a, b in ((first, cached), (first, splits)):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


@pytest.mark.parametrize("name", ["mnist1d-", "mnist1d-12", "mnist1d-x"])
def test_bad_sample_count_is_one_sentence(name):
    with pytest.raises(FedSMSError, match="mnist1d-N with 100 <= N"):
        mnist1d.parse_samples(name)


# ---- corruptions on signals (N, 1, 1, L) -------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_applies_to_signals(splits, name):
    x = splits.test.float_images()[:32]
    diffs = []
    for severity in (1, 3, 5):
        y = corrupt(x, name, severity, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and torch.isfinite(y).all() and y.min() >= 0.0 and y.max() <= 1.0
        diffs.append((y - x).abs().mean().item())
    assert 0.0 < diffs[0] < diffs[-1]


@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_blur_of_signals_is_a_1d_filter_along_the_signal(splits, severity):
    x = splits.test.float_images()[:8].double()
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    # scipy's "mirror" is the reflect padding the corruption uses; both truncate at 4 sigma
    expected = gaussian_filter1d(x.numpy(), sigma, axis=-1, mode="mirror", truncate=4.0)
    actual = corrupt(x, "gaussian_blur", severity, torch.Generator())
    np.testing.assert_allclose(actual.numpy(), expected.clip(0, 1), atol=1e-12)


def test_defocus_blur_of_signals_smooths_along_the_signal_only():
    x = torch.zeros(1, 1, 1, 41, dtype=torch.float64)
    x[..., 20] = 1.0
    y = corrupt(x, "defocus_blur", 5, torch.Generator())[0, 0, 0]
    assert y.sum().item() == pytest.approx(1.0)  # a normalised kernel, far from the borders
    assert torch.equal(y, y.flip(0)) and y[20] < 1.0 and y[18] > 0.0
