"""The fedsms ClientApp: retrain the shared sparse model with the hyperparameters the
server sent, report evaluation metrics, and re-estimate norm statistics on request.

It is one user of the client toolkit (``fedsms_client.toolkit``), as a user's own
ClientApp is: ``toolkit.receive`` loads the soup and mask, ``train_candidate`` keeps the
mask with the toolkit's optimizer hook, and ``Received.reply`` packs the reply.

Node config (per SuperNode): ``partition-id``, ``num-partitions``, optionally ``device``,
``data-dir`` and ``status-file``. Everything else comes from the server: each message
carries the job's settings (the keys of ``RunConfig`` and ``FederationConfig``) in its
``"job"`` record, so the client needs no run config, and the run config of the Flower app
it lives in (a user's own keys included) is left alone.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsms import FedSMSError
from fedsms.config import RunConfig, split_config
from fedsms.data import ArrayData, DatasetSplits, load_dataset
from fedsms.data.partition import partition
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.models import build_for
from fedsms.norms import norm_stats, recalibrate_norms
from fedsms.recipe import CandidateConfig
from fedsms.schema import PRECISIONS, parse_bool
from fedsms.task import CLASSIFICATION, Task
from fedsms.training import resolve_device, train_candidate
from fedsms_client import toolkit
from fedsms_flower.records import (
    CONFIG_KEY,
    FRACTION,
    JOB_KEY,
    LAST_ROUND,
    METRICS_KEY,
    NUM_EXAMPLES,
    OOD,
    OOD_EXAMPLES,
    OUT_DIR,
    SERVER_ROUND,
    STATS_KEY,
)

ModelFn = Callable[..., nn.Module]  # (run, splits) or (run, splits, context)
DataFn = Callable[..., DatasetSplits]  # (run, data_dir) or (run, data_dir, context)


def with_context(fn: Callable[..., Any]) -> Callable[[Any, Any, Context], Any]:
    """``fn`` as a function of three arguments: one that takes a third positional argument
    (or ``*args``) gets the Flower ``Context`` there; a two-argument one is called without it.

    Parameters
    ----------
    fn : callable
        A ``model_fn`` or ``data_fn``.

    Returns
    -------
    callable
        ``(first, second, context) -> fn(...)``.
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: assume the two arguments
        return lambda first, second, context: fn(first, second)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return fn
    return lambda first, second, context: fn(first, second)


@lru_cache(maxsize=4)
def _cached_splits(dataset: str, data_dir: str, heldout_fraction: float, seed: int) -> DatasetSplits:
    # Cached per process: simulation workers and SuperNode app processes handle many messages.
    return load_dataset(dataset, data_dir=data_dir or None, heldout_fraction=heldout_fraction, seed=seed)


def default_data(run: RunConfig, data_dir: str) -> DatasetSplits:
    """The data set ``run.dataset`` names, loaded once per process (cached).

    Parameters
    ----------
    run : RunConfig
        The job's settings: data set, ``heldout-fraction`` and seed.
    data_dir : str
        Where the data set's files are (empty: none, for the built-in sets).

    Returns
    -------
    DatasetSplits
        The train / held-out / test splits, as ``fedsms.data.load_dataset`` makes them.
    """
    return _cached_splits(run.dataset, data_dir, run.heldout_fraction, run.seed)


def default_model(run: RunConfig, splits: DatasetSplits) -> nn.Module:
    """The model ``run.model`` names, shaped for ``splits`` (``fedsms.models.build_for``).

    Parameters
    ----------
    run : RunConfig
        The job's settings; ``run.model`` names the architecture.
    splits : DatasetSplits
        The client's data, which fixes the input shape and the number of classes.

    Returns
    -------
    nn.Module
        A freshly initialised model; the soup's values replace its weights.
    """
    return build_for(run.model, splits)


