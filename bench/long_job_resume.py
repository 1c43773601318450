"""A long job killed and resumed (issue 27, point 7): 200 rounds, 100 clients, each reply
carrying 63 distinct metric names of 128 characters (and num-examples: the 64 entries the gate allows); the job is SIGKILLed mid-run, resumed
with `resume`, and finishes; the checkpoint's size and the per-round write time are printed.

    python bench/long_job_resume.py [--rounds 200] [--clients 100] [--kill-after 120]

The clients run in the job's process (``fedsms_flower.local_grid``) and send the soup back
unchanged through the client toolkit (no training: the history and the checkpoint are what
is measured). The job runs in a child process so the kill is a real SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "m" * 120  # + 8 characters of index: 128-character metric names


def job(out: str, rounds: int, clients: int, resume: bool) -> None:
    """The job itself (the child process)."""
    import torch
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fedsms.checkpoint import load_checkpoint
    from fedsms.config import FederationConfig, RunConfig
    from fedsms.data import load_dataset
    from fedsms.models import build_for
    from fedsms_client import toolkit
    from fedsms_flower.local_grid import LocalGrid, partitions
    from fedsms_server.strategy import SparseSoupStrategy

    torch.set_num_threads(1)
    data = load_dataset("digits")
    app = ClientApp()
    app.query("identity")(toolkit.identity)

    @app.train()
    def train(message: Message, context) -> Message:
        model = build_for("mlp", data)
        soup = toolkit.receive(message, model)
        part = int(context.node_config["partition-id"])
        # 63 names + num-examples: the 64 entries the gate allows a reply
        return soup.reply(model, 10, {f"{NAME}{part:04d}{i:04d}": float(i) for i in range(63)})

    run = RunConfig(model="mlp", phases=2, target_sparsity=0.5, ood=False, diagnostics=False, out_dir=out)
    per_phase = (rounds - 2) // 2
    fed = FederationConfig(
        mode="data", pretrain_rounds=rounds - 2 * per_phase, rounds_per_phase=per_phase, clients_per_round=clients,
        min_train_clients=clients, min_available_clients=clients, fraction_evaluate=0.0, resume=resume,
    )  # fmt: skip
    torch.manual_seed(0)
    strategy = SparseSoupStrategy(run, fed, build_for("mlp", data), server_data=data, log=lambda _: None)
    if resume:
        strategy.restore(load_checkpoint(Path(out) / "checkpoints" / "soup"))
    strategy.start(LocalGrid(app, partitions(clients)))


def checkpoint_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in (out / "checkpoints").iterdir() if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--kill-after", type=int, default=120, help="rounds completed before the SIGKILL")
    p.add_argument("--child", choices=["run", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job(args.out, args.rounds, args.clients, args.child == "resume")
        return
    out = Path(tempfile.mkdtemp(prefix="long-job-"))
    base = [sys.executable, __file__, "--rounds", str(args.rounds), "--clients", str(args.clients), "--out", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen([*base, "--child", "run"])
    lines = out / "rounds.jsonl"
    while not (lines.exists() and len(lines.read_text().splitlines()) >= args.kill_after):
        if child.poll() is not None:
            sys.exit(f"the job ended before round {args.kill_after}")
        time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = len(lines.read_text().splitlines())
    size_at_kill = checkpoint_bytes(out)
    resumed = time.perf_counter()
    subprocess.run([*base, "--child", "resume"], check=True)
    done = [json.loads(line) for line in lines.read_text().splitlines()]
    print(
        f"{args.rounds} rounds x {args.clients} clients x 63 metric names of 128 characters: killed after round "
        f"{killed_at} (checkpoint {size_at_kill / 2**20:.2f} MiB), resumed in {time.perf_counter() - resumed:.0f} s; "
        f"{len(done)} round lines, rounds 1..{done[-1]['server_round']}, each round's train metrics "
        f"{len(done[-1]['train'])} names; final checkpoint {checkpoint_bytes(out) / 2**20:.2f} MiB, "
        f"rounds.jsonl {lines.stat().st_size / 2**20:.2f} MiB; {time.perf_counter() - started:.0f} s in all; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
