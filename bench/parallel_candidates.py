"""Parallel candidates: time to one phase's soup with m candidates as m client processes against one after another.

    python bench/parallel_candidates.py [--m 2] [--epochs 3] [--phases 2] [--model cnn]
                                        [--repeats 5] [--out results/parallel_candidates.json]

A hyperparameter soup of m candidates (the digits cnn, every candidate on the whole train
split, 90 % sparsity over ``--phases`` phases of one round, ``--epochs`` epochs per
candidate, ``diagnostics = false``: the server does not keep the m candidates for the
phase-end analysis), timed three ways, alternating, each run in a child process of its own, one
torch thread in every process:

- *federated, m processes*: the real federated path, short of the network: fedsms's
  ``SparseSoupStrategy`` in the server process and the fedsms ClientApp in m client
  processes (``bench/process_grid.ProcessGrid``: every message and reply crosses the
  process boundary as Flower's protobuf bytes; a free client process takes the next
  message), so the m candidates train at once;
- *federated, 1 process*: the same, with one client process that trains the m candidates
  one after the other (isolates the parallelism from the protocol);
- *sequential*: the m candidates one after another in one process, no federation: for each
  candidate ``fedsms.candidates.train_one`` (what ``CandidateTrainer`` runs) from the same
  pruned start state, mask and ``CandidateConfig`` as the federated phase sent (captured
  from the last federated run), then ``fedsms.soup.average`` — what a single machine does.

*What is timed.* A phase's time runs from the start of ``configure_train`` of its round
(the server's prune that opens the phase, the soup payload and the m messages are in) to
the end of ``merge_replies`` (every reply decoded, checked and averaged into the soup): send, train, reply, merge. The sequential arm times training
the m candidates and averaging them. Excluded everywhere: process start-up (spawn, imports,
the ClientApp build), the first round (dense pretraining, which also loads each client's
data and warms it up; the sequential arm trains one untimed epoch instead), and what
follows the soup at a phase end (greedy choice, BatchNorm recalibration, evaluation,
checkpoint), which a single machine would do as well. Why not Flower's simulation or
real ``fedsms-client`` processes: the Ray engine's daemons take a 2-core machine's cores
from the clients, and a SuperNode starts a fresh ClientApp process per message whose
imports (seconds) would be timed as part of the phase; ``ProcessGrid`` keeps the client
processes warm and leaves only Flower's network transport out. Not
``CandidateTrainer(workers=m)`` either: it would skip the encode, the wire and the
checked decode of the federated path.

*CPU seconds.* Wall times on a shared 2-core machine move by tens of percent from run to
run; the CPU time of the candidates does not. ``candidates cpu s`` is the sum over the
m candidates of the CPU seconds of their work (federated: ``time.process_time`` of each
ClientApp call in its client process, from ``ProcessGrid.worker``; sequential: of each
``train_one`` call). Equal figures in the three arms mean the federated client adds no
work per message; a wall-time gap with equal CPU is the machine's load, not the code. (The
first such gap, 0.7 s per phase between federated_1 and sequential in a 1-repeat check at
load 8-9, was that: in one process the ClientApp's own work around ``train_candidate``,
i.e. job settings, data look-up, model, soup decode and reply encode, is about 6 ms per
message against about 1 s of training, see BENCHMARKS.md.)

Headline: speed-up = sequential / federated-m (target >= 1.6x for m = 2 on 2 cores).
Sanity in the JSON: the m client processes' training intervals of each phase overlap in
the m-process arm (m distinct client processes) and never in the 1-process arm, and the
server accepted all m replies of every phase.

*Extending to m machines* (one candidate per machine): a phase takes the slowest
candidate's training plus the transfer of the soup down and m replies up plus the
server's encode and aggregation. The table splits each phase in two: *candidates* = the
time during which at least one candidate was being worked on (federated: the union of the
ClientApp calls, i.e. decode of the soup, training, encode of the reply; with m processes
this is the slowest candidate, with one process the sum of all; sequential: the sum of
the ``train_one`` calls) and *rest* = phase minus that: the server's encode, the
serialisation both ways, the checked decode and the averaging (sequential: the
averaging). Over a network the transfer adds bytes / bandwidth, the bytes being the
``down B`` (m soups) and ``up B`` (m replies) columns. See BENCHMARKS.md for the measured figures of
aggregation and the wire at larger sizes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

from common import interleaved, median, parser, report
from federation_overhead import in_child
from process_grid import ProcessGrid, fedsms_client_app


def fedsms_config(out_dir: str, job: dict) -> dict:
    return {
        "model": job["model"],
        "dataset": "digits",
        "mode": "hyperparameter",
        "candidates": job["m"],
        "phases": job["phases"],
        "pretrain-rounds": 1,
        "rounds-per-phase": 1,
        "target-sparsity": 0.9,
        "pretrain-epochs": 1,
        "retrain-epochs": job["epochs"],
        "lr": 0.05,
        "pretrain-lr": 0.05,
        "batch-size": 64,
        "ood": False,
        "diagnostics": False,  # analysis, not training: see the docstring
        "fraction-evaluate": 0.0,
        "min-train-clients": job["m"],
        "min-available-clients": job["m"],
        "device": "cpu",
        "out-dir": out_dir,
    }


def overlapping(busy: list[tuple[int, float, float]]) -> bool:
    """Whether every interval overlaps every other (all m were running at one moment)."""
    return max(b for _, b, _ in busy) < min(e for _, _, e in busy)


def union_s(busy: list[tuple[int, float, float]]) -> float:
    """Seconds during which at least one client process was in its ClientApp."""
    total, reach = 0.0, -float("inf")
    for _, began, ended in sorted(busy, key=lambda x: x[1]):
        total += max(0.0, ended - max(began, reach))
        reach = max(reach, ended)
    return total


def run_federated(job: dict, workers: int) -> dict:
    """One federated job with ``workers`` client processes; per phase its time, split and inputs."""
    import logging

    import torch

    from fedsms.config import split_config
    from fedsms.schedule import round_candidate
    from fedsms_flower.local_grid import partitions
    from fedsms_server.app import build_strategy

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    phases: list[dict] = []
    with (
        ProcessGrid(fedsms_client_app, partitions(job["m"]), workers=workers) as grid,
        tempfile.TemporaryDirectory() as out_dir,
    ):
        strategy = build_strategy(*split_config(fedsms_config(out_dir, job)), log=lambda line: None)
        configure, aggregate = strategy.configure_train, strategy.merge_replies
        phase_of = lambda server_round: strategy.schedule[server_round - 1].phase  # noqa: E731

        def configure_train(server_round, *a, **kw):
            if phase_of(server_round) == 0:
                return configure(server_round, *a, **kw)
            # numpy: torch tensors would leave the child process as shared-memory handles
            start = {k: v.numpy().copy() for k, v in strategy.soup.items()}
            mask = {k: v.numpy().copy() for k, v in strategy.mask.items()}
            mark = (len(grid.busy), grid.wait_s, grid.bytes_down, grid.bytes_up)  # grid.worker: aligned with busy
            began = time.perf_counter()
            messages = configure(server_round, *a, **kw)
            phase = phase_of(server_round)
            configs = [
                round_candidate(strategy.run, strategy.fed.mode, i, phase, server_round) for i in range(len(messages))
            ]
            phases.append({"began": began, "mark": mark, "inputs": (start, mask, configs)})
            return messages

        def merge_replies(server_round, *a, **kw):
            result = aggregate(server_round, *a, **kw)
            if phase_of(server_round) > 0:
                ended = time.perf_counter()
                phase = phases[-1]
                busy_from, wait0, down0, up0 = phase.pop("mark")
                busy = grid.busy[busy_from:]
                worker = grid.worker[busy_from:]
                phase.update(
                    phase_s=ended - phase.pop("began"),
                    busy=busy,
                    clients_s=union_s(busy),
                    clients_cpu_s=sum(w["app_cpu_s"] for w in worker),
                    client_serde_s=sum(w["serde_s"] for w in worker),
                    wait_s=grid.wait_s - wait0,
                    bytes_down=grid.bytes_down - down0,
                    bytes_up=grid.bytes_up - up0,
                    server_round=server_round,  # its accepted count is read from the round's record below
                    overlap=overlapping(busy),
                    processes=len({pid for pid, _, _ in busy}),
                )
            return result

        strategy.configure_train, strategy.merge_replies = configure_train, merge_replies
        strategy.start(grid)
        accepted = {log.server_round: log.accepted for log in strategy.rounds}
        for phase in phases:
            phase["accepted"] = accepted[phase.pop("server_round")]
    return {"phases": phases, "load": os.getloadavg()[0]}


def run_sequential(job: dict, inputs: list[tuple]) -> dict:
    """The captured phases' m candidates trained one after another in this process, then averaged."""
    from dataclasses import replace

    import torch

    from fedsms.candidates import train_one
    from fedsms.config import split_config
    from fedsms.data import load_dataset
    from fedsms.models import build_for
    from fedsms.soup import average

    torch.set_num_threads(1)
    run, _ = split_config(fedsms_config("unused", job))
    splits = load_dataset(run.dataset, heldout_fraction=run.heldout_fraction, seed=run.seed)
    model = build_for(run.model, splits)
    cpu = torch.device("cpu")
    inputs = [
        ({k: torch.from_numpy(v) for k, v in start.items()}, {k: torch.from_numpy(v) for k, v in mask.items()}, configs)
        for start, mask, configs in inputs
    ]
    start, mask, configs = inputs[0]
    train_one(model, start, mask, splits, replace(configs[0], epochs=1), cpu)  # warm-up, untimed
    phases = []
    for start, mask, configs in inputs:
        began = time.perf_counter()
        trained, cpu_s = [], 0.0
        for config in configs:
            t, c = time.perf_counter(), time.process_time()
            trained.append((train_one(model, start, mask, splits, config, cpu), time.perf_counter() - t))
            cpu_s += time.process_time() - c
        average([state for (state, _), _ in trained], mask)
        phases.append(
            {
                "phase_s": time.perf_counter() - began,
                "clients_s": sum(seconds for _, seconds in trained),
                "clients_cpu_s": cpu_s,
                "examples": [metrics["num_examples"] for (_, metrics), _ in trained],
            }
        )
    return {"phases": phases, "load": os.getloadavg()[0]}


