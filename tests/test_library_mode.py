"""The README's "your own model and data" snippet, run as written inside a Flower simulation."""

import json
import re
from pathlib import Path

import pytest
from torch import nn

from fedsms.data import load_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


class MyNet(nn.Module):
    """A user's own model: any nn.Module taking [0, 1] images."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.body(x)


def my_splits():
    return load_dataset("digits")


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Your own model and data"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_snippet_runs(tmp_path, monkeypatch, flwr_home):
    from flwr.simulation import run_simulation

    monkeypatch.chdir(tmp_path)
    namespace = {"MyNet": MyNet, "my_splits": my_splits}
    code = readme_snippet().replace("RunConfig(target_sparsity=0.9, phases=3)",
                                    "RunConfig(target_sparsity=0.9, phases=3, pretrain_epochs=5, retrain_epochs=2, ood=False)")
    exec(compile(code, "README.md", "exec"), namespace)
    run_simulation(server_app=namespace["server_app"], client_app=namespace["client_app"], num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    rounds = [json.loads(line) for line in (tmp_path / "runs/mine/rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["accepted"] == 4 for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rounds[-1]["central_eval"]["accuracy"] > 0.3  # chance is 0.1; 90 % of a tiny MLP is pruned
