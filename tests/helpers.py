"""Helpers shared by the tests: an in-process Flower grid that hands messages to a real
ClientApp, and small builders. Nothing here loads data at import time."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from functools import lru_cache

from flwr.app import Context, Message, RecordDict
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsms.data import DatasetSplits, load_dataset


@lru_cache(maxsize=1)
def digits() -> DatasetSplits:
    """The embedded digits data, loaded once per test process on first use."""
    return load_dataset("digits")


class LocalGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApps called in this process.

    It does what the SuperLink does for a strategy, minus the transport: each message gets
    an id, each node runs the ClientApp with its own node config, a ClientApp exception
    becomes an error reply, and ``drop`` can make a node miss a round (a dead client).
    The real transport is covered by the slow end-to-end tests.
    """

    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None) -> None:
        self.client_app = client_app
        self.nodes = {1000 + i: config for i, config in enumerate(node_configs)}
        self.run_config = dict(run_config or {})
        self.drop: Callable[[Message], bool] = lambda message: False
        self.sent: list[Message] = []
        # Flower stamps messages with the identity of the process's task; a SuperLink sets it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def set_run(self, run) -> None:  # the strategy never asks
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            if self.drop(message):
                continue
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(),
                              run_config=self.run_config)
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # what Flower returns for a failing ClientApp
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            replies.append(reply)
        return replies


def partitions(count: int) -> list[dict]:
    """Node configs of ``count`` clients, as ``fedsms-client`` sets them."""
    return [{"partition-id": i, "num-partitions": count} for i in range(count)]


class RecordingGrid(LocalGrid):
    """A ``LocalGrid`` that also keeps every reply it hands back, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def train_replies(grid: LocalGrid, server_round: int | None = None) -> list[Message]:
    """The train replies a ``RecordingGrid`` handed back (of one server round if given)."""
    sent = {m.metadata.message_id: m for m in grid.sent}
    out = []
    for reply in grid.replies:
        request = sent.get(reply.metadata.reply_to_message_id)
        if request is None or request.metadata.message_type != "train" or reply.has_error():
            continue
        if server_round is None or int(request.content["config"]["server-round"]) == server_round:
            out.append(reply)
    return out


def make_strategy(out_dir, *, model: str = "mlp", server_data=True, log=None, run: dict | None = None, **federation):
    """A small ``SparseSoupStrategy`` on digits with seeded starting weights: two phases to
    80 % sparsity, one-epoch candidates, no OOD; ``run`` and ``federation`` override."""
    import torch

    from fedsms.config import FederationConfig, RunConfig
    from fedsms.models import build_for
    from fedsms_server.strategy import SparseSoupStrategy

    settings = {**dict(model=model, phases=2, target_sparsity=0.8, pretrain_epochs=1, retrain_epochs=1, batch_size=32,
                       candidates=3, augment=False, ood=False, device="cpu", out_dir=str(out_dir)), **(run or {})}
    fed = FederationConfig(**{"pretrain_rounds": 1, "min_train_clients": 2, "min_available_clients": 2,
                              "fraction_evaluate": 0.0, **federation})
    torch.manual_seed(0)
    data = digits()
    return SparseSoupStrategy(RunConfig(**settings), fed, build_for(model, data),
                              server_data=data if server_data else None,
                              out_dir=out_dir, log=log or (lambda _: None))


def payloads(replies: Iterable[Message]) -> list[bytes]:
    """The update payloads of train replies."""
    from fedsms_flower.records import payload_of

    return [payload_of(r.content["update"]) for r in replies]
