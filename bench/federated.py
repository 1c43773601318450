"""Federated soups against masked FedAvg and the local methods, through ``fedsms simulate``.

    python bench/federated.py                    # MNIST-1D, MLP-256, 4 clients, 2 seeds

Per seed, one local run trains the dense model (every federated job starts from its
checkpoint, so all share the start) and the local IMP and SMS (m = number of clients,
the same retraining epochs per candidate as each client). Then, each as a Flower
simulation with the same pruning schedule (P phases to the target sparsity):

- hyperparameter soup: every client holds all the data and retrains with its own
  candidate of the recipe for E epochs; one average per phase.
- data soup, IID and Dirichlet(alpha): every client retrains its own shard for E epochs;
  one average per phase.
- masked FedAvg for each of the three: the same clients, but E rounds per phase of one
  epoch each (the soup averaged after every epoch; E × the soup's bytes), every client with
  the same configuration (the base candidate; seeds still differ by client);
- masked FedAvg at the soup's bytes (``-fedavg-eqbytes``): one round per phase of E epochs,
  every client with the base configuration.

Writes ``OUT/federated.json`` (config, every row, the final-phase table) and each job's
own folder (rounds, results, plots).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import metric_cells, seed_summary

from fedsms import FedSMSError
from fedsms.config import RunConfig
from fedsms.local import run_local


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d-10000")
    parser.add_argument("--model", default="mlp-256")
    parser.add_argument("--data-dir", default="", help="data folder (CIFAR files; MNIST-1D's .npz cache)")
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--retrain-epochs", type=int, default=2, help="E: epochs per client and phase")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--recipe",
        default="weight_decay=1e-4,5e-4;label_smoothing=0,0.1",
        help="candidates of the hyperparameter soup (and of local SMS)",
    )
    parser.add_argument("--dirichlet-alpha", type=float, default=0.3)
    parser.add_argument("--settings", default="hparam,iid,dirichlet", help="comma list of hparam, iid, dirichlet")
    parser.add_argument("--ood-examples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the local runs")
    parser.add_argument("--out", default="results/federated")
    return parser.parse_args(argv)


def jobs(args: argparse.Namespace) -> dict[str, dict]:
    """Method name -> the simulate options that differ between the federated jobs."""
    soup = {"rounds-per-phase": 1, "retrain-epochs": args.retrain_epochs}
    fedavg = {"rounds-per-phase": args.retrain_epochs, "retrain-epochs": 1}
    settings = {
        "hparam": ("hparam", {"mode": "hyperparameter", "recipe": args.recipe}),
        "iid": ("iid", {"mode": "data", "partitioning": "iid"}),
        "dirichlet": (f"dir{args.dirichlet_alpha:g}", {"mode": "data", "partitioning": "dirichlet"}),
    }
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not chosen or any(s not in settings for s in chosen):
        raise FedSMSError(f"--settings must list some of {', '.join(settings)}, got {args.settings!r}")
    out = {}
    for name, setting in (settings[s] for s in chosen):
        out[f"fed-{name}-soup"] = {**setting, **soup}
        # FedAvg: one configuration for every client, so no recipe in the hyperparameter setting.
        out[f"fed-{name}-fedavg"] = {**setting, "recipe": "", **fedavg}
        # Masked FedAvg at the soup's bytes: one average per phase of E epochs, one configuration.
        out[f"fed-{name}-fedavg-eqbytes"] = {**setting, "recipe": "", **soup}
    return out


def simulate(args: argparse.Namespace, seed: int, dense: str, options: dict, out_dir: Path, log) -> list[dict]:
    flags = {
        "dataset": args.dataset,
        "data-dir": args.data_dir,
        "model": args.model,
        "seed": seed,
        "target-sparsity": args.target_sparsity,
        "phases": args.phases,
        "lr": args.lr,
        "batch-size": args.batch_size,
        "dirichlet-alpha": args.dirichlet_alpha,
        "ood-examples": args.ood_examples,
        "init-checkpoint": dense,
        "pretrain-rounds": 0,
        "min-train-clients": args.num_clients,
        "min-available-clients": args.num_clients,
        "fraction-evaluate": 0.0,
        "device": "cpu",
        "out-dir": str(out_dir),
        **options,
    }
    command = [str(Path(sys.executable).with_name("fedsms")), "simulate", "--num-clients", str(args.num_clients)]
    for key, value in flags.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise FedSMSError(
            f"fedsms simulate failed for {out_dir} ({result.stderr.strip().splitlines()[-1:]}); "
            f"rerun its command to see why: {' '.join(command)}"
        )
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    log(f"  {out_dir.name}: final test acc {rows[-1]['accuracy']:.4f}")
    return [{**r, "bytes_down": summary["bytes_down"], "bytes_up": summary["bytes_up"]} for r in rows]


def run(args: argparse.Namespace, log=print) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "federated.json").exists():
        raise FedSMSError(f"{out / 'federated.json'} already exists; pass another --out or remove it")
    planned = jobs(args)  # a bad --settings fails before any training
    started = time.perf_counter()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        local_dir = out / f"seed{seed}" / "local"
        local = RunConfig(
            dataset=args.dataset,
            data_dir=args.data_dir,
            model=args.model,
            seed=seed,
            target_sparsity=args.target_sparsity,
            phases=args.phases,
            candidates=args.num_clients,
            pretrain_epochs=args.pretrain_epochs,
            pretrain_lr=args.lr,
            retrain_epochs=args.retrain_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            recipe=args.recipe,
            methods="imp,sms",
            ood_examples=args.ood_examples,
            device="cpu",
            out_dir=str(local_dir),
        )
        log(f"== seed {seed}: dense, local IMP and SMS ==")
        rows += [{**r, "method": f"local-{r['method']}"} for r in run_local(local, log=lambda _: None)]
        dense = str(local_dir / "checkpoints" / f"seed{seed}-dense")
        for method, options in planned.items():
            log(f"== seed {seed}: {method} ==")
            for row in simulate(args, seed, dense, options, out / f"seed{seed}" / method, log):
                rows.append({**row, "method": method})
    table = final_rows(rows)
    result = {"config": vars(args), "seconds": round(time.perf_counter() - started, 1), "table": table, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated.json").write_text(json.dumps(result, indent=2))
    return result


def final_rows(rows: list[dict]) -> list[dict]:
    """Every method at its last phase (dense: phase 0): mean/std over seeds."""
    last = max(r["phase"] for r in rows)
    order = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for method in order:
        done = [r for r in rows if r["method"] == method and r["phase"] == (0 if method.endswith("dense") else last)]
        entry = {"method": method, **seed_summary(done)}
        if "bytes_up" in done[0]:
            entry["megabytes"] = statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in done) / 1e6
        table.append(entry)
    return table


def format_table(table: list[dict]) -> str:
    width = max(len(r["method"]) for r in table)
    header = f"{'method':>{width}}  {'sparsity':>8}  {'test acc %':>14}  {'OOD acc %':>14}  {'ECE %':>13}  {'MB sent':>7}  seeds"
    lines = [header, "-" * len(header)]
    for r in table:
        cells = metric_cells(r)
        megabytes = f"{r['megabytes']:7.2f}" if "megabytes" in r else f"{'-':>7}"
        lines.append(
            f"{r['method']:>{width}}  {100 * r['sparsity']:7.2f}%  {cells[0]:>14}  {cells[1]:>14}  "
            f"{cells[2]:>13}  {megabytes}  {r['seeds']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except FedSMSError as error:
        print(f"federated: error: {error}", file=sys.stderr)
        return 2
    print()
    print(
        f"{args.dataset} / {args.model}, {args.num_clients} clients, P={args.phases} to {args.target_sparsity:.0%}, "
        f"E={args.retrain_epochs} epochs per client and phase, seeds {args.seeds}, {result['seconds']:.0f} s"
    )
    print(format_table(result["table"]))
    print(f"\nresults: {Path(args.out) / 'federated.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
