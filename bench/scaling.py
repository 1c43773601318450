"""Scaling: round time and server memory of ``fedsms simulate`` from 2 to 32 clients, and where a round's time goes.

    python bench/scaling.py [--clients 2 4 8 16 32] [--repeats 1] [--out results/scaling.json]

A data soup of the digits cnn (each client an IID shard of the train split, so the total
training work per round is the same at every size), 1 dense round then 2 phases of two
rounds, 1 epoch per round, 1 CPU per virtual client (2 clients train at once on this
machine), the server evaluating on the test split, no federated evaluation. Each size
runs in its own child process, which is the server process (ServerApp, strategy and
Flower's simulation engine; clients run in Ray worker processes).

Split of a round (medians over rounds 2-5: round 1 carries the Ray workers' start-up),
measured by timing the strategy's hooks in the server process and by the clients' own
``train_seconds``:

- server encode: ``configure_train`` (pruning where a phase opens, the soup payload, messages);
- server aggregate: ``merge_replies`` (what ``aggregate_train`` runs: every reply unpacked,
  decoded and streamed into the average), less the phase end inside it;
- server recalibrate: ``PhaseEnd.begin`` (greedy choice and BatchNorm recalibration at a phase end);
- server evaluate: ``aggregate_evaluate`` (test-set evaluation, the round's JSON line, and
  the checkpoint, also shown on its own: ``JobRecorder.end_round``);
- client training: sum of the clients' ``train_candidate`` seconds / 2 parallel workers;
- rest: Flower's transport and scheduling, and client-side work outside training (app
  start-up per message, data shard, model build, decode of the soup, encode of the reply).

Server memory: the server process's peak RSS (VmHWM) and its growth over the RSS just
before the simulation started.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common import median, parser, peak_rss, peak_rss_reset, report, rss, simulate_in_process
from federation_overhead import SERVER_PARTS, fedsms_config, in_child, instrument, round_seconds, server_split

PARALLEL = min(2, os.cpu_count() or 1)  # 1 CPU per virtual client


def run_scaled(clients: int, epochs: int) -> dict:
    totals, stamps = instrument()
    peak_rss_reset()
    before = rss()
    with tempfile.TemporaryDirectory() as out_dir:
        simulate_in_process(fedsms_config(out_dir, clients, epochs, phases=2, mode="data", partitioning="iid"), clients)
        logs = [json.loads(line) for line in (Path(out_dir) / "rounds.jsonl").read_text().splitlines()]
    rounds = round_seconds(stamps)
    splits = []
    for log, wall in list(zip(logs, rounds))[1:]:
        split = server_split(totals, log["server_round"])
        split["client_train_s"] = log["train"]["train_seconds"] * log["accepted"] / PARALLEL
        split["rest_s"] = wall - sum(split[key] for key in (*SERVER_PARTS, "client_train_s"))
        splits.append({"round_s": wall, **split})
    return {
        "rounds": splits,
        "rss_before": before,
        "peak_rss": peak_rss(),
        "bytes_down": sum(log["bytes_down"] for log in logs),
        "bytes_up": sum(log["bytes_up"] for log in logs),
    }


PARTS = ["round_s", *SERVER_PARTS, "checkpoint_s", "client_train_s", "rest_s"]


def main() -> None:
    p = parser(__doc__, "results/scaling.json", repeats=1)
    p.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    sizes = [2, 4] if args.tiny else args.clients
    rows = []
    for clients in sizes:
        runs = [in_child(run_scaled, clients, args.epochs) for _ in range(args.repeats)]
        rounds = [r for run in runs for r in run["rounds"]]
        row = {
            "clients": clients,
            **{part: median([r[part] for r in rounds]) for part in PARTS},
            "server_peak_rss": max(run["peak_rss"] for run in runs),
            "server_growth": max(run["peak_rss"] - run["rss_before"] for run in runs),
            "bytes_per_client_round": runs[0]["bytes_up"] / (len(runs[0]["rounds"]) * clients),
        }
        row["per_client_s"] = row["round_s"] / clients
        rows.append({**row, "runs": runs})
    report(
        args.out,
        rows,
        [
            ("clients", "clients", "d"),
            ("round_s", "round s", ".2f"),
            ("per_client_s", "s/client", ".3f"),
            ("encode_s", "encode", ".3f"),
            ("aggregate_s", "aggregate", ".3f"),
            ("recalibrate_s", "recalibrate", ".3f"),
            ("evaluate_s", "evaluate", ".3f"),
            ("checkpoint_s", "of which ckpt", ".3f"),
            ("client_train_s", "train", ".2f"),
            ("rest_s", "Flower+client rest", ".2f"),
            ("server_peak_rss", "server peak B", "d"),
            ("server_growth", "growth B", "d"),
        ],
        parallel_clients=PARALLEL,
    )


if __name__ == "__main__":
    main()
