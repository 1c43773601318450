"""Smoke runs of the quality benchmarks at tiny size: the documented commands finish and
write the expected rows with finite values (never timings)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import write_cifar10

BENCH = Path(__file__).resolve().parent.parent / "bench"
MNIST1D = ["--dataset", "mnist1d-300", "--model", "mlp-16", "--sparsities", "0.5,0.8"]
LOCAL_METHODS = {"dense", "imp", "imp-long", "imp-best", "sms", "sms-greedy", "ensemble"}
TINY = [
    "--phases",
    "2",
    "--candidates",
    "2",
    "--pretrain-epochs",
    "1",
    "--retrain-epochs",
    "1",
    "--ood-examples",
    "20",
    "--batch-size",
    "32",
]


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_quality(out: Path, sparsities: list[float], seeds: int) -> dict:
    result = json.loads((out / "quality.json").read_text())
    table = result["table"]
    assert {(r["target_sparsity"], r["method"]) for r in table} == {(s, m) for s in sparsities for m in LOCAL_METHODS}
    for row in table:
        assert row["seeds"] == seeds
        for key in ("accuracy", "ood_accuracy", "ece", "accuracy_std", "ood_accuracy_std", "ece_std"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        if row["method"] != "dense":
            assert row["sparsity"] == pytest.approx(row["target_sparsity"], abs=0.01)
    assert set(result["checks"]) == {f"{s:g}" for s in sparsities}
    # A tiny run cannot show SMS ahead of IMP, but each gap must be the mean of the per-seed
    # differences of the final-phase rows
    rows = result["rows"]
    last = max(r["phase"] for r in rows)
    final = {(r["target_sparsity"], r["method"], r["seed"]): r for r in rows if r["phase"] == last}
    seed_list = sorted({r["seed"] for r in rows})
    for s in sparsities:
        check = result["checks"][f"{s:g}"]
        expected = {
            f"{p}{a}-minus-{b}"
            for p in ("", "ood-")
            for a in ("sms", "sms-greedy")
            for b in ("imp", "imp-long", "imp-best")
        }
        assert set(check["gaps"]) == expected
        for key, gap in check["gaps"].items():
            metric = "ood_accuracy" if key.startswith("ood-") else "accuracy"
            a, b = key.removeprefix("ood-").split("-minus-")
            diffs = [100 * (final[(s, a, seed)][metric] - final[(s, b, seed)][metric]) for seed in seed_list]
            assert gap["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)
            assert gap["std"] >= 0
        assert check["target_met"] is all(g["mean"] >= 0 for k, g in check["gaps"].items() if not k.startswith("ood-"))
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0 and (out / "id_vs_ood.png").stat().st_size > 0
    return result


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quality")
    out = base / "quality"
    printed = run_bench(
        "quality.py",
        *MNIST1D,
        "--seeds",
        "0,1",
        "--data-dir",
        str(base / "data"),
        "--out",
        str(out),
        *TINY,
    )
    return base, out, printed


@pytest.mark.slow  # a real MNIST-1D run (seconds of training)
def test_quality_table_on_mnist1d(mnist1d_run):
    base, out, printed = mnist1d_run
    check_quality(out, [0.5, 0.8], seeds=2)
    assert "sms-greedy" in printed and "SMS minus baseline" in printed
    assert (base / "data" / "mnist1d-300.npz").exists()
    # the two seeds ran as two processes (--jobs 2, the default), each in its own folder
    assert [
        sorted({r["seed"] for r in json.loads((out / "jobs" / k / "quality.json").read_text())["rows"]}) for k in "01"
    ] == [[0], [1]]
    # the dense model is trained once per seed: later sparsities start from its checkpoint
    dense = [json.loads(line) for line in (out / "jobs" / "0" / "s80" / "results.jsonl").read_text().splitlines()]
    assert all(r.get("source", "").endswith("-dense") for r in dense if r["method"] == "dense")


@pytest.mark.slow
def test_quality_runs_over_disjoint_seeds_merge_into_one_table(mnist1d_run, tmp_path):
    base, out, _ = mnist1d_run
    other = tmp_path / "other"
    run_bench(
        "quality.py",
        *MNIST1D,
        "--seeds",
        "2",
        "--data-dir",
        str(base / "data"),
        "--out",
        str(other),
        *TINY,
    )
    run_bench("quality.py", "--merge", str(out), str(other), "--out", str(tmp_path / "merged"))
    merged = check_quality(tmp_path / "merged", [0.5, 0.8], seeds=3)
    assert merged["config"]["seeds"] == "0,1,2"
    refused = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--merge", str(out), str(out), "--out", str(tmp_path / "twice")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "disjoint seeds" in refused.stderr


@pytest.mark.slow
def test_quality_table_runs_the_cifar_path(tmp_path):
    write_cifar10(tmp_path / "cifar" / "cifar-10-batches-bin", per_file=8)
    out = tmp_path / "quality"
    run_bench(
        "quality.py",
        "--dataset",
        "cifar10",
        "--model",
        "resnet20",
        "--data-dir",
        str(tmp_path / "cifar"),
        "--sparsities",
        "0.5",
        "--seeds",
        "0",
        "--out",
        str(out),
        *TINY,
    )
    result = check_quality(out, [0.5], seeds=1)
    assert result["config"]["dataset"] == "cifar10" and result["config"]["model"] == "resnet20"


def test_quality_refuses_to_overwrite(tmp_path):
    (tmp_path / "quality.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "already exists; pass another --out" in result.stderr


@pytest.mark.slow
def test_federated_table(tmp_path, flwr_home):
    out = tmp_path / "federated"
    printed = run_bench(
        "federated.py",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--num-clients",
        "2",
        "--seeds",
        "0",
        "--phases",
        "1",
        "--pretrain-epochs",
        "1",
        "--retrain-epochs",
        "2",
        "--recipe",
        "weight_decay=1e-4,5e-4",
        "--ood-examples",
        "20",
        "--settings",
        "hparam,dirichlet",
        "--out",
        str(out),
    )
    table = json.loads((out / "federated.json").read_text())["table"]
    expected = {"local-dense", "local-imp", "local-sms", "local-ensemble"} | {
        f"fed-{s}-{k}" for s in ("hparam", "dir0.3") for k in ("soup", "fedavg", "fedavg-eqbytes")
    }
    assert {r["method"] for r in table} == expected
    for row in table:
        assert all(math.isfinite(row[k]) for k in ("accuracy", "ood_accuracy", "ece"))
        if row["method"].startswith("fed-"):
            assert row["sparsity"] == pytest.approx(0.9, abs=0.01) and row["megabytes"] > 0
    assert "fed-dir0.3-fedavg" in printed
