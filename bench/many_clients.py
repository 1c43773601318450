"""Many clients: round time and server memory of fedsms against Flower's ``FedAvg``, 100 clients, 10 sampled per round.

    python bench/many_clients.py [--clients 100] [--per-round 10] [--model cnn] [--epochs 1]
                                 [--repeats 3] [--out results/many_clients.json]

Both arms run the same job shape in one run of this script, alternating (fedsms, FedAvg,
FedAvg, fedsms, ...), each run in a child process of its own, which is the *server
process*:

- fedsms: ``SparseSoupStrategy`` (``fedsms_server.app.build_strategy``), a data soup
  (``mode = data``, IID shards) with ``clients-per-round = 10`` of 100, 1 dense round then
  2 phases of 3 rounds to 90 % sparsity (7 rounds), ``diagnostics = false``, the fedsms
  ClientApp (which keeps its model between messages of a process, ``ModelPool``);
- FedAvg: ``flwr.serverapp.strategy.FedAvg`` with ``fraction_train = 0.1`` of the same 100
  nodes (``min_train_nodes = 10``), 7 rounds, and a plain Flower ClientApp that loads the
  dense ``ArrayRecord``, trains the client's shard with the same ``train_candidate`` loop
  and the same hyperparameters (fedsms's data-soup candidate, sent in the train config;
  no mask) and returns the dense ``ArrayRecord`` with ``num-examples``.

Same model (the digits cnn; ``--model mlp-2048`` for a 4.3 M-weight one), same shards
(``fedsms.data.partition``, the fedsms client's seed), same number of sampled clients
(each strategy draws its own 10: the shards are IID and of equal size, so the work per
round is the same), 1 epoch per round, batch 64, no federated evaluation; both servers
evaluate the model on the test split every round (FedAvg through ``evaluate_fn``).

*What runs the clients.* ``bench/process_grid.ProcessGrid``: two client processes (this
machine has 2 cores), one torch thread each, taking the next message when free; every
message and reply crosses as Flower's protobuf bytes. The server process has one torch
thread too. It is the same for both arms, so the ratio measures the server and the
protocol (what each strategy sends, parses and merges) on top of identical training. It
is neither Flower's Ray simulation engine (whose daemons compete for 2 cores, see
``bench/federation_overhead.py``) nor the in-process ``LocalGrid`` (which skips
serialisation and would count the clients' training memory as the server's).

*What is timed.* A round is the time between two ends of the server's per-round evaluation
(FedAvg's ``evaluate_fn``, fedsms's ``aggregate_evaluate``); round 1 carries the clients' first
data load and is left out: figures are medians over rounds 2-7 of all runs of an arm.
Because identical training can hide the server's share, each round is also split:
*server* = round time minus the time the server blocked waiting for replies (everything
the server process computes: sampling, encoding, serialising, parsing, merging,
evaluating, and fedsms's pruning, recalibration and checkpoint), and of it *aggregate* =
the strategy's ``aggregate_train`` (fedsms: decode and streaming masked average; FedAvg:
``aggregate_arrayrecords`` over the held replies) and *serde* = protobuf serialisation
of the messages and parsing of the replies. Excluded: process start-up (spawn, imports,
building the apps), the job's set-up before its first round (data, model, strategy).

*Median and mean.* The headline is the median round, which is a plain training round in
both arms; the *mean* round (the job's time over rounds 2-7 divided by the rounds) is shown
beside it, with its ratio, because fedsms's rounds are not all alike: the first round of
a phase prunes and the last ends the phase on the server (greedy choice, norm
recalibration on the server's data, evaluation); FedAvg has no phases. fedsms runs with
``diagnostics = false``: the soup diagnostics (on by default) evaluate every candidate,
their ensemble and interpolation lines at each phase end and keep the round's candidates
in server memory; FedAvg does nothing like it. With them on, a phase-end round took
2.5 s more server time than a plain one (digits cnn, 10 candidates, load 5) and the mean
round was 2.9x FedAvg's while the median was 0.92x.

*Client work per message.* ``client cpu ms/msg`` is the CPU time of one ClientApp call in
its client process (``ProcessGrid.worker``, ``time.process_time``), the mean over every
reply of rounds 2-7: the fedsms ClientApp (job settings, data look-up, model from the
process's ``ModelPool``, checked soup decode, 1 epoch under the mask, reply encode)
against the FedAvg app (dense ``ArrayRecord`` in, model built, 1 epoch, dense
``ArrayRecord`` out). With 13 examples per client (the digits train split over 100
clients) one epoch is one step, so this is mostly per-message overhead. The protobuf
parse and serialisation in the client process is outside it (in the grid's wait).

*Server memory.* The server process's peak RSS (VmHWM, ``clear_refs`` reset after the
set-up) and its growth over the RSS at that point; the client processes are not in it.

Load: ``os.getloadavg()`` at the end of each run, shown as the range over an arm's runs.
Target: fedsms's round time <= 1.15x FedAvg's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache

from common import interleaved, median, parser, peak_rss, peak_rss_reset, report, rss
from federation_overhead import in_child
from process_grid import ProcessGrid, fedsms_client_app

WORKERS = min(2, os.cpu_count() or 1)  # client processes: one per core


def fedsms_config(out_dir: str, args: dict) -> dict:
    return {
        "model": args["model"],
        "dataset": "digits",
        "mode": "data",
        "partitioning": "iid",
        "phases": args["phases"],
        "pretrain-rounds": 1,
        "rounds-per-phase": args["rounds_per_phase"],
        "target-sparsity": 0.9,
        "pretrain-epochs": args["epochs"],
        "retrain-epochs": args["epochs"],
        "lr": 0.05,
        "pretrain-lr": 0.05,
        "batch-size": 64,
        "ood": False,
        "diagnostics": False,  # analysis, not training: see the docstring
        "fraction-evaluate": 0.0,
        "clients-per-round": args["per_round"],
        "min-train-clients": args["per_round"],
        "min-available-clients": args["clients"],
        "device": "cpu",
        "out-dir": out_dir,
    }


def rounds_of(args: dict) -> int:
    return 1 + args["phases"] * args["rounds_per_phase"]


# ---- FedAvg's client: a plain Flower ClientApp ------------------------------------------


@lru_cache(maxsize=2)
def _splits(dataset: str, heldout_fraction: float, seed: int):
    from fedsms.data import load_dataset

    return load_dataset(dataset, heldout_fraction=heldout_fraction, seed=seed)


def fedavg_client_app():
    """Load the dense ``ArrayRecord``, train this node's shard, return the dense ``ArrayRecord``."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedsms.data.partition import partition
    from fedsms.models import build_for
    from fedsms.recipe import CandidateConfig
    from fedsms.training import train_candidate

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = message.content["config"]
        splits = _splits(str(config["dataset"]), float(config["heldout-fraction"]), int(config["seed"]))
        model = build_for(str(config["model"]), splits)
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        node = context.node_config
        parts = partition(splits.train.labels, "iid", int(node["num-partitions"]), seed=int(config["seed"]))
        shard = splits.train.subset(parts[int(node["partition-id"])])
        candidate = CandidateConfig.from_dict({k: config[k] for k in CandidateConfig.__dataclass_fields__})
        result = train_candidate(model, {}, shard, candidate, augmentation=splits.augmentation)
        metrics = {"train_loss": result["train_loss"], "num-examples": result["num_examples"]}
        return Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}),
            reply_to=message,
        )

    return app


