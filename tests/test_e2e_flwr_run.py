"""`flwr run .` with a local simulation federation: fedsms plugged into Flower's own CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsms_flower.deployment import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_local_simulation(tmp_path, flwr_home):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    overrides = (
        f"phases=1 target-sparsity=0.5 pretrain-epochs=2 retrain-epochs=1 ood-examples=50 "
        f"min-train-clients=3 min-available-clients=3 device='cpu' out-dir='{out}'"
    )
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                ".",
                "--stream",
                "--run-config",
                overrides,
                "--federation-config",
                "num-supernodes=3",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        # `flwr run` leaves its local SuperLink running in the background; it lives in our FLWR_HOME.
        subprocess.run(["pkill", "-f", str(flwr_home)], check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "job finished" in result.stdout
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1]
    assert all(r["accepted"] == 3 for r in rounds)
    assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert (out / "final_model.safetensors").is_file()
