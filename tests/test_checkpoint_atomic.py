"""A checkpoint is one atomic unit (issue 12, points 5 and 13): a process killed at random
moments while checkpointing leaves the old checkpoint or the new one, never a mix, and every
damaged file is refused with one sentence."""

import json
import multiprocessing
import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedsms import FedSMSError
from fedsms.checkpoint import export_model, load_checkpoint, remove_stale, save_checkpoint

KILLS = 60


def round_state(server_round: int) -> tuple[dict, dict]:
    """A state whose every value is the round number (so a mix is visible), and its mask."""
    mask = {f"w{i}": torch.ones(32, 32, dtype=torch.bool) for i in range(4)}
    state = {name: torch.full((32, 32), float(server_round)) for name in mask}
    state["bias"] = torch.full((32,), float(server_round))
    return state, mask


def consistent(base) -> int:
    """The round of the checkpoint at ``base``, after checking that its parts agree."""
    checkpoint = load_checkpoint(base)
    done = checkpoint.metadata["server_round"]
    assert all(torch.all(v == float(done)) for v in checkpoint.state.values()), "tensors of another round"
    return done


def checkpoint_forever(base) -> None:
    """A job resumed from ``base``: checkpoints rounds after the last one until killed."""
    torch.set_num_threads(1)
    remove_stale(base)
    done = consistent(base) if base.with_name(base.name + ".json").exists() else 0
    while True:
        done += 1
        state, mask = round_state(done)
        save_checkpoint(base, state, mask, {"server_round": done, "history": list(range(done % 50))})


@pytest.mark.slow  # 60 processes killed at random points
def test_killed_while_checkpointing_leaves_the_old_or_the_new_checkpoint(tmp_path):
    base = tmp_path / "checkpoints" / "soup"
    rng = random.Random(12)
    rounds, resumed = [], 0
    # a fork server with torch loaded: each job starts in milliseconds, without the parent's threads
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fedsms.checkpoint", "test_checkpoint_atomic"])
    for _ in range(KILLS):
        job = context.Process(target=checkpoint_forever, args=(base,))
        job.start()
        while not rounds and not base.with_name("soup.json").exists():  # the first job gets a checkpoint out
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.4))
        job.kill()  # SIGKILL: wherever the job is
        job.join()
        if base.with_name("soup.json").exists():
            done = consistent(base)  # loadable, one round throughout
            resumed += bool(rounds)
            assert not rounds or done >= rounds[-1], "a checkpoint went back in time"
            rounds.append(done)
    assert len(rounds) == KILLS and rounds[-1] > 1 and resumed == KILLS - 1
    remove_stale(base)
    left = sorted(p.name for p in base.parent.iterdir())
    assert all(not name.endswith(".tmp") for name in left) and len(left) == 5, left
    assert set(load_file(base.with_name("soup.safetensors"))) == set(round_state(1)[0])  # plain load still works


def test_a_mixed_set_of_files_still_loads_the_manifests_round(tmp_path):
    base = tmp_path / "soup"
    save_checkpoint(base, *round_state(1), {"server_round": 1})
    save_checkpoint(base, *round_state(2), {"server_round": 2})
    # a kill between the manifest and the plain links left round 1's tensors beside round 2's manifest
    plain = base.with_name("soup.safetensors")
    plain.unlink()
    save_file(round_state(1)[0], plain)
    manifest = base.with_name("soup.json").stat().st_mtime_ns
    os.utime(plain, ns=(manifest - 10**9, manifest - 10**9))
    assert consistent(base) == 2


def test_stale_temporaries_are_removed(tmp_path):
    base = tmp_path / "soup"
    save_checkpoint(base, *round_state(1), {"server_round": 1})
    (tmp_path / ".soup.json.abc.tmp").write_text("{")
    (tmp_path / "soup.0123456789ab.safetensors").write_bytes(b"x")
    removed = remove_stale(base)
    assert {p.name for p in removed} == {".soup.json.abc.tmp", "soup.0123456789ab.safetensors"}
    assert not (tmp_path / ".soup.json.abc.tmp").exists() and not (tmp_path / "soup.0123456789ab.safetensors").exists()
    assert consistent(base) == 1


@pytest.mark.parametrize("damage", ["list", "nested", "nan", "huge", "not json", "files outside"])
def test_damaged_checkpoint_metadata_is_refused_with_one_sentence(tmp_path, damage):
    base = tmp_path / "soup"
    save_checkpoint(base, *round_state(1), {"server_round": 1})
    path = tmp_path / "soup.json"
    record = json.loads(path.read_text())
    text = {
        "list": "[1, 2]",
        "nested": "[" * 100_000 + "]" * 100_000,
        "nan": path.read_text().replace('"server_round": 1', '"server_round": NaN'),
        "not json": "{",
        "files outside": json.dumps({**record, "files": {"state": "../../etc/passwd", "mask": "x"}}),
        "huge": None,
    }[damage]
    if text is None:
        with open(path, "a") as f:
            f.truncate(65 << 20)
    else:
        path.write_text(text)
    with pytest.raises(FedSMSError):
        load_checkpoint(base)


def test_a_nan_in_the_saved_soup_is_refused(tmp_path):
    base = tmp_path / "soup"
    save_checkpoint(base, *round_state(1), {"server_round": 1})
    record = json.loads((tmp_path / "soup.json").read_text())
    state = round_state(1)[0]
    state["bias"][3] = float("nan")
    save_file(state, tmp_path / record["files"]["state"])
    with pytest.raises(FedSMSError, match="NaN"):
        load_checkpoint(base)


def test_export_model_refuses_nan_metadata_before_writing(tmp_path):
    with pytest.raises(FedSMSError, match="accuracy"):
        export_model(tmp_path / "final", torch.nn.Linear(2, 2), {"accuracy": float("nan")})
    assert not list(tmp_path.iterdir())
