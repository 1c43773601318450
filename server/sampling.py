"""Which connected clients a round talks to: wait for enough of them, then a seeded draw."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from flwr.serverapp import Grid

from fedsms import FedSMSError
from fedsms.config import FederationConfig
from fedsms.schedule import sample_seed


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

    def train_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The clients of a training round, in candidate order.

        ``clients-per-round`` of the connected ones (by default the m candidates' worth in
        a hyperparameter soup, all in a data soup), drawn with a seed derived from the job's
        seed and the round, so a resumed job draws what the uninterrupted job drew.

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        server_round : int
            The round, from 1.

        Returns
        -------
        list of int
            Node ids, ascending.

        Raises
        ------
        NotEnoughClients
            Fewer than ``min-available-clients`` connected within ``client-wait``.
        """
        nodes = self._wait(grid)
        count = self.fed.clients_per_round or (self.num_candidates if self.fed.mode == "hyperparameter" else len(nodes))
        count = max(count, self.fed.min_train_clients)
        if count >= len(nodes):
            return nodes
        draw = torch.randperm(len(nodes), generator=torch.Generator().manual_seed(sample_seed(self.seed, server_round)))
        return [nodes[i] for i in sorted(draw[:count].tolist())]

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
