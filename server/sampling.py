"""Which connected clients a round talks to: wait for enough of them, then a seeded draw
over the clients in a stable order.

Flower's node ids are drawn at random when a node registers (in simulation, anew every
run), so a draw over node ids would pick other clients on every run. Each newly seen client
is asked once for the ``partition-id`` of its node config (an ``identity`` query; Flower's
simulation sets the key, ``fedsms-client`` and ``--node-config`` give it in deployment),
and clients are ordered by it: the same seed then draws the same partitions, and the same
candidate goes to the same partition, in every run and after a resume. A client that
cannot answer (a ClientApp without the handler, see ``fedsms_client.toolkit.identity``)
is ordered after the others by node id, and the job says once that its draw is not
reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsms import FedSMSError
from fedsms.config import FederationConfig
from fedsms.schedule import sample_seed
from fedsms_flower.records import CONFIG_KEY, IDENTITY, METRICS_KEY, PARTITION_ID

IDENTITY_TIMEOUT = 60.0  # seconds to wait for identity replies (a SuperNode starts a ClientApp process)


class NotEnoughClients(FedSMSError):
    """Fewer clients than the job needs connected within ``client-wait``."""


class ClientSampler:
    """The clients of each training and evaluation round.

    Parameters
    ----------
    federation : FederationConfig
        ``clients-per-round``, ``min-train-clients``, ``min-available-clients``,
        ``client-wait``, ``fraction-evaluate``, the soup mode.
    num_candidates : int
        The recipe's m (a hyperparameter soup trains m clients per round by default).
    seed : int
        The job's seed; the draw of round r uses ``fedsms.schedule.sample_seed(seed, r)``.
    log : callable
        Receives a line while the sampler waits for clients.
    """

    def __init__(self, federation: FederationConfig, num_candidates: int, seed: int, log: Callable[[str], None]):
        self.fed, self.num_candidates, self.seed, self.log = federation, num_candidates, seed, log
        self.partitions: dict[int, int] = {}  # node id -> the partition-id it reported
        self._asked: set[int] = set()
        self._warned = False

    def train_nodes(self, grid: Grid, server_round: int, exclude: Collection[int] = ()) -> list[int]:
        """The clients of a training round, in candidate order.

        ``clients-per-round`` of the connected ones (by default the m candidates' worth in
        a hyperparameter soup, all in a data soup), drawn with a seed derived from the job's
        seed and the round over the clients in partition order, so every run and a resumed
        job draw what the uninterrupted job drew. A retry leaves out ``exclude`` (the
        clients that failed the round's earlier attempts) while enough others are connected.

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        server_round : int
            The round, from 1.
        exclude : collection of int, optional
            Node ids to leave out if the round can do without them.

        Returns
        -------
        list of int
            Node ids, in partition order (node-id order for clients that reported none).

        Raises
        ------
        NotEnoughClients
            Fewer than ``min-available-clients`` connected within ``client-wait``.
        """
        nodes = self.stable_order(grid, self._wait(grid))
        count = self.fed.clients_per_round or (self.num_candidates if self.fed.mode == "hyperparameter" else len(nodes))
        count = max(count, self.fed.min_train_clients)
        others = [node for node in nodes if node not in exclude]
        if exclude and others and len(others) >= self.fed.min_train_clients:
            nodes = others
        if count >= len(nodes):
            return nodes
        draw = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(sample_seed(self.seed, server_round)))
        return [nodes[i] for i in sorted(draw[:count].tolist())]

    def stable_order(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` by reported partition-id, then the others by node id; clients not seen
        before are asked for their partition-id first (once per client).

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        nodes : list of int
            Connected node ids.

        Returns
        -------
        list of int
            The same node ids in a run-independent order.
        """
        new = [node for node in nodes if node not in self._asked]
        if new:
            self._ask_identity(grid, new)
        unknown = [node for node in nodes if node not in self.partitions]
        if unknown and not self._warned:
            self._warned = True
            self.log(
                f"{len(unknown)} of {len(nodes)} clients reported no partition-id (their ClientApp has no "
                "identity handler: register fedsms_client.toolkit.identity); the clients drawn may differ "
                "between runs"
            )
        return sorted(
            nodes, key=lambda node: (0, self.partitions[node], node) if node in self.partitions else (1, 0, node)
        )

    def _ask_identity(self, grid: Grid, nodes: list[int]) -> None:
        messages = [
            Message(RecordDict({CONFIG_KEY: ConfigRecord()}), dst_node_id=node, message_type=IDENTITY) for node in nodes
        ]
        self._asked.update(nodes)
        for reply in grid.send_and_receive(messages, timeout=min(IDENTITY_TIMEOUT, self.fed.round_timeout)):
            if reply.has_error():
                continue
            try:
                value = reply.content[METRICS_KEY][PARTITION_ID]
            except (KeyError, TypeError):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
                self.partitions[reply.metadata.src_node_id] = value

    def evaluate_nodes(self, grid: Grid) -> list[int]:
        """The clients of an evaluation round: a ``fraction-evaluate`` share of the
        connected ones, the first in id order (at least one; none when the fraction is 0).

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.

        Returns
        -------
        list of int
            Node ids, ascending.
        """
        if self.fed.fraction_evaluate == 0:
            return []
        available = sorted(grid.get_node_ids())
        return available[: max(1, int(round(self.fed.fraction_evaluate * len(available))))]

    def _wait(self, grid: Grid) -> list[int]:
        wanted = max(self.fed.min_train_clients, self.fed.min_available_clients)
        deadline = time.monotonic() + self.fed.client_wait
        announced = -math.inf
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            now = time.monotonic()
            if now >= deadline:
                raise NotEnoughClients(
                    f"only {len(nodes)} of the {wanted} clients the job needs connected within "
                    f"client-wait ({self.fed.client_wait:g} s); start more clients or lower "
                    "min-available-clients / min-train-clients"
                )
            if now - announced >= 10:
                self.log(f"waiting for clients: {len(nodes)} connected, {wanted} needed")
                announced = now
            time.sleep(0.5)
        return nodes
