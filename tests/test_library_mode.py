"""The README's "your own app" server snippet, run as written: the user's ServerApp and
ClientApp, joined by the in-process grid (the slow tests run the real transport)."""

import json
import re
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from helpers import LocalGrid, digits, partitions
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class MyNet(nn.Module):
    """A user's own model: any nn.Module taking [0, 1] images."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.body(x)


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own app") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_server_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)

    def my_score(model) -> float:  # a user's own metric: the weights' L1 norm
        return float(sum(p.detach().abs().sum() for p in model.parameters()))

    namespace = {"MyNet": MyNet, "my_splits": digits, "my_score": my_score}
    code = readme_snippet().replace(
        "RunConfig(target_sparsity=0.9, phases=3,",
        "RunConfig(target_sparsity=0.9, phases=3, pretrain_epochs=10, retrain_epochs=4, ood=False,",
    )
    exec(compile(code, "README.md", "exec"), namespace)
    grid = LocalGrid(namespace["client_app"], partitions(4))
    namespace["server_app"](grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    out = tmp_path / "runs/mine"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["accepted"] == 4 for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rounds[-1]["central_eval"]["accuracy"] > 0.3  # chance is 0.1; 90 % of a tiny MLP is pruned
    MyNet().load_state_dict(load_file(out / "final_model.safetensors"), strict=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["model_class"] == "MyNet" and summary["stopped"] == ""
    # the user's evaluate_fn ran at round 0 and after every round, recorded beside the strategy's own
    assert summary["initial_eval"]["my_score"] > 0 and all(r["evaluate_fn"]["my_score"] > 0 for r in rounds)
