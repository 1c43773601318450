"""An in-process Flower ``Grid``: a strategy's messages go straight to ClientApps called in
this process. For unit tests of a strategy with real ClientApps (yours or fedsms's) without
a SuperLink, and for benchmarks that time the server's work alone. Flower's own transport
is exercised by ``fedsms simulate``, ``fedsms-server`` and ``flwr run``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common import Error, MessageType
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsms_flower.records import group_id


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
        """Not supported: raises ``NotImplementedError`` (no strategy calls it).

        Parameters
        ----------
        run : int
            The run id Flower would set.
        """
        raise NotImplementedError

    @property
    def run(self):
        """Not supported: raises ``NotImplementedError`` (no strategy reads it)."""
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        """A ``Message`` to ``dst_node_id``, as Flower's grids create it.

        Parameters
        ----------
        content : RecordDict
            The message's content.
        message_type : str
            E.g. ``MessageType.TRAIN``.
        dst_node_id : int
            The node it goes to.
        group_id : str
            The message's group id.
        ttl : float, optional
            Ignored: messages here never expire.
        """
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids, 1000, 1001, ..., one per node config."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not supported: raises ``NotImplementedError``; use ``send_and_receive``.

        Parameters
        ----------
        messages : iterable of Message
            Unused.
        """
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not supported: raises ``NotImplementedError``; use ``send_and_receive``.

        Parameters
        ----------
        message_ids : iterable of str
            Unused.
        """
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run each message's ClientApp on its node, one after the other, and collect the replies.

        Each message gets a fresh message id and is appended to ``sent``; a message that
        ``drop`` selects gets no reply; a ClientApp exception becomes an error reply.

        Parameters
        ----------
        messages : iterable of Message
            Messages to nodes of this grid.
        timeout : float, optional
            Ignored: every ClientApp runs to its end.

        Returns
        -------
        list of Message
            The replies, in the order of ``messages``.
        """
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
    """Node configs of ``count`` clients, as ``fedsms-client`` sets them.

    Parameters
    ----------
    count : int
        Number of clients.

    Returns
    -------
    list of dict
        ``{"partition-id": i, "num-partitions": count}`` for i in ``range(count)``.
    """
    return [{"partition-id": i, "num-partitions": count} for i in range(count)]


def train_reply(server_round: int, candidate: int, node: int, content: RecordDict | None = None, error: str = ""):
    """A reply to the train message of ``candidate`` in ``server_round`` sent to ``node``, as
    that client would send it: ``content``, or an error reply when ``error`` is given. For
    tests and benchmarks that hand a strategy replies of their own making.

    Parameters
    ----------
    server_round : int
        The round, from 1.
    candidate : int
        The candidate index the train message named.
    node : int
        The node it was sent to.
    content : RecordDict, optional
        The reply's content (e.g. ``{"update": record_of(payload), "metrics": MetricRecord(...)}``).
    error : str, optional
        The reason of an error reply (then ``content`` is ignored).

    Returns
    -------
    Message
        The reply; its group id names the round, candidate and node.
    """
    request = Message(
        RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN, group_id=group_id(server_round, candidate, node)
    )
    request.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    if error:
        return Message(Error(code=0, reason=error), reply_to=request)
    return Message(content if content is not None else RecordDict(), reply_to=request)