# ---- one run of an arm: the server process ------------------------------------------------


def timed(method: Callable, into: dict, key: str, server_round_of: Callable = lambda a: a[0]) -> Callable:
    """``method`` that adds its seconds to ``into[round][key]``."""

    def wrapper(self, *a, **kw):
        start = time.perf_counter()
        try:
            return method(self, *a, **kw)
        finally:
            per_round = into.setdefault(server_round_of(a), {})
            per_round[key] = per_round.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def relative_change(before: dict, after: dict) -> float:
    """||after - before|| / ||before|| over the floating-point tensors of a state dict."""
    num = sum(float((after[k].double() - v.double()).pow(2).sum()) for k, v in before.items() if v.is_floating_point())
    den = sum(float(v.double().pow(2).sum()) for v in before.values() if v.is_floating_point())
    return (num / den) ** 0.5


def run_arm(arm: str, args: dict) -> dict:
    """One job of ``arm`` (fedsms or fedavg) in this process, the server process."""
    import logging

    import torch

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every round at INFO
    torch.set_num_threads(1)
    stamps: list[tuple[float, float, float, int]] = []  # (time, grid wait, grid serde, replies) at each round's end
    hooks: dict[int, dict[str, float]] = {}
    factory = fedsms_client_app if arm == "fedsms" else fedavg_client_app
    from fedsms_flower.local_grid import partitions

    with ProcessGrid(factory, partitions(args["clients"]), workers=WORKERS) as grid:

        def stamp() -> None:
            stamps.append((time.perf_counter(), grid.wait_s, grid.serde_s, len(grid.worker)))

        train_messages: list[int] = []
        send = grid.send_and_receive

        def counting(messages, **kw):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                train_messages.append(len(messages))
            return send(messages, **kw)

        grid.send_and_receive = counting
        with tempfile.TemporaryDirectory() as out_dir:
            if arm == "fedsms":
                before_state, after_state = run_fedsms(grid, args, out_dir, stamp, hooks)
            else:
                before_state, after_state = run_fedavg(grid, args, stamp, hooks)
        load = os.getloadavg()[0]
        peak = peak_rss()
    rounds = []
    for r, ((t0, w0, s0, n0), (t1, w1, s1, n1)) in enumerate(zip(stamps, stamps[1:]), start=1):
        round_s, wait_s = t1 - t0, w1 - w0
        calls = grid.worker[n0:n1]
        rounds.append(
            {
                "round_s": round_s,
                "server_s": round_s - wait_s,
                "aggregate_s": hooks.get(r, {}).get("aggregate_s", 0.0),
                "serde_s": s1 - s0,
                "client_cpu_s": sum(c["app_cpu_s"] for c in calls),
                "client_calls": len(calls),
            }
        )
    return {
        "rounds": rounds,
        "peak_rss": peak,
        "rss_before": args["_rss_before"],
        "load": load,
        "train_messages": train_messages,
        "bytes_down": grid.bytes_down,
        "bytes_up": grid.bytes_up,
        "model_change": relative_change(before_state, after_state),
    }