class ModelPool:
    """Built default models kept between messages of one process, one idle model per shape.

    A warm process (a simulation actor, a ``ProcessGrid`` worker, a user's own loop calling
    the app) would otherwise build the model for every message. Reuse is exact: every
    message's soup overwrites the whole state dict (strict load: all parameters and
    buffers), the optimizer is fresh per message, and the key is everything
    ``build_for`` reads (model name, classes, input shape, normalisation), so a job with
    other settings gets another model. A handler checks a model out and returns it only
    after its reply is built; one that raised is not returned (the next message builds
    afresh), and two concurrent handlers never share one. A process that handles a
    single message (a SuperNode's ``flwr-clientapp``) just builds it, as before.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self.idle: dict[tuple, nn.Module] = {}

    @staticmethod
    def key(run: RunConfig, splits: DatasetSplits) -> tuple:
        """What ``default_model`` depends on."""
        mean = None if splits.mean is None else tuple(splits.mean)
        std = None if splits.std is None else tuple(splits.std)
        return (run.model, splits.num_classes, tuple(splits.input_shape), mean, std)

    def checkout(self, run: RunConfig, splits: DatasetSplits) -> nn.Module:
        """An idle model for ``run`` and ``splits``, or a new one (``default_model``)."""
        model = self.idle.pop(self.key(run, splits), None)
        return model if model is not None else default_model(run, splits)

    def give_back(self, run: RunConfig, splits: DatasetSplits, model: nn.Module) -> None:
        """Keep ``model`` for the next message of the same shape (gradients dropped)."""
        for parameter in model.parameters():
            parameter.grad = None
        if len(self.idle) >= self.limit:
            self.idle.clear()
        self.idle[self.key(run, splits)] = model


_MODELS = ModelPool()


class ClientSide:
    """Everything a handler needs: the job's settings from the message, the rest from the node.

    With ``model_fn = default_model`` the model comes from the process's ``ModelPool``;
    ``done()`` returns it there once the reply is built.
    """

    def __init__(
        self, message: Message, context: Context, model_fn: ModelFn, data_fn: DataFn, partitioned: bool = False
    ) -> None:
        self.run, self.fed = split_config(job_settings(message))
        self.partitioned = partitioned  # data_fn gives this client's own partition: never shard it again
        node = context.node_config
        self.partition_id = int(node.get("partition-id", 0))
        self.num_partitions = int(node.get("num-partitions", 1))
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} is not in [0, num-partitions={self.num_partitions})")
        self.device = resolve_device(str(node.get("device", "auto")))  # a machine's own, not the server's
        # also the machine's own where its node config says so; else the job's
        self.precision = str(node.get("precision", self.run.precision))
        if self.precision not in PRECISIONS:
            raise FedSMSError(f"node config precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        try:
            self.channels_last = parse_bool(node.get("channels-last", self.run.channels_last))
        except ValueError:
            raise FedSMSError(
                f"node config channels-last must be true or false, got {node.get('channels-last')!r}"
            ) from None
        self.status_file = str(node.get("status-file", ""))
        self.splits = data_fn(self.run, str(node.get("data-dir", self.run.data_dir)), context)
        if not isinstance(self.splits, DatasetSplits):
            raise FedSMSError(
                f"data_fn returned {type(self.splits).__name__}; it must return a "
                "fedsms.data.DatasetSplits (train, heldout and test data)"
            )
        self._pooled = model_fn is default_model
        self.model = (
            _MODELS.checkout(self.run, self.splits) if self._pooled else model_fn(self.run, self.splits, context)
        )
        if not isinstance(self.model, nn.Module):
            raise FedSMSError(f"model_fn returned {type(self.model).__name__}; it must return a torch.nn.Module")

    def done(self, reply: Message) -> Message:
        """``reply``, after the model went back to the pool (a pooled model only)."""
        if self._pooled:
            _MODELS.give_back(self.run, self.splits, self.model)
        return reply

    def shard(self, data: ArrayData, salt: int) -> ArrayData:
        """This client's partition of ``data`` (IID for test data, the configured scheme for training data).

        Parameters
        ----------
        data : ArrayData
            The data to partition among ``num-partitions`` clients.
        salt : int
            0 for training data (the job's ``partitioning``); any other value selects IID
            and is added to the seed.

        Returns
        -------
        ArrayData
            The ``partition-id``-th part (all of ``data`` with a single partition, or when
            ``data_fn`` already gave this client's own partition).
        """
        if self.num_partitions == 1 or self.partitioned:
            return data
        scheme = self.fed.partitioning if salt == 0 else "iid"
        parts = partition(
            data.labels, scheme, self.num_partitions, seed=self.run.seed + salt, alpha=self.fed.dirichlet_alpha
        )
        return data.subset(parts[self.partition_id])

    def train_data(self) -> ArrayData:
        """A hyperparameter soup trains every client on all the data; a data soup on its shard."""
        return self.splits.train if self.fed.mode == "hyperparameter" else self.shard(self.splits.train, salt=0)

    def mark(self, message: Message) -> None:
        """Record the last message handled, so ``fedsms-client`` knows when the job is over
        (``write_status`` to the node's ``status-file``; nothing without one).

        Parameters
        ----------
        message : Message
            The message just handled (its ``config`` record is read).
        """
        if self.status_file:
            write_status(self.status_file, message)


def write_status(path: str, message: Message, error: str = "") -> None:
    """The last message handled, as JSON in the node's status file: its ``server-round``,
    ``last-round`` and ``out-dir``, and the exception that failed it, if one did.

    Parameters
    ----------
    path : str
        The node's ``status-file``.
    message : Message
        The message handled.
    error : str, optional
        ``"<type>: <message>"`` of the exception its handler raised.
    """
    config = message.content.get(CONFIG_KEY, {})
    status = {
        SERVER_ROUND: int(config.get(SERVER_ROUND, 0)),
        LAST_ROUND: bool(config.get(LAST_ROUND, False)),
        OUT_DIR: str(config.get(OUT_DIR, "")),
    }
    Path(path).write_text(json.dumps({**status, **({"error": error} if error else {})}))


def reporting(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """``handler``, which also writes an exception it raises to the node's status file (so
    ``fedsms-client`` prints it on the client's console) before Flower reports it to the server."""

    @functools.wraps(handler)
    def handle(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:
            path = str(context.node_config.get("status-file", ""))
            if path:
                write_status(path, message, error=f"{type(error).__name__}: {error}")
            raise

    return handle


def job_settings(message: Message) -> dict:
    """The job's settings that a fedsms server sends with every message.

    Parameters
    ----------
    message : Message
        A message from a fedsms server.

    Returns
    -------
    dict
        Every job setting under its run-config name.

    Raises
    ------
    FedSMSError
        The message carries no job record (it is not from a fedsms server of this version).
    """
    try:
        return dict(message.content[JOB_KEY])
    except (KeyError, TypeError):
        raise FedSMSError(
            f"the message carries no {JOB_KEY!r} record; it is not from a fedsms server of this "
            "version (run the same fedsms on the server and the clients)"
        ) from None


def make_client_app(
    *,
    model_fn: ModelFn = default_model,
    data_fn: DataFn = default_data,
    task: Task = CLASSIFICATION,
    partitioned: bool = False,
) -> ClientApp:
    """A fedsms ClientApp that retrains with the built-in trainer.

    Parameters
    ----------
    model_fn : callable, optional
        ``model_fn(run, splits) -> nn.Module``, or ``model_fn(run, splits, context)`` to
        read the Flower ``Context`` (the app's own run-config keys:
        ``context.run_config["hidden"]``, the node config): the model, of the server's
        architecture (default: ``fedsms.models.build_for(run.model, splits)``).
    data_fn : callable, optional
        ``data_fn(run, data_dir) -> DatasetSplits``, or ``data_fn(run, data_dir,
        context)``: this client's data (default: the data set ``run.dataset`` names, from
        the node's ``data-dir``).
    task : Task, default CLASSIFICATION
        The loss the client trains on and the metrics it reports (``fedsms.task``).
    partitioned : bool, default False
        Whether ``data_fn`` returns this client's own partition (from a flwr-datasets
        partitioner, say), which is then used whole; by default a data soup shards the
        data ``data_fn`` returns by the node's ``partition-id`` / ``num-partitions``.

    Returns
    -------
    flwr.clientapp.ClientApp
        Handles the server's train, evaluate and norm-statistics messages.
    """
    app = ClientApp()
    if model_fn is not default_model:
        model_fn = with_context(model_fn)
    data_fn = with_context(data_fn)

    @app.train()
    @reporting
    def train(message: Message, context: Context) -> Message:
        side = ClientSide(message, context, model_fn, data_fn, partitioned)
        soup = toolkit.receive(message, side.model)
        hp = soup.hyperparameters
        candidate = CandidateConfig.from_dict({k: hp[k] for k in CandidateConfig.__dataclass_fields__})
        data = side.train_data()
        result = train_candidate(
            side.model,
            soup.mask,
            data,
            candidate,
            augmentation=side.splits.augmentation,
            device=side.device,
            loss_fn=task.loss,
            precision=side.precision,
            channels_last=side.channels_last,
        )
        side.mark(message)
        metrics = {"train_loss": result["train_loss"], "train_seconds": result["seconds"]}
        if "train_accuracy" in result:
            metrics["train_accuracy"] = result["train_accuracy"]
        return side.done(soup.reply(side.model, result["num_examples"], metrics))

    @app.evaluate()
    @reporting
    def evaluate_soup(message: Message, context: Context) -> Message:
        side = ClientSide(message, context, model_fn, data_fn, partitioned)
        soup = toolkit.receive(message, side.model)
        config = soup.hyperparameters
        test = side.shard(side.splits.test, salt=1)
        metrics = evaluate(side.model, test, device=side.device, task=task)
        if bool(config.get(OOD, False)) and task.images:
            ood = evaluate_ood(
                side.model, test.head(int(config.get(OOD_EXAMPLES, 1000))), device=side.device, seed=side.run.seed
            )
            metrics.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        side.mark(message)
        return side.done(soup.reply(side.model, len(test), metrics))

    app.query("identity")(toolkit.identity)

    @app.query("norm_stats")
    @reporting
    def norm_statistics(message: Message, context: Context) -> Message:
        side = ClientSide(message, context, model_fn, data_fn, partitioned)
        soup = toolkit.receive(message, side.model)
        used = recalibrate_norms(
            side.model,
            side.train_data(),
            fraction=float(soup.hyperparameters[FRACTION]),
            device=side.device,
            seed=side.run.seed,
        )
        return side.done(
            Message(
                RecordDict(
                    {
                        STATS_KEY: ArrayRecord({k: v.cpu() for k, v in norm_stats(side.model).items()}),
                        METRICS_KEY: MetricRecord({NUM_EXAMPLES: used}),
                    }
                ),
                reply_to=message,
            )
        )

    return app


app = make_client_app()
