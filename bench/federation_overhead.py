"""Federation overhead: wall time per round of ``fedsms simulate`` against a Flower ``FedAvg`` simulation.

    python bench/federation_overhead.py [--clients 4] [--epochs 1] [--repeats 3] [--out results/federation_overhead.json]

Both run through ``flwr.simulation.run_simulation`` with the same number of virtual
clients (1 CPU each), the same model (cnn), the same data (the digits train split, every
client all of it: fedsms's hyperparameter soup) and the same epochs per round:

- fedsms: the fedsms ServerApp and ClientApp in ``run_simulation`` (``common.simulate_in_process``), 1 dense
  round then 3 phases of 2 rounds each to 90 % sparsity; the server evaluates the soup on
  the test split every round (no OOD, no federated evaluation), recalibrates BatchNorm
  and checkpoints;
- FedAvg: ``flwr.serverapp.strategy.FedAvg`` (no federated evaluation) and a plain
  ClientApp that loads the ``ArrayRecord``, trains with the same ``train_candidate`` loop
  (no mask) and returns the dense ``ArrayRecord``; its ``evaluate_fn`` evaluates on the
  test split as fedsms's server does.

A round's wall time is the time between two calls of the server's per-round evaluation
(Flower calls it last in every round, and once before round 1); each simulation runs in
its own child process, the two alternate, and the figure is the median over rounds 2-7 of
all runs. Round 1 is reported apart: it carries the start-up of the Ray workers (imports,
the client app, loading the data), not the cost of a round. Beside the ratio, the fedsms
server's own work per round (the strategy's hooks, timed in the server process as in
``bench/scaling.py``) shows what fedsms does that FedAvg's server does not.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable

from common import interleaved, median, parser, report, simulate_in_process

ROUNDS = 7  # fedsms: 1 dense round + 3 phases x 2 rounds


def fedsms_config(out_dir: str, clients: int, epochs: int, **extra) -> dict:
    return {
        "model": "cnn",
        "dataset": "digits",
        "phases": 3,
        "pretrain-rounds": 1,
        "rounds-per-phase": 2,
        "target-sparsity": 0.9,
        "pretrain-epochs": epochs,
        "retrain-epochs": epochs,
        "lr": 0.05,
        "pretrain-lr": 0.05,
        "batch-size": 64,
        "ood": False,
        "fraction-evaluate": 0.0,
        "min-train-clients": clients,
        "min-available-clients": clients,
        "device": "cpu",
        "out-dir": out_dir,
        **extra,
    }


def stamped(method: Callable, stamps: list[float]) -> Callable:
    """``method`` that also notes the time each call returns."""

    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs)
        stamps.append(time.perf_counter())
        return result

    return wrapper


def round_seconds(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


# What fedsms's server does in a round: SparseSoupStrategy's steps, timed per server round.
# The phase end (greedy choice, recalibration) runs inside merge_replies and is taken out of
# aggregate_s; the round's record (line + checkpoint) inside aggregate_evaluate is also shown
# on its own.
HOOKS = {
    ("SparseSoupStrategy", "configure_train"): "encode_s",
    ("SparseSoupStrategy", "merge_replies"): "aggregate_s",
    ("PhaseEnd", "begin"): "recalibrate_s",
    ("SparseSoupStrategy", "aggregate_evaluate"): "evaluate_s",
    ("JobRecorder", "end_round"): "checkpoint_s",
}
SERVER_PARTS = ("encode_s", "aggregate_s", "recalibrate_s", "evaluate_s")  # disjoint: they sum to the server's time


def timed(method: Callable, totals: dict, key: str) -> Callable:
    def wrapper(self, first, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, first, *args, **kwargs)
        finally:
            server_round = first if isinstance(first, int) else first.server_round  # a round, or its RoundLog
            per_round = totals.setdefault(server_round, {})
            per_round[key] = per_round.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def instrument() -> tuple[dict[int, dict[str, float]], list[float]]:
    """Time the strategy's steps per server round, and stamp the job's start and the end of every round."""
    from fedsms_server.phase_end import PhaseEnd
    from fedsms_server.recorder import JobRecorder
    from fedsms_server.strategy import SparseSoupStrategy

    classes = {"SparseSoupStrategy": SparseSoupStrategy, "PhaseEnd": PhaseEnd, "JobRecorder": JobRecorder}
    totals: dict[int, dict[str, float]] = {}
    for (owner, name), key in HOOKS.items():
        setattr(classes[owner], name, timed(getattr(classes[owner], name), totals, key))
    stamps: list[float] = []
    SparseSoupStrategy.summary = stamped(SparseSoupStrategy.summary, stamps)  # start() calls it first
    JobRecorder.end_round = stamped(JobRecorder.end_round, stamps)
    return totals, stamps


def server_split(totals: dict[int, dict[str, float]], server_round: int) -> dict[str, float]:
    split = {key: totals.get(server_round, {}).get(key, 0.0) for key in HOOKS.values()}
    split["aggregate_s"] -= split["recalibrate_s"]  # the phase end runs inside merge_replies
    return split


def run_fedsms(clients: int, epochs: int) -> dict:
    totals, stamps = instrument()
    with tempfile.TemporaryDirectory() as out_dir:
        simulate_in_process(fedsms_config(out_dir, clients, epochs), clients)
    return {"round_s": round_seconds(stamps), "server": [server_split(totals, r) for r in range(1, ROUNDS + 1)]}


def run_fedavg(clients: int, epochs: int) -> dict:
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedsms.data import load_dataset
    from fedsms.evaluate import evaluate
    from fedsms.models import build_for
    from fedsms.recipe import CandidateConfig
    from fedsms.training import train_candidate

    splits = load_dataset("digits")
    client_app, server_app = ClientApp(), ServerApp()

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        model = build_for("cnn", splits)
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        config = CandidateConfig(epochs=epochs, batch_size=64, lr=0.05, seed=context.node_id % 1000)
        result = train_candidate(model, {}, splits.train, config, augmentation=splits.augmentation)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "metrics": MetricRecord({"train_loss": result["train_loss"], "num-examples": len(splits.train)}),
                }
            ),
            reply_to=message,
        )

    stamps: list[float] = []
    server_model = build_for("cnn", splits)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({k: float(v) for k, v in evaluate(server_model, splits.test).items()})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(build_for("cnn", splits).state_dict()),
            num_rounds=ROUNDS,
            evaluate_fn=stamped(evaluate_fn, stamps),
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}},
    )
    return {"round_s": round_seconds(stamps)}


def _child(target: Callable, args: tuple, queue) -> None:
    queue.put(target(*args))


def in_child(target: Callable, *args) -> dict:
    """``target(*args)`` in a fresh process: each simulation gets its own Ray and memory figures."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(target, args, queue))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{target.__name__}{args} failed with exit code {child.exitcode}")
    return result


