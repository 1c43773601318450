"""Does the soup help gradual magnitude pruning as it helps IMP? IMP, SMS, GMP, GMP-soup and
masked FedAvg on the GMP schedule, at three sparsities × several seeds, one epoch budget.

    python bench/gmp_quality.py --dataset digits --model mlp --sparsities 0.9,0.95,0.98 \\
        --seeds 0,1,2 --out results/gmp_quality.json

Budget: every method starts from the same dense model (``--pretrain-epochs``) and then
trains P × retrain-epochs epochs per model: IMP/SMS as P phases of ``--retrain-epochs``,
GMP/GMP-soup as ``--gmp-updates`` cubic-schedule mask updates sharing those epochs, and
masked FedAvg as one federated round per GMP update in which each of ``--clients`` clients
trains the same number of epochs on its IID shard (the data-soup mode of
``SparseSoupStrategy`` with ``pruning-schedule = "gmp"``; the server prunes after each
aggregation). SMS and GMP-soup average ``--candidates`` candidates per phase/update.

Masked FedAvg drives the real ``SparseSoupStrategy`` in this process (codec payloads both
ways, the client's decode → masked train → encode) instead of a Flower simulation: a Ray
start per (sparsity, seed) would cost more than the training on this scale, and the
transport is not what is compared. Prints test accuracy (%) mean ± std over seeds per
method and sparsity, and the soup's gain over its single-model method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedsms.checkpoint import load_checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.local import LocalRun
from fedsms.models import build_for
from fedsms.report import mean_std
from fedsms.schedule import gmp_steps, num_updates
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import LocalGrid, partitions
from fedsms_server.strategy import SparseSoupStrategy

LOCAL_METHODS = ("imp", "sms", "gmp", "gmp-soup")
FEDAVG = "fedavg-gmp"


def masked_fedavg(run: LocalRun, clients: int, out_dir: Path) -> dict:
    """Masked FedAvg on the GMP schedule from ``run``'s dense model; its final row."""
    config = run.config
    updates = num_updates(config)
    epochs = gmp_steps(config)[0].epochs  # one round per update; main() made the intervals equal
    # One phase per update and one round per phase, so each round opens with the server's prune.
    fed_run = RunConfig.from_mapping({"phases": updates, "retrain_epochs": epochs, "gmp_updates": 0}, base=config)
    fed = FederationConfig(
        mode="data", pruning_schedule="gmp", pretrain_rounds=0, min_train_clients=clients, fraction_evaluate=0.0
    )
    model = build_for(config.model, run.splits)
    model.load_state_dict(load_checkpoint(out_dir / "checkpoints" / f"seed{config.seed}-dense").state)
    strategy = SparseSoupStrategy(
        fed_run, fed, model, server_data=run.splits, out_dir=out_dir / "fedavg", log=lambda _: None
    )
    # The built-in ClientApp on IID shards (its partition is seeded by the job's seed, as the
    # local methods' data is), through the strategy's own loop in this process.
    client_app = make_client_app(data_fn=lambda *_: run.splits)
    strategy.start(LocalGrid(client_app, partitions(clients)))
    return {**strategy.recorder.phase_rows()[-1], "method": FEDAVG}


def final_rows(rows: list[dict]) -> list[dict]:
    """Each method's row at its own last phase (GMP counts updates, not phases)."""
    last = {}
    for row in rows:
        if row["method"] in LOCAL_METHODS and row["phase"] >= last.get(row["method"], {"phase": -1})["phase"]:
            last[row["method"]] = row
    return list(last.values())


def table(results: list[dict], sparsities: list[float], methods: list[str]) -> str:
    cell = {}
    for method in methods:
        for s in sparsities:
            values = [100 * r["accuracy"] for r in results if r["method"] == method and r["target_sparsity"] == s]
            if values:
                cell[(method, s)] = mean_std(values)
    header = f"{'method':>11}  " + "  ".join(f"{f'{s:.0%} sparse':>15}" for s in sparsities)
    lines = [header, "-" * len(header)]
    for method in methods:
        lines.append(
            f"{method:>11}  "
            + "  ".join(
                f"{f'{cell[(method, s)][0]:6.2f} ± {cell[(method, s)][1]:4.2f}':>15}"
                if (method, s) in cell
                else f"{'':>15}"
                for s in sparsities
            )
        )
    for soup, single in (("sms", "imp"), ("gmp-soup", "gmp")):
        gains = [
            cell[(soup, s)][0] - cell[(single, s)][0] if (soup, s) in cell and (single, s) in cell else None
            for s in sparsities
        ]
        lines.append(f"{soup + ' gain':>11}  " + "  ".join(f"{'' if g is None else f'{g:+.2f}':>15}" for g in gains))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", default="digits", help="any data set fedsms loads (e.g. mnist1d once it has a loader)"
    )
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--model", default="mlp")
    parser.add_argument(
        "--sparsities", default="0.9,0.95,0.98", help="digits is easy: methods separate only when very sparse"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--phases", type=int, default=3, help="IMP/SMS phases P")
    parser.add_argument("--retrain-epochs", type=int, default=4, help="epochs per phase: the budget is P × this")
    parser.add_argument("--gmp-updates", type=int, default=6, help="GMP mask updates within the same budget")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=4, help="m: candidates per soup")
    parser.add_argument("--clients", type=int, default=4, help="masked FedAvg clients (0: skip masked FedAvg)")
    parser.add_argument("--ood", action="store_true", help="also evaluate under corruptions (slower)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 is far faster for small models on a shared machine"
    )
    parser.add_argument("--out", default="results/gmp_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.clients and (args.phases * args.retrain_epochs) % args.gmp_updates:
        parser.error(
            "masked FedAvg trains whole epochs per round: make --gmp-updates divide "
            "--phases × --retrain-epochs, or pass --clients 0"
        )
    methods = [*LOCAL_METHODS, *([FEDAVG] if args.clients else [])]
    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for sparsity in sparsities:
            for seed in seeds:
                out_dir = Path(scratch) / f"s{sparsity}-seed{seed}"
                config = RunConfig(
                    dataset=args.dataset,
                    data_dir=args.data_dir,
                    model=args.model,
                    target_sparsity=sparsity,
                    phases=args.phases,
                    retrain_epochs=args.retrain_epochs,
                    gmp_updates=args.gmp_updates,
                    pretrain_epochs=args.pretrain_epochs,
                    candidates=args.candidates,
                    methods=",".join(LOCAL_METHODS),
                    ood=args.ood,
                    seed=seed,
                    out_dir=str(out_dir),
                )
                run = LocalRun(config, log=lambda _: None)
                try:
                    rows = final_rows(run.run())
                    if args.clients:
                        rows.append(masked_fedavg(run, args.clients, out_dir))
                finally:
                    run.close()
                for row in rows:
                    results.append({**row, "target_sparsity": sparsity, "seed": seed})
                print(
                    f"sparsity {sparsity:.0%} seed {seed}: "
                    + ", ".join(f"{r['method']} {100 * r['accuracy']:.2f}" for r in rows)
                    + f" ({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    print(
        f"\ntest accuracy (%), mean ± std over {len(seeds)} seeds; {args.dataset}/{args.model}, budget "
        f"{args.phases}×{args.retrain_epochs} epochs after {args.pretrain_epochs} dense, m={args.candidates}, "
        f"{args.gmp_updates} GMP updates, {args.clients} FedAvg clients"
    )
    printed = table(results, sparsities, methods)
    print(printed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": results, "table": printed}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
