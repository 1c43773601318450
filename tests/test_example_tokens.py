"""examples/tokens: a user's own Flower app (token model, own DataLoader, AdamW loop and
loss through the client toolkit) run with `flwr run` in local simulation."""

import json
import sys
from pathlib import Path

import pytest
import torch
from processes import flwr_run
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fedsms.masks import prunable_names

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tokens"
TARGET = 0.8
CLIENTS = 3


def test_token_example_with_flwr_run(tmp_path, flwr_home):
    out = tmp_path / "out"
    overrides = f"target-sparsity={TARGET} phases=2 clients={CLIENTS} out-dir='{out}'"
    result = flwr_run(EXAMPLE, tmp_path, flwr_home, overrides, CLIENTS)
    log = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, log
    assert "tokens example: sparsity" in result.stdout, log

    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == CLIENTS and not r["rejected"] for r in rounds), rounds

    sys.path.insert(0, str(EXAMPLE))
    try:
        from tokens_task import NUM_CLASSES, TokenNet, test_data
    finally:
        sys.path.remove(str(EXAMPLE))
    model = TokenNet(32)
    model.load_state_dict(load_file(out / "final_model.safetensors"), strict=True)
    weights = dict(model.named_parameters())
    names = prunable_names(model)
    assert names == ["conv.weight", "head.weight"]
    total = sum(weights[n].numel() for n in names)
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    assert zeros == round(TARGET * total), (zeros, total)

    data = test_data(0, 1000)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=500))
    accuracy = correct / len(data)
    assert accuracy > 0.8 > 3 / NUM_CLASSES, accuracy  # chance is 1/4
    assert rounds[-1]["federated_eval"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    print(f"tokens example: sparsity {zeros / total:.4f}, test accuracy {accuracy:.4f}")