def _reset_memory(args: dict) -> None:
    """The peak from here on is the job's (set-up done)."""
    peak_rss_reset()
    args["_rss_before"] = rss()


def run_fedsms(grid, args: dict, out_dir: str, stamp: Callable, hooks: dict) -> tuple[dict, dict]:
    from fedsms.config import split_config
    from fedsms_server.app import build_strategy
    from fedsms_server.strategy import SparseSoupStrategy

    strategy = build_strategy(*split_config(fedsms_config(out_dir, args)), log=lambda line: None)
    strategy.merge_replies = timed(SparseSoupStrategy.merge_replies, hooks, "aggregate_s").__get__(strategy)
    aggregate_evaluate = strategy.aggregate_evaluate

    def ending(server_round: int, replies):  # the round's last step: its record and checkpoint
        result = aggregate_evaluate(server_round, replies)
        stamp()
        return result

    strategy.aggregate_evaluate = ending
    before = {k: v.clone() for k, v in strategy.soup.items()}
    _reset_memory(args)
    stamp()
    strategy.start(grid)
    return before, strategy.soup


def run_fedavg(grid, args: dict, stamp: Callable, hooks: dict) -> tuple[dict, dict]:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from fedsms.config import split_config
    from fedsms.evaluate import evaluate
    from fedsms.models import build_for

    run, fed = split_config(fedsms_config("unused", args))
    splits = _splits(run.dataset, run.heldout_fraction, run.seed)
    torch.manual_seed(run.seed)
    model = build_for(run.model, splits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = run.base_candidate()  # the hyperparameters fedsms's data-soup clients train with
    train_config = ConfigRecord(
        {
            **candidate.to_dict(),
            "model": run.model,
            "dataset": run.dataset,
            "heldout-fraction": run.heldout_fraction,
            "seed": run.seed,
        }
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = MetricRecord({k: float(v) for k, v in evaluate(model, splits.test).items()})
        stamp()
        return metrics

    class Timed(FedAvg):
        pass

    Timed.aggregate_train = timed(FedAvg.aggregate_train, hooks, "aggregate_s")
    strategy = Timed(
        fraction_train=args["per_round"] / args["clients"],
        fraction_evaluate=0.0,
        min_train_nodes=args["per_round"],
        min_available_nodes=args["clients"],
    )
    initial = ArrayRecord(model.state_dict())
    _reset_memory(args)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds_of(args),
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    return before, result.arrays.to_torch_state_dict()


# ---- the comparison -------------------------------------------------------------------------

PARTS = ("round_s", "server_s", "aggregate_s", "serde_s")
MEANS = ("mean_round_s", "mean_server_s", "client_ms")


def main() -> None:
    p = parser(__doc__, "results/many_clients.json", repeats=3)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--model", default="cnn", help="cnn (default) or e.g. mlp-2048 (4.3 M weights)")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    job = {"clients": args.clients, "per_round": args.per_round, "model": args.model, "epochs": args.epochs}
    job.update(phases=2, rounds_per_phase=3)
    if args.tiny:
        job.update(clients=8, per_round=2, phases=1, rounds_per_phase=2)
    runs: dict[str, list[dict]] = {"fedsms": [], "fedavg": []}

    def variant(arm: str) -> Callable[[], float]:
        def run() -> float:
            result = in_child(run_arm, arm, job)
            runs[arm].append(result)
            return median([r["round_s"] for r in result["rounds"][1:]])

        return run

    interleaved({"fedsms": variant("fedsms"), "fedavg": variant("fedavg")}, 1 if args.tiny else args.repeats, warmup=0)

    rows = []
    for arm in ("fedavg", "fedsms"):
        steady = [r for run in runs[arm] for r in run["rounds"][1:]]
        loads = [run["load"] for run in runs[arm]]
        rounds = rounds_of(job)
        rows.append(
            {
                "arm": arm,
                "clients": job["clients"],
                "per_round": job["per_round"],
                "model": job["model"],
                **{part: median([r[part] for r in steady]) for part in PARTS},
                "mean_round_s": sum(r["round_s"] for r in steady) / len(steady),
                "mean_server_s": sum(r["server_s"] for r in steady) / len(steady),
                "client_ms": 1e3
                * sum(r["client_cpu_s"] for r in steady)
                / max(1, sum(r["client_calls"] for r in steady)),
                "first_round_s": median([run["rounds"][0]["round_s"] for run in runs[arm]]),
                "server_peak_rss": max(run["peak_rss"] for run in runs[arm]),
                "server_growth": max(run["peak_rss"] - run["rss_before"] for run in runs[arm]),
                "bytes_per_client_round": runs[arm][0]["bytes_up"] / (rounds * job["per_round"]),
                "load": f"{min(loads):.1f}-{max(loads):.1f}",
                "train_messages": runs[arm][0]["train_messages"],
                "model_change": min(run["model_change"] for run in runs[arm]),
                "runs": runs[arm],
            }
        )
    fedavg, fedsms = rows
    ratio = {part: fedsms[part] / fedavg[part] for part in PARTS + MEANS}
    ratio["server_peak_rss"] = fedsms["server_peak_rss"] / fedavg["server_peak_rss"]
    ratio["server_growth"] = fedsms["server_growth"] / max(fedavg["server_growth"], 1)
    report(
        args.out,
        rows,
        [
            ("arm", "arm", "s"),
            ("clients", "clients", "d"),
            ("per_round", "per round", "d"),
            ("model", "model", "s"),
            ("round_s", "round s", ".3f"),
            ("server_s", "server s", ".3f"),
            ("aggregate_s", "of which aggregate", ".4f"),
            ("serde_s", "serde", ".4f"),
            ("mean_round_s", "mean round s", ".3f"),
            ("mean_server_s", "mean server s", ".3f"),
            ("client_ms", "client cpu ms/msg", ".1f"),
            ("first_round_s", "round 1 s", ".2f"),
            ("server_peak_rss", "server peak B", "d"),
            ("server_growth", "growth B", "d"),
            ("bytes_per_client_round", "up B/client", ".0f"),
            ("load", "load 1 min", "s"),
        ],
        ratio=ratio,
        workers=WORKERS,
        job=job,
        target="fedsms round time <= 1.15x FedAvg's",
    )
    print("fedsms/FedAvg: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
