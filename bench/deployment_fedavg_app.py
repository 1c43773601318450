"""The FedAvg side of ``bench/deployment.py``: a quickstart-style Flower app, copied by the
benchmark into a temporary app folder as ``fedavg_app.py`` and run with ``flwr run`` on a
real SuperLink and SuperNodes.

- ClientApp: loads the ``ArrayRecord`` into fedsms's ``cnn``, trains it on the digits
  train split with ``fedsms.training.train_candidate`` without a mask (every client all of
  it, as fedsms's default hyperparameter soup does) and replies with the dense
  ``ArrayRecord``, ``num-examples`` and its training seconds.
- ServerApp: ``flwr.serverapp.strategy.FedAvg`` through ``strategy.start(grid,
  initial_arrays, num_rounds, evaluate_fn)``; ``evaluate_fn`` evaluates on the test split
  as fedsms's server does, and after every round appends a line to ``OUT/rounds.jsonl`` with
  the keys of fedsms's round lines that the benchmark reads (``server_round``, ``seconds``,
  ``bytes_down``, ``bytes_up``, ``train``, ``central_eval``), so both variants are read alike.

Run config (declared in the app's pyproject.toml): ``num-server-rounds``, ``local-epochs``,
``lr``, ``batch-size``, ``clients``, ``out-dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsms.data import load_dataset
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate

MODEL, DATASET = "cnn", "digits"

client_app = ClientApp()
server_app = ServerApp()


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' data, as fedsms's round lines count a dense record."""
    return sum(len(array.data) for array in record.values())


@client_app.train()
def train(message: Message, context: Context) -> Message:
    config = message.content["config"]
    splits = load_dataset(DATASET)
    model = build_for(MODEL, splits)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    candidate = CandidateConfig(
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        seed=int(context.node_config.get("partition-id", 0)),
    )
    result = train_candidate(model, {}, splits.train, candidate, augmentation=splits.augmentation)
    metrics = {
        "train_loss": result["train_loss"],
        "train_seconds": result["seconds"],
        "num-examples": len(splits.train),
    }
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}), reply_to=message
    )


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    import torch
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedsms.evaluate import evaluate

    class CountingFedAvg(FedAvg):
        """FedAvg that notes each round's bytes down and up and its aggregated train metrics."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.down: dict[int, int] = {}
            self.up: dict[int, int] = {}
            self.train: dict[int, dict] = {}

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.down[server_round] = sum(record_bytes(m.content["arrays"]) for m in messages)
            return messages

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.up[server_round] = sum(record_bytes(r.content["arrays"]) for r in replies if r.has_content())
            arrays, metrics = super().aggregate_train(server_round, replies)
            self.train[server_round] = dict(metrics or {})
            return arrays, metrics

    run = context.run_config
    out = Path(str(run["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    clients = int(run["clients"])
    splits = load_dataset(DATASET)
    torch.manual_seed(0)
    initial = build_for(MODEL, splits)
    server_model = build_for(MODEL, splits)
    strategy = CountingFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
    )
    # Like fedsms's round lines: a round's seconds run from the end of the previous round
    # (round 1: from the strategy's construction) to the end of its evaluation.
    last = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_model.load_state_dict(arrays.to_torch_state_dict())
        metrics = {key: float(value) for key, value in evaluate(server_model, splits.test).items()}
        if server_round > 0:
            now = time.perf_counter()
            line = {
                "server_round": server_round,
                "seconds": round(now - last[0], 3),
                "clients": clients,
                "bytes_down": strategy.down.get(server_round, 0),
                "bytes_up": strategy.up.get(server_round, 0),
                "train": strategy.train.get(server_round, {}),
                "central_eval": metrics,
            }
            with open(out / "rounds.jsonl", "a") as file:
                file.write(json.dumps(line) + "\n")
            last[0] = now
        return MetricRecord(metrics)

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=int(run["num-server-rounds"]),
        train_config=ConfigRecord(
            {"local-epochs": int(run["local-epochs"]), "lr": float(run["lr"]), "batch-size": int(run["batch-size"])}
        ),
        evaluate_fn=evaluate_fn,
    )
