"""An in-process Flower ``Grid``: a strategy's messages go straight to ClientApps called in
this process. For unit tests of a strategy with real ClientApps (yours or fedsms's) without
a SuperLink, and for benchmarks that time the server's work alone. Flower's own transport
is exercised by ``fedsms simulate``, ``fedsms-server`` and ``flwr run``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApps called in this process.

    It does what the SuperLink does for a strategy, minus the transport: each message gets
    an id, each node runs the ClientApp with its own node config, a ClientApp exception
    becomes an error reply, and ``drop`` can make a node miss a round (a dead client).

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The ClientApp every node runs.
    node_configs : list of dict
        One node config per node (e.g. ``{"partition-id": 0, "num-partitions": 4}``).
    run_config : dict, optional
        The run config every node's context carries.
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
            context = Context(
                run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config=self.run_config
            )
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # what Flower returns for a failing ClientApp
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            replies.append(reply)
        return replies


def partitions(count: int) -> list[dict]:
    """Node configs of ``count`` clients, as ``fedsms-client`` sets them."""
    return [{"partition-id": i, "num-partitions": count} for i in range(count)]
