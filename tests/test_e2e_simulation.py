"""The federated job as a Flower simulation with 4 virtual clients, in both soup modes."""

import json
import subprocess

import pytest
import torch
from conftest import venv_bin
from safetensors.torch import load_file

from fedsms.data import load_dataset
from fedsms.evaluate import evaluate
from fedsms.masks import prunable_names
from fedsms.models import build_for

pytestmark = pytest.mark.slow

TARGET = 0.9


@pytest.mark.parametrize("mode", ["hyperparameter", "data"])
def test_simulation_with_four_clients(tmp_path, flwr_home, mode):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            venv_bin("fedsms"),
            "simulate",
            "--num-clients",
            "4",
            "--mode",
            mode,
            "--partitioning",
            "dirichlet",
            "--out-dir",
            str(out),
            "--model",
            "cnn",
            "--phases",
            "2",
            "--target-sparsity",
            str(TARGET),
            "--pretrain-rounds",
            "1",
            "--pretrain-epochs",
            "3",
            "--retrain-epochs",
            "1",
            "--ood-examples",
            "100",
            "--min-train-clients",
            "4",
            "--min-available-clients",
            "4",
            "--device",
            "cpu",
            "--recalibration",
            "federated" if mode == "data" else "server",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == 4 for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(TARGET, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0

    splits = load_dataset("digits")
    model = build_for("cnn", splits)
    model.load_state_dict(load_file(out / "final_model.safetensors"))
    params = dict(model.named_parameters())
    names = prunable_names(model)
    total = sum(params[n].numel() for n in names)
    zeros = total - sum(int(torch.count_nonzero(params[n])) for n in names)
    assert abs(zeros - round(TARGET * total)) <= len(names)
    assert evaluate(model, splits.test)["accuracy"] > 0.5
