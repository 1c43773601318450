"""Small inputs refused up front in one sentence (issue 27, point 6)."""

import json
import subprocess

import pytest
import torch

from fedsms import FedSMSError
from fedsms.checkpoint import load_checkpoint, save_checkpoint
from fedsms.cli import check_out_dir, main
from fedsms.data.mnist1d import parse_samples
from fedsms.decentral import soup_checkpoints
from fedsms.merge import SoupError
from fedsms_client.launch import main as client_main
from fedsms_server.launch import main as server_main


def test_mnist1d_n_has_an_upper_bound():
    assert parse_samples("mnist1d-1000000") == 1_000_000
    for name in ("mnist1d-1000001", "mnist1d-" + "9" * 5000):
        with pytest.raises(FedSMSError, match="100 <= N <= 1,000,000"):
            parse_samples(name)


def candidate(path, seed, **metadata):
    g = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    mask = {"w": torch.ones(4, 4, dtype=torch.bool)}
    save_checkpoint(path, state, mask, {"phase": 1, **metadata})
    return path


def test_fedsms_soup_refuses_a_pruned_checkpoint_and_a_candidate_given_twice(tmp_path):
    a = candidate(tmp_path / "a", 0, stage="candidate", candidate=0)
    b = candidate(tmp_path / "b", 1, stage="candidate", candidate=1)
    pruned = candidate(tmp_path / "p", 2, stage="pruned")
    with pytest.raises(SoupError, match="pruned checkpoint"):
        soup_checkpoints([a, b, pruned], tmp_path / "s")
    stripped = candidate(tmp_path / "a2", 0, stage="candidate")  # candidate 0 again, its index gone
    with pytest.raises(SoupError, match="hold the same weights"):
        soup_checkpoints([a, b, stripped], tmp_path / "s")


def test_absurd_example_counts_and_file_names_end_in_one_sentence(tmp_path, capsys):
    a = candidate(tmp_path / "a", 0, num_examples=10**400)
    b = candidate(tmp_path / "b", 1, num_examples=10)
    assert main(["soup", str(a), str(b), "--merge", "weighted", "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "num_examples" in err and "characters" in err and "Traceback" not in err and len(err) < 400
    assert main(["inspect", str(tmp_path / ("x" * 5000))]) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and len(err) < 400


@pytest.mark.parametrize("out", ['runs/a"b', "runs/a\nb"])
def test_an_out_dir_flower_cannot_carry_is_refused_before_the_superlink_starts(tmp_path, out, capsys, monkeypatch):
    def no_superlink(*args, **kwargs):
        raise AssertionError("the SuperLink was started")

    monkeypatch.setattr(subprocess, "Popen", no_superlink)
    monkeypatch.chdir(tmp_path)
    assert server_main(["--insecure", "--out-dir", out]) == 2
    assert "Flower's run config cannot carry" in capsys.readouterr().err


def test_client_insecure_with_an_auth_key_is_refused_up_front(tmp_path, capsys):
    key = tmp_path / "client.key"
    key.write_text("key")
    args = ["--insecure", "--auth-key", str(key), "--server", "127.0.0.1:1", "--partition-id", "0"]
    assert client_main([*args, "--num-partitions", "1", "--connect-timeout", "1"]) == 2
    assert "--auth-key needs TLS" in capsys.readouterr().err


def test_a_dangling_rounds_jsonl_symlink_is_an_existing_job(tmp_path):
    (tmp_path / "rounds.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(FedSMSError, match="already exists"):
        check_out_dir(tmp_path, resume=False)


def test_damaged_checkpoint_fields_and_enormous_weights_are_refused_on_load(tmp_path):
    base = candidate(tmp_path / "c", 0)
    meta = json.loads((tmp_path / "c.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps({**meta, "mask_tensors": [["w"]]}))
    with pytest.raises(FedSMSError, match="not all names"):
        load_checkpoint(base)
    save_checkpoint(tmp_path / "big", {"w": torch.full((4,), 3e38)}, {"w": torch.ones(4, dtype=torch.bool)}, {})
    with pytest.raises(FedSMSError, match="beyond"):
        load_checkpoint(tmp_path / "big")