def main() -> None:
    p = parser(__doc__, "results/federation_overhead.json", repeats=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    runs: dict[str, list[list[float]]] = {"fedsms": [], "fedavg": []}
    servers: list[list[dict[str, float]]] = []

    def variant(name: str, target: Callable) -> Callable[[], float]:
        def run() -> float:
            result = in_child(target, args.clients, args.epochs)
            runs[name].append(result["round_s"])
            servers.extend([result["server"]] if "server" in result else [])
            return median(result["round_s"][1:])

        return run

    interleaved(
        {"fedsms": variant("fedsms", run_fedsms), "fedavg": variant("fedavg", run_fedavg)},
        1 if args.tiny else args.repeats,
        warmup=0,
    )

    def steady(name: str) -> float:
        return median([s for rounds in runs[name] for s in rounds[1:]])

    def first(name: str) -> float:
        return median([rounds[0] for rounds in runs[name]])

    # fedsms's server work per round (rounds 2-7), the part of its round FedAvg's server does not do
    server = {key: median([split[key] for run in servers for split in run[1:]]) for key in HOOKS.values()}

    rows = [
        {
            "clients": args.clients,
            "epochs": args.epochs,
            "rounds": ROUNDS,
            "fedsms_round_s": steady("fedsms"),
            "fedavg_round_s": steady("fedavg"),
            "ratio": steady("fedsms") / steady("fedavg"),
            "fedsms_first_round_s": first("fedsms"),
            "fedavg_first_round_s": first("fedavg"),
            **{f"fedsms_server_{key}": value for key, value in server.items()},
            "fedsms_runs": runs["fedsms"],
            "fedavg_runs": runs["fedavg"],
        }
    ]
    report(
        args.out,
        rows,
        [
            ("clients", "clients", "d"),
            ("epochs", "epochs", "d"),
            ("fedavg_round_s", "FedAvg s/round", ".3f"),
            ("fedsms_round_s", "fedsms s/round", ".3f"),
            ("ratio", "fedsms/FedAvg", ".3f"),
            ("fedavg_first_round_s", "FedAvg round 1 s", ".1f"),
            ("fedsms_first_round_s", "fedsms round 1 s", ".1f"),
            ("fedsms_server_encode_s", "encode", ".3f"),
            ("fedsms_server_aggregate_s", "aggregate", ".3f"),
            ("fedsms_server_recalibrate_s", "recalibrate", ".3f"),
            ("fedsms_server_evaluate_s", "evaluate", ".3f"),
            ("fedsms_server_checkpoint_s", "of which checkpoint", ".3f"),
        ],
        target="fedsms round time <= 1.15x FedAvg's",
    )


if __name__ == "__main__":
    main()
