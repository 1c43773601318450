"""The fedsms ClientApp: retrain the shared sparse model with the hyperparameters the
server sent, report evaluation metrics, and re-estimate norm statistics on request.

Node config (per SuperNode): ``partition-id``, ``num-partitions``, optionally ``device``,
``data-dir`` and ``status-file``. Run config (per run): the keys of ``RunConfig`` and
``FederationConfig``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsms import codec
from fedsms.config import RunConfig, split_config
from fedsms.data import ArrayData, DatasetSplits, load_dataset
from fedsms.data.partition import partition
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.masks import Mask
from fedsms.models import build_for
from fedsms.norms import norm_stats, recalibrate_norms
from fedsms.recipe import CandidateConfig
from fedsms.training import resolve_device, train_candidate

from fedsms_flower.records import payload_of, record_of  # the record layout, shared with the server

ModelFn = Callable[[RunConfig, DatasetSplits], nn.Module]
DataFn = Callable[[RunConfig, str], DatasetSplits]


@lru_cache(maxsize=4)
def _cached_splits(dataset: str, data_dir: str, heldout_fraction: float, seed: int) -> DatasetSplits:
    # Cached per process: simulation workers and SuperNode app processes handle many messages.
    return load_dataset(dataset, data_dir=data_dir or None, heldout_fraction=heldout_fraction, seed=seed)


def default_data(run: RunConfig, data_dir: str) -> DatasetSplits:
    return _cached_splits(run.dataset, data_dir, run.heldout_fraction, run.seed)


def default_model(run: RunConfig, splits: DatasetSplits) -> nn.Module:
    return build_for(run.model, splits)


class ClientSide:
    """Everything a handler needs, resolved from the message's context."""

    def __init__(self, context: Context, defaults: Mapping, model_fn: ModelFn, data_fn: DataFn) -> None:
        self.run, self.fed = split_config({**defaults, **dict(context.run_config)})
        node = context.node_config
        self.partition_id = int(node.get("partition-id", 0))
        self.num_partitions = int(node.get("num-partitions", 1))
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} is not in [0, num-partitions={self.num_partitions})")
        self.device = resolve_device(str(node.get("device", self.run.device)))
        self.status_file = str(node.get("status-file", ""))
        self.splits = data_fn(self.run, str(node.get("data-dir", self.run.data_dir)))
        self.model = model_fn(self.run, self.splits)

    def shard(self, data: ArrayData, salt: int) -> ArrayData:
        """This client's partition of ``data`` (IID for test data, the configured scheme for training data)."""
        if self.num_partitions == 1:
            return data
        scheme = self.fed.partitioning if salt == 0 else "iid"
        parts = partition(data.labels, scheme, self.num_partitions, seed=self.run.seed + salt, alpha=self.fed.dirichlet_alpha)
        return data.subset(parts[self.partition_id])

    def train_data(self) -> ArrayData:
        """A hyperparameter soup trains every client on all the data; a data soup on its shard."""
        return self.splits.train if self.fed.mode == "hyperparameter" else self.shard(self.splits.train, salt=0)

    def load_soup(self, message: Message) -> tuple[Mask, int, int]:
        config = message.content["config"]
        phase, server_round = int(config["phase"]), int(config["server-round"])
        template = self.model.state_dict()
        decoded = codec.decode(
            payload_of(message.content["soup"]), expected_mask=None, expected_digest=None, template=template,
            expected_phase=phase, expected_round=server_round, expected_kind="soup",
        )
        self.model.load_state_dict(decoded.to_state_dict(template))
        return decoded.mask, phase, server_round

    def mark(self, message: Message) -> None:
        """Record the last message handled, so ``fedsms-client`` knows when the job is over."""
        if self.status_file:
            config = message.content["config"]
            Path(self.status_file).write_text(json.dumps({
                "server-round": int(config["server-round"]),
                "last-round": bool(config.get("last-round", False)),
                "out-dir": str(config.get("out-dir", "")),
            }))


def make_client_app(
    defaults: Mapping | None = None,
    *,
    model_fn: ModelFn = default_model,
    data_fn: DataFn = default_data,
) -> ClientApp:
    """A fedsms ClientApp. ``defaults`` are run-config values the run's own config overrides;
    ``model_fn(run, splits)`` and ``data_fn(run, data_dir)`` bring your own model and data."""
    defaults = dict(defaults or {})
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        side = ClientSide(context, defaults, model_fn, data_fn)
        mask, phase, server_round = side.load_soup(message)
        config = message.content["config"]
        candidate = CandidateConfig.from_dict({k: config[k] for k in CandidateConfig.__dataclass_fields__})
        data = side.train_data()
        result = train_candidate(side.model, mask, data, candidate, augmentation=side.splits.augmentation, device=side.device)
        state = {k: v.cpu() for k, v in side.model.state_dict().items()}
        payload = codec.encode(state, mask, phase=phase, round=server_round, kind="update",
                               value_dtype=side.fed.value_dtype, num_examples=len(data))
        side.mark(message)
        return Message(RecordDict({
            "update": record_of(payload),
            "metrics": MetricRecord({"train_loss": result["train_loss"], "train_accuracy": result["train_accuracy"],
                                     "train_seconds": result["seconds"], "num-examples": len(data)}),
        }), reply_to=message)

    @app.evaluate()
    def evaluate_soup(message: Message, context: Context) -> Message:
        side = ClientSide(context, defaults, model_fn, data_fn)
        side.load_soup(message)
        config = message.content["config"]
        test = side.shard(side.splits.test, salt=1)
        metrics = evaluate(side.model, test, device=side.device)
        if bool(config.get("ood", False)):
            ood = evaluate_ood(side.model, test.head(int(config.get("ood-examples", 1000))), device=side.device,
                               seed=side.run.seed)
            metrics.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        side.mark(message)
        return Message(RecordDict({
            "metrics": MetricRecord({**{k: float(v) for k, v in metrics.items()}, "num-examples": len(test)}),
        }), reply_to=message)

    @app.query("norm_stats")
    def norm_statistics(message: Message, context: Context) -> Message:
        side = ClientSide(context, defaults, model_fn, data_fn)
        side.load_soup(message)
        used = recalibrate_norms(side.model, side.train_data(), fraction=float(message.content["config"]["fraction"]),
                                 device=side.device, seed=side.run.seed)
        return Message(RecordDict({
            "stats": ArrayRecord({k: v.cpu() for k, v in norm_stats(side.model).items()}),
            "metrics": MetricRecord({"num-examples": used}),
        }), reply_to=message)

    return app


app = make_client_app()
