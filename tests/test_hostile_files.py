"""Files and derived seeds that must not take a job down (issue 12, point 14, and review):
the MNIST-1D cache is checked before use, and random-pruning seeds never collide."""

import zipfile

import numpy as np
import pytest

from fedsms import FedSMSError
from fedsms.data.mnist1d import load_mnist1d_arrays
from fedsms.schedule import prune_seed

N = 200


def test_prune_seeds_are_unchanged_below_step_1000_and_distinct_beyond():
    assert [prune_seed(s, p) for s in (0, 1, 7) for p in (0, 1, 999)] == [
        s * 1000 + p for s in (0, 1, 7) for p in (0, 1, 999)
    ]
    seeds = [prune_seed(s, p) for s in (0, 1, 2, 2**32 - 1) for p in (*range(995, 1006), 2000, 10**6)]
    assert len(set(seeds)) == len(seeds)
    assert prune_seed(1, 1000) != prune_seed(2, 0)  # the old seed*1000+step collided here
    assert max(prune_seed(2**32 - 1, p) for p in range(1000)) < prune_seed(0, 1000)
    with pytest.raises(FedSMSError):
        prune_seed(-1, 1000)


def good_cache() -> dict:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(160, 40)),
        "y": rng.integers(0, 10, 160),
        "x_test": rng.normal(size=(40, 40)),
        "y_test": rng.integers(0, 10, 40),
    }


@pytest.mark.parametrize(
    "damage", ["wrong keys", "nan", "labels 1e9", "wrong count", "wrong length", "not a zip", "bomb"]
)
def test_a_damaged_mnist1d_cache_is_refused_in_one_sentence(tmp_path, damage):
    data = good_cache()
    path = tmp_path / f"mnist1d-{N}.npz"
    if damage == "wrong keys":
        data["z"] = data.pop("x")
    elif damage == "nan":
        data["x"][3, 4] = np.nan
    elif damage == "labels 1e9":
        data["y"][0] = 10**9
    elif damage == "wrong count":
        data["x"], data["y"] = data["x"][:10], data["y"][:10]
    elif damage == "wrong length":
        data["x"] = data["x"][:, :20]
    if damage == "not a zip":
        path.write_bytes(b"garbage")
    elif damage == "bomb":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for key in ("x", "y", "x_test", "y_test"):
                archive.writestr(f"{key}.npy", b"\0" * (8 << 20))  # 8 MiB of zeros, compressed to a few KB
    else:
        np.savez(path, **data)
    with pytest.raises(FedSMSError, match="delete it"):
        load_mnist1d_arrays(f"mnist1d-{N}", tmp_path)


def test_a_good_mnist1d_cache_loads(tmp_path):
    np.savez(tmp_path / f"mnist1d-{N}.npz", **good_cache())
    train, test = load_mnist1d_arrays(f"mnist1d-{N}", tmp_path)
    assert len(train) == 160 and len(test) == 40


def opened(strategy, server_round: int = 1):
    """Open ``server_round`` as Flower's loop does (``configure_train``); its train messages."""
    from flwr.app import ArrayRecord, ConfigRecord
    from helpers import LocalGrid, partitions

    from fedsms_client.app import make_client_app

    return strategy.configure_train(
        server_round, ArrayRecord(), ConfigRecord(), LocalGrid(make_client_app(), partitions(2))
    )


def test_planted_symlinks_in_the_output_folder_are_not_followed(tmp_path):
    import torch
    from helpers import digits

    from fedsms.config import FederationConfig, RunConfig
    from fedsms.models import build_for
    from fedsms_server.strategy import SparseSoupStrategy

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("rounds.jsonl", "summary.json", "results.jsonl"):
        (out / name).symlink_to(target)
    run = RunConfig(model="mlp", phases=1, target_sparsity=0.5, ood=False, out_dir=str(out))
    torch.manual_seed(0)
    strategy = SparseSoupStrategy(
        run,
        FederationConfig(pretrain_rounds=1),
        build_for("mlp", digits()),
        server_data=digits(),
        out_dir=out,
        log=lambda _: None,
    )
    opened(strategy)
    with pytest.raises(FedSMSError, match="symbolic link"):
        strategy.aggregate_evaluate(1, [])  # closes the round: its line goes to rounds.jsonl
    strategy.write_outputs()  # summary.json and results.jsonl replace the links
    assert target.read_text() == "keep me\n"
    assert not (out / "summary.json").is_symlink() and not (out / "results.jsonl").is_symlink()


def test_idx_dimensions_whose_product_overflows_are_refused(tmp_path):
    from fedsms.data.vision import _read_idx

    path = tmp_path / "images"
    dims = (2**31, 2**31, 4)  # 2**64 elements: an int64 product wraps to 0, matching an empty body
    path.write_bytes(bytes((0, 0, 8, 3)) + b"".join(d.to_bytes(4, "big") for d in dims))
    with pytest.raises(FedSMSError, match="truncated or corrupt"):
        _read_idx(path, ndim=3, title="MNIST")


def test_a_gzip_bomb_is_refused_before_it_is_read_whole(tmp_path):
    import gzip

    from fedsms.data import vision

    path = tmp_path / "images.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(4):
            f.write(b"\0" * (1 << 20))  # 4 MiB of zeros: a few KB on disk
    with pytest.raises(FedSMSError, match="more than"):
        vision._read_bytes(path, limit=1 << 20)
    sparse = tmp_path / "data_batch_1.bin"
    with open(sparse, "wb") as f:
        f.truncate(2 << 20)  # a sparse file: large, costs nothing on disk
    with pytest.raises(FedSMSError, match="more than"):
        vision._read_bytes(sparse, limit=1 << 20)


def test_an_empty_data_set_is_refused_not_a_nan_mean():
    import torch

    from fedsms.data.arrays import ArrayData
    from fedsms.data.splits import channel_stats

    with pytest.raises(FedSMSError, match="empty"):
        channel_stats(ArrayData(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)))


@pytest.mark.parametrize("damage", ["config list", "fp16 soup", "fp64 soup"])
def test_a_damaged_round_checkpoint_is_refused_on_resume(tmp_path, damage):
    import torch
    from helpers import digits

    from fedsms.checkpoint import Checkpoint
    from fedsms.config import FederationConfig, RunConfig
    from fedsms.models import build_for
    from fedsms_server.strategy import SparseSoupStrategy

    run = RunConfig(model="mlp", phases=1, target_sparsity=0.5, ood=False, out_dir=str(tmp_path))
    torch.manual_seed(0)
    strategy = SparseSoupStrategy(
        run,
        FederationConfig(pretrain_rounds=1),
        build_for("mlp", digits()),
        server_data=digits(),
        out_dir=tmp_path,
        log=lambda _: None,
    )
    opened(strategy)
    strategy.aggregate_evaluate(1, [])  # closes the round: its checkpoint
    from fedsms.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "checkpoints" / "soup")
    state, metadata = dict(saved.state), dict(saved.metadata)
    if damage == "config list":
        metadata["config"] = [1, 2]
    else:
        dtype = torch.float16 if damage == "fp16 soup" else torch.float64
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(FedSMSError):
        strategy.restore(Checkpoint(state, saved.mask, metadata))