ARMS = ("federated_m", "federated_1", "sequential")


def main() -> None:
    p = parser(__doc__, "results/parallel_candidates.json", repeats=5)
    p.add_argument("--m", type=int, default=min(2, os.cpu_count() or 1), help="candidates = client processes")
    p.add_argument("--epochs", type=int, default=3, help="retraining epochs per candidate and phase")
    p.add_argument("--phases", type=int, default=2)
    p.add_argument("--model", default="cnn")
    args = p.parse_args()
    job = {"m": args.m, "epochs": args.epochs, "phases": args.phases, "model": args.model}
    if args.tiny:
        job.update(epochs=1, phases=1)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    captured: list = []

    def federated(arm: str, workers: int) -> Callable[[], float]:
        def run() -> float:
            result = in_child(run_federated, job, workers)
            captured[:] = [phase.pop("inputs") for phase in result["phases"]]
            runs[arm].append(result)
            return median([phase["phase_s"] for phase in result["phases"]])

        return run

    def sequential() -> float:
        result = in_child(run_sequential, job, captured)
        runs["sequential"].append(result)
        return median([phase["phase_s"] for phase in result["phases"]])

    interleaved(
        {
            "federated_m": federated("federated_m", args.m),
            "federated_1": federated("federated_1", 1),
            "sequential": sequential,
        },
        1 if args.tiny else args.repeats,
        warmup=0,
    )

    rows = []
    for arm in ARMS:
        phases = [phase for run in runs[arm] for phase in run["phases"]]
        loads = [run["load"] for run in runs[arm]]
        row = {
            "arm": arm,
            "m": job["m"],
            "processes": job["m"] if arm == "federated_m" else 1,
            "phase_s": median([p["phase_s"] for p in phases]),
            "clients_s": median([p["clients_s"] for p in phases]),
            "clients_cpu_s": median([p["clients_cpu_s"] for p in phases]),
            "phases_timed": len(phases),
            "load": f"{min(loads):.1f}-{max(loads):.1f}",
        }
        row["rest_s"] = median([p["phase_s"] - p["clients_s"] for p in phases])
        if arm != "sequential":
            row.update(
                bytes_down=median([p["bytes_down"] for p in phases]),
                bytes_up=median([p["bytes_up"] for p in phases]),
                overlap=[p["overlap"] for p in phases],
                client_processes=[p["processes"] for p in phases],
                accepted=[p["accepted"] for p in phases],
            )
        else:
            row.update(bytes_down=0, bytes_up=0, examples=[p["examples"] for p in phases])
        rows.append({**row, "runs": runs[arm]})
    by = {row["arm"]: row for row in rows}
    for row in rows:
        row["speedup_vs_sequential"] = by["sequential"]["phase_s"] / row["phase_s"]
    report(
        args.out,
        rows,
        [
            ("arm", "arm", "s"),
            ("m", "m", "d"),
            ("processes", "client procs", "d"),
            ("phase_s", "phase s", ".3f"),
            ("clients_s", "candidates s", ".3f"),
            ("clients_cpu_s", "candidates cpu s", ".3f"),
            ("rest_s", "rest s", ".3f"),
            ("bytes_down", "down B", ".0f"),
            ("bytes_up", "up B", ".0f"),
            ("speedup_vs_sequential", "speed-up", ".2f"),
            ("load", "load 1 min", "s"),
        ],
        job=job,
        speedup=by["sequential"]["phase_s"] / by["federated_m"]["phase_s"],
        speedup_vs_federated_1=by["federated_1"]["phase_s"] / by["federated_m"]["phase_s"],
        target="federated m-process phase >= 1.6x faster than sequential (m = 2, 2 cores)",
    )


if __name__ == "__main__":
    main()
