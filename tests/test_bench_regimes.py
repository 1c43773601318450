"""The regime map (bench/regimes.py): its cells, a smoke run at tiny size whose gaps are the
paired per-seed differences of its own rows, and a second run that trains nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import regimes  # noqa: E402


def test_the_map_sweeps_budget_at_every_sparsity_and_phases_and_lr_at_the_highest():
    args = regimes.parse_args(
        ["--sparsities", "0.95,0.98", "--budgets", "5,40", "--budgets-below-highest", "5", "--reference-budget", "5"]
    )
    found = {(c.axis, c.target, c.budget, c.phases, c.lr): c.methods for c in regimes.cells(args)}
    base, extra = ("imp", "imp-long", "sms"), ("imp-best", "sms-greedy")
    assert found == {
        ("budget", 0.98, 5, 3, 0.2): base + extra,
        ("budget", 0.98, 40, 3, 0.2): base,
        ("budget", 0.95, 5, 3, 0.2): base + extra,
        ("lr", 0.98, 5, 3, 0.05): base,
        ("phases", 0.98, 5, 5, 0.2): base,
        ("phases", 0.98, 5, 8, 0.2): base,
    }


def run_regimes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "regimes.py"), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # a real MNIST-1D map at tiny size (about a minute)
def test_a_tiny_map_tabulates_paired_gaps_and_resumes_without_training(tmp_path):
    out = tmp_path / "map"
    command = ["--tiny", "--dataset", "mnist1d-300", "--model", "mlp-16", "--batch-size", "32", "--seeds", "0,1"]
    command += ["--data-dir", str(tmp_path / "data"), "--out", str(out)]
    first = run_regimes(*command)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((out / "regimes.json").read_text())
    assert [(c["axis"], c["phases"], c["lr"]) for c in result["cells"]] == [
        ("budget", 2, 0.2),
        ("lr", 2, 0.05),
        ("phases", 3, 0.2),
    ]
    for cell in result["cells"]:
        final = {
            (r["method"], r["seed"]): r["accuracy"]
            for r in result["rows"]
            if r["cell"] == cell["name"] and r["phase"] == cell["phases"]
        }
        for base in ("imp", "imp-long"):
            diffs = [100 * (final[("sms", s)] - final[(base, s)]) for s in (0, 1)]
            mean, std, seeds = cell[f"sms-minus-{base}"]
            assert (mean, seeds) == (pytest.approx(sum(diffs) / 2), 2) and std >= 0
        assert math.isfinite(cell["gain"][0]) and cell["ensemble"][2] == 2
    assert {"imp-best", "sms-greedy"} <= set(result["cells"][0]) and "imp-best" not in result["cells"][1]
    assert (out / "gain_vs_steps.png").stat().st_size > 0
    tasks = sorted((out / "cells").glob("*/*.json"))
    written = [p.stat().st_mtime_ns for p in tasks]

    again = run_regimes(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/" not in again.stdout  # every task was found finished
    assert [p.stat().st_mtime_ns for p in tasks] == written
    table = "paired per-seed differences in points\n"
    assert again.stdout.split(table)[1] == first.stdout.split(table)[1]


def test_tabulating_a_folder_without_a_finished_map_names_the_fix(tmp_path, capsys):
    assert regimes.main(["--table", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"regimes: error: {tmp_path} holds no regime map; pass the --out folder of a regimes.py run"
    )
    (tmp_path / "settings.json").write_text(json.dumps(vars(regimes.parse_args(["--tiny"]))))
    assert regimes.main(["--table", str(tmp_path)]) == 2
    assert "run the map first" in capsys.readouterr().err
