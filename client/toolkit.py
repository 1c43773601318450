"""The client toolkit: Sparse Model Soups inside your own ClientApp and training loop.

A fedsms server sends every client the soup (the shared sparse model: the mask bits and
the values under the mask) and, in a train message, the hyperparameters of the candidate
this client retrains. Four calls cover the client's side of that exchange, whatever the
model, the data and the training loop are:

- :func:`receive` loads the soup and the mask into any ``nn.Module`` whose state dict has
  the server model's names and shapes (anything else ends in one sentence naming the
  tensor and both shapes) and returns a :class:`Received`;
- :func:`enforce_mask` (or ``Received.enforce``) keeps the pruned weights exactly zero
  through any ``torch.optim.Optimizer`` (an optimizer step post-hook: SGD, Adam, AdamW,
  gradient clipping and ``GradScaler`` all work unchanged);
- ``Received.hyperparameters`` is the candidate's hyperparameters as a dict, in Flower's
  spelling (``lr``, ``weight-decay``, ``momentum``, ``label-smoothing``, ``local-epochs``,
  ``batch-size``, ``seed``, ``lr-schedule``, ``warmup-fraction``, ``augment``, plus
  ``phase``, ``server-round`` and ``candidate``): exactly what the server put in the
  message's ``"config"`` record. Use what fits your loop and ignore the rest;
- ``Received.reply`` builds the reply Message from the trained model, the number of
  training examples and optional metrics (for a train message the compact sparse
  payload, values under the mask only, in the server's value dtype).

A complete ClientApp with its own model, DataLoader, AdamW and loss::

    import torch
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from torch import nn
    from torch.utils.data import DataLoader

    from fedsms_client import toolkit
    from my_project import MyNet, my_dataset  # your model (the server's architecture) and data

    app = ClientApp()
    app.query("identity")(toolkit.identity)  # the server draws the same clients in every run

    @app.train()
    def train(message: Message, context: Context) -> Message:
        model = MyNet()
        soup = toolkit.receive(message, model)  # soup and mask loaded, shapes checked
        hp = soup.hyperparameters  # {"lr": ..., "weight-decay": ..., "local-epochs": ..., ...}
        torch.manual_seed(hp["seed"])
        loader = DataLoader(my_dataset(context, "train"), batch_size=hp["batch-size"], shuffle=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight-decay"])
        soup.enforce(optimizer, model)  # pruned weights stay exactly zero after every step
        loss_fn = nn.CrossEntropyLoss(label_smoothing=hp["label-smoothing"])
        model.train()
        for _ in range(hp["local-epochs"]):
            for x, y in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
        return soup.reply(model, len(loader.dataset), {"train_loss": loss.item()})

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        model = MyNet().eval()
        soup = toolkit.receive(message, model)
        data = my_dataset(context, "test")
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=256))
        return soup.reply(model, len(data), {"accuracy": correct / len(data)})

The server side is ``fedsms_server.strategy.SparseSoupStrategy`` built with the same model
class. The built-in ClientApp (``fedsms_client.app``) is one user of this toolkit: it
trains with ``fedsms.training.train_candidate``, which keeps the mask by the same hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from torch import nn

from fedsms import FedSMSError, codec
from fedsms.masks import Mask, MaskHook, enforce_mask
from fedsms_flower.privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, clip_update
from fedsms_flower.records import (
    CANDIDATE,
    CONFIG_KEY,
    LOCAL_EPOCHS,
    METRICS_KEY,
    NUM_EXAMPLES,
    PARTITION_ID,
    PHASE,
    SERVER_ROUND,
    SOUP_KEY,
    UPDATE_KEY,
    payload_of,
    record_of,
)

__all__ = ["Hyperparameters", "ModelMismatch", "Received", "enforce_mask", "hyperparameters", "identity", "receive"]


class ModelMismatch(FedSMSError):
    """The client's model does not have the server model's tensors (names and shapes)."""


class Hyperparameters(dict):
    """The settings of a server message, under the names the server sent (``-`` spelling,
    as Flower's run config: ``lr``, ``local-epochs``, ``weight-decay``, ``batch-size``,
    ``server-round``); a name may also be looked up in ``_`` spelling (``weight_decay``), and
    ``epochs`` is ``local-epochs``, as earlier fedsms versions sent them."""

    @staticmethod
    def _name(key: object) -> object:
        if not isinstance(key, str):
            return key
        key = key.replace("_", "-")
        return LOCAL_EPOCHS if key == "epochs" else key

    def __getitem__(self, key: object) -> Any:
        return super().__getitem__(self._name(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._name(key))

    def get(self, key: object, default: Any = None) -> Any:
        return super().get(self._name(key), default)


def hyperparameters(message: Message) -> Hyperparameters:
    """The settings the server sent with ``message``, as a plain dict.

    Parameters
    ----------
    message : flwr.app.Message
        A train, evaluate or query message from a fedsms server.

    Returns
    -------
    Hyperparameters
        A copy of the message's ``"config"`` ConfigRecord (a ``dict``; ``_`` spellings
        are looked up too). In a train message: the candidate's ``seed``, ``lr``,
        ``weight-decay``, ``label-smoothing``, ``local-epochs`` (the epochs to train in this
        round), ``augment``, ``batch-size``, ``momentum``, ``lr-schedule``,
        ``warmup-fraction``, and ``phase``, ``server-round``, ``candidate`` (this client's
        candidate index), ``num-candidates``, ``last-round``, ``out-dir``. An evaluate
        message carries ``phase``, ``server-round``, ``ood`` and ``ood-examples``.

    Raises
    ------
    FedSMSError
        If the message has no ``"config"`` record (it is not from a fedsms server).
    """
    try:
        config = message.content[CONFIG_KEY]
    except (KeyError, TypeError):
        raise FedSMSError(
            f"the {message.metadata.message_type} message carries no {CONFIG_KEY!r} record; it is not from a fedsms server"
        ) from None
    return Hyperparameters({key: _plain(value) for key, value in config.items()})


def identity(message: Message, context: Context) -> Message:
    """Answer a fedsms server's identity query with this node's ``partition-id``, so the
    server draws the same clients in every run (``fedsms_server.sampling``). Register it in
    your ClientApp with ``app.query("identity")(toolkit.identity)``.

    Parameters
    ----------
    message : flwr.app.Message
        The server's ``query.identity`` message.
    context : flwr.app.Context
        The node's context; its node config's ``partition-id`` is reported.

    Returns
    -------
    flwr.app.Message
        A reply whose ``metrics`` record holds ``partition-id``.

    Raises
    ------
    FedSMSError
        If the node config has no integer ``partition-id``.
    """
    try:
        partition = int(context.node_config[PARTITION_ID])
    except (KeyError, TypeError, ValueError):
        raise FedSMSError(
            f"the node config has no integer {PARTITION_ID!r}; start the SuperNode with "
            f'--node-config "{PARTITION_ID}=0 num-partitions=N"'
        ) from None
    return Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_ID: partition})}), reply_to=message)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Received:
    """A server message whose soup has been loaded into a model (see :func:`receive`).

    Attributes
    ----------
    message : flwr.app.Message
        The message, which the reply answers.
    mask : dict of str to torch.Tensor
        The soup's mask: parameter name to a bool tensor (True = kept).
    phase : int
        The SMS phase (0: dense pretraining).
    server_round : int
        The server round the message belongs to.
    value_dtype : str
        The dtype of the values on the wire (``"fp32"``, ``"fp16"`` or ``"bf16"``); the
        reply uses the same.
    hyperparameters : Hyperparameters
        The message's ``"config"`` record as a dict (see :func:`hyperparameters`).
    start : dict of str to torch.Tensor, optional
        The soup as received, kept when the server asks the client to clip its update
        (Flower's ``clipping_norm`` in the config: a private job with client-side clipping).
    """

    message: Message
    mask: Mask
    phase: int
    server_round: int
    value_dtype: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    start: dict[str, torch.Tensor] | None = None

    @property
    def candidate(self) -> int:
        """This client's candidate index in the round (0 outside train messages)."""
        return int(self.hyperparameters.get(CANDIDATE, 0))

    @property
    def is_train(self) -> bool:
        """Whether the received message is a train message (its reply carries the model)."""
        return self.message.metadata.message_type == MessageType.TRAIN

    def enforce(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskHook:
        """``enforce_mask(optimizer, model, self.mask)``: pruned weights stay zero through ``optimizer``.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            The optimizer that trains ``model``.
        model : torch.nn.Module
            The model the soup was loaded into, already on its device.

        Returns
        -------
        MaskHook
            ``remove()`` it (or use it as a context manager) to detach.

        Raises
        ------
        FedSMSError
            If the mask names a tensor the model lacks or has another shape.
        """
        return enforce_mask(optimizer, model, self.mask)

    def reply(
        self,
        model: nn.Module | Mapping[str, torch.Tensor] | None,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> Message:
        """The reply to the received message.

        Parameters
        ----------
        model : torch.nn.Module or dict of str to torch.Tensor
            The trained model (or its state dict). A train reply carries its values under
            the mask and its dense tensors (biases, norm layers); an evaluate reply does
            not use it (pass ``None`` or the model).
        num_examples : int
            Examples the client trained (or evaluated) on; weights the average under
            ``merge = "weighted"`` and federated metrics. At least 1.
        metrics : dict of str to float, optional
            Metrics to report (e.g. ``{"train_loss": 0.3}``); the server averages them
            over clients. ``"num-examples"`` is added.

        Returns
        -------
        flwr.app.Message
            A train reply ``{"update": payload record, "metrics": MetricRecord}``, or an
            evaluate reply ``{"metrics": MetricRecord}``. When the server asked for
            client-side clipping, the update (trained minus received) is clipped to its
            ``clipping_norm`` first, and ``norm_bit`` (1: it was scaled down) is reported, as
            Flower's ``adaptiveclipping_mod`` does.

        Raises
        ------
        FedSMSError
            If ``num_examples`` is not a positive int, a metric is not a number, the model
            lost a tensor of the soup, or its values became NaN/Inf.
        """
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise FedSMSError(
                f"num_examples must be a positive int (the examples this client used), got {num_examples!r}"
            )
        record = MetricRecord({**_metric_values(metrics or {}), NUM_EXAMPLES: num_examples})
        message_type = self.message.metadata.message_type
        if message_type == MessageType.EVALUATE:
            return Message(RecordDict({METRICS_KEY: record}), reply_to=self.message)
        if message_type != MessageType.TRAIN:
            raise FedSMSError(f"reply() answers train and evaluate messages, not {message_type!r} ones")
        if model is None:
            raise FedSMSError("a train reply needs the trained model; pass reply(model, num_examples, metrics)")
        state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
        state = {name: tensor.detach().cpu() for name, tensor in state.items()}
        bound = dict.get(self.hyperparameters, KEY_CLIPPING_NORM)  # Flower's name, as sent
        if bound is not None and self.start is not None:
            clipped, scaled = clip_update(state, self.start, float(bound))
            state = {**state, **clipped}
            record[KEY_NORM_BIT] = int(scaled)
        payload = codec.encode(
            state,
            self.mask,
            phase=self.phase,
            round=self.server_round,
            kind="update",
            value_dtype=self.value_dtype,
            num_examples=num_examples,
        )
        return Message(RecordDict({UPDATE_KEY: record_of(payload), METRICS_KEY: record}), reply_to=self.message)


def _metric_values(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise FedSMSError(f"metric {key!r} is {type(value).__name__}; report metrics as numbers")
        out[str(key)] = value
    return out


def receive(message: Message, model: nn.Module) -> Received:
    """Load the soup of a fedsms server message into ``model``.

    Every tensor of the server's model must exist in ``model.state_dict()`` under the
    same name with the same shape and dtype (a strict ``load_state_dict``): the pruned
    weights arrive as zeros, the values under the mask and the dense tensors as sent.

    Parameters
    ----------
    message : flwr.app.Message
        A train, evaluate or query message of a fedsms server (it carries the soup under
        ``"soup"`` and the settings under ``"config"``).
    model : torch.nn.Module
        Any model of the server's architecture, on any device; changed in place.

    Returns
    -------
    Received
        The mask, phase, round, value dtype and hyperparameters, and ``reply()``.

    Raises
    ------
    ModelMismatch
        If the model's tensors differ from the server's, in one sentence naming the
        tensor and both shapes.
    FedSMSError
        If the message carries no readable soup.
    """
    config = hyperparameters(message)
    try:
        phase, server_round = int(config[PHASE]), int(config[SERVER_ROUND])
    except (KeyError, TypeError, ValueError):
        raise FedSMSError(
            "the message's config lacks 'phase' or 'server-round'; it is not from a fedsms server"
        ) from None
    try:
        payload = payload_of(message.content[SOUP_KEY])
    except (KeyError, TypeError):
        raise FedSMSError(f"the message carries no {SOUP_KEY!r} record; it is not from a fedsms server") from None
    template = model.state_dict()
    try:
        decoded = codec.decode(
            payload,
            expected_mask=None,
            expected_digest=None,
            template=template,
            expected_phase=phase,
            expected_round=server_round,
            expected_kind="soup",
        )
    except codec.PayloadError as error:
        if "the model" in str(error):  # a tensor name, shape or dtype of the model, not the bytes
            raise ModelMismatch(
                f"the server's soup does not fit this client's model ({type(model).__name__}): {error}; "
                "build the client's model exactly as the server's"
            ) from None
        raise FedSMSError(f"the server's soup of round {server_round} cannot be read: {error}") from None
    decoded.load_into(template)  # the model's own tensors take the soup: no dense copy
    return Received(
        message=message,
        mask=decoded.mask,
        phase=phase,
        server_round=server_round,
        value_dtype=decoded.value_dtype,
        hyperparameters=config,
        start={k: v.detach().cpu().clone() for k, v in template.items()} if KEY_CLIPPING_NORM in dict(config) else None,
    )
