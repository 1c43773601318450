"""examples/regression: a user's own Flower app (a Transformer encoder regressing a value,
own loss, R² as the greedy score, own run-config keys, an AdamW loop through the client
toolkit) run twice with `flwr run` in local simulation: exact sparsity over every weight
matrix, attention included; R² in every output; the same seed, the same clients and the
same soup, bit for bit."""

import json
import sys
from pathlib import Path

import pytest
import torch
from processes import flwr_run
from safetensors.torch import load_file

from fedsms.masks import kept_count, prunable_names

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "regression"
CLIENTS = 6
TARGET = 0.8


def test_regression_example_twice_with_flwr_run(tmp_path, flwr_home):
    runs = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        result = flwr_run(EXAMPLE, tmp_path, flwr_home, f"out-dir='{out}'", CLIENTS, timeout=500)
        log = result.stdout[-4000:] + result.stderr[-3000:]
        assert result.returncode == 0, log
        assert "regression example: sparsity" in result.stdout, log
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        runs.append((out, rounds))

    (out, rounds), (again, rounds_again) = runs
    assert [r["phase"] for r in rounds] == [0, 0, 0, 1, 2]
    assert all(r["accepted"] == 3 and not r["rejected"] for r in rounds), rounds
    drawn = [r["partitions"] for r in rounds]
    assert drawn == [r["partitions"] for r in rounds_again]  # same seed, same clients (node ids differ)
    assert all(len(p) == 3 and None not in p for p in drawn) and len({tuple(p) for p in drawn}) > 1
    first, second = load_file(out / "final_model.safetensors"), load_file(again / "final_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)  # ... and the same soup, bit for bit

    summary = json.loads((out / "summary.json").read_text())
    assert all("r2" in p and "r2" in rounds[i]["central_eval"] for i, p in enumerate(summary["phases"]))
    assert summary["phases"][-1]["diagnostics"]["score"] == "r2"
    assert summary["phases"][-1]["r2"] > 0.5, summary["phases"]  # predicting the mean scores 0
    assert summary["model"]["task"] == "regression" and summary["model"]["model_class"] == "FeatureTransformer"

    sys.path.insert(0, str(EXAMPLE))
    try:
        from regression_task import FeatureTransformer
    finally:
        sys.path.remove(str(EXAMPLE))
    model = FeatureTransformer(16, 2)
    model.load_state_dict(first, strict=True)
    names = prunable_names(model)
    assert {"encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight"} <= set(names)
    assert {"encoder.linear1.weight", "encoder.linear2.weight", "value.weight", "head.weight"} <= set(names)
    weights = dict(model.named_parameters())
    total = sum(weights[n].numel() for n in names)
    assert sum(int(torch.count_nonzero(weights[n])) for n in names) <= kept_count(total, TARGET)
    assert summary["model"]["sparsity"] == pytest.approx(TARGET, abs=1 / total)
