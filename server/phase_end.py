"""What happens after a phase's last round: the greedy or best-of-m choice, norm
recalibration (on the server's data, or by a federated norm-statistics round) and the
soup diagnostics.

The choice and a server-side recalibration need no clients, so they run as soon as the
round's merge is done (``begin``). A federated recalibration needs the grid: it runs at the
first hook after the merge that has one (``complete``), before the phase's soup is
evaluated or pruned again, and the diagnostics follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedsms.config import FederationConfig, RunConfig
from fedsms.data import DatasetSplits
from fedsms.diagnostics import describe, soup_diagnostics
from fedsms.engine import SoupEngine
from fedsms.merge import Merge, State, state_from_values
from fedsms.norms import NormStatsAverage, NormStatsError, norm_layers
from fedsms.task import CLASSIFICATION, Task
from fedsms_flower.records import CONFIG_KEY, FRACTION, NORM_STATS, PHASE, SERVER_ROUND
from fedsms_server import gate


@dataclass
class _Pending:
    server_round: int
    phase: int
    merge: Merge
    start: State  # the soup the phase's last candidates retrained from
    federated: bool  # norm statistics still to be recalibrated by the clients


class PhaseEnd:
    """Finishes each phase of a federated job.

    Parameters
    ----------
    engine : SoupEngine
        The job's engine (its state becomes the phase's finished soup).
    model : nn.Module
        A model of the job's architecture (scratch space for the diagnostics).
    run : RunConfig
        ``diagnostics``, ``recalibration-fraction``.
    federation : FederationConfig
        ``recalibration``, ``mode``, ``round-timeout``.
    server_data : DatasetSplits or None
        The server's data; without it norm statistics are recalibrated by the clients and
        there are no diagnostics.
    soup_content : callable
        ``soup_content(server_round) -> dict``: the records every server message of the
        round carries (the compact soup and the job settings).
    log : callable
        Receives one line per event.
    """

    def __init__(
        self,
        engine: SoupEngine,
        model: nn.Module,
        run: RunConfig,
        federation: FederationConfig,
        server_data: DatasetSplits | None,
        soup_content: Callable[[int], dict],
        log: Callable[[str], None],
        task: Task = CLASSIFICATION,
    ) -> None:
        self.engine, self.model, self.run, self.fed = engine, model, run, federation
        self.server_data, self.soup_content, self.log, self.task = server_data, soup_content, log, task
        self.federated = bool(norm_layers(model)) and (federation.recalibration == "federated" or server_data is None)
        self._pending: _Pending | None = None

    def keeps_candidates(self, phase: int) -> bool:
        """Whether the last round of ``phase`` must keep its candidates for the diagnostics
        (m times the memory of the running sum): ``diagnostics`` is on, the server holds
        data, and the phase is pruned."""
        return self.run.diagnostics and self.server_data is not None and phase > 0

    @property
    def pending(self) -> int | None:
        """The last round of a phase whose federated recalibration or diagnostics are still
        to come, or None."""
        return self._pending.server_round if self._pending is not None else None

    def begin(self, server_round: int, phase: int, merge: Merge, start: State) -> None:
        """After the phase's last merge: choose (greedy, best) and recalibrate on the
        server's data, unless the clients recalibrate.

        Parameters
        ----------
        server_round : int
            The phase's last round.
        phase : int
            The phase.
        merge : Merge
            The round's merge, already applied to the engine.
        start : dict of str to Tensor
            The soup the round's candidates retrained from.
        """
        self.engine.end_phase(phase, merge, recalibrate=not self.federated)
        self._pending = _Pending(server_round, phase, merge, start, self.federated)

    def cancel(self) -> None:
        """Forget the phase end ``begin`` opened (its round was dropped; it runs again)."""
        self._pending = None

    def complete(self, grid: Grid | None, timeout: float | None = None) -> dict:
        """Finish the phase that ``begin`` opened: the federated recalibration (when the
        clients recalibrate and ``grid`` is given), then the diagnostics.

        Parameters
        ----------
        grid : Grid or None
            Flower's grid; None when the caller has none (a federated recalibration waits).
        timeout : float, optional
            Seconds to wait for the norm statistics (default: ``round-timeout``).

        Returns
        -------
        dict
            The phase's diagnostics (empty when there are none, or the phase still waits).
        """
        pending = self._pending
        if pending is None or (pending.federated and grid is None):
            return {}
        self._pending = None
        if pending.federated:
            self._recalibrate(grid, pending, self.fed.round_timeout if timeout is None else timeout)
        if not self.keeps_candidates(pending.phase) or pending.merge.count < 2:
            return {}
        return self._diagnostics(pending)

    def _recalibrate(self, grid: Grid, pending: _Pending, timeout: float) -> None:
        """Clients re-estimate norm statistics of the soup on their data; the server
        combines them exactly (pooled mean and variance, weighted by examples)."""
        config = {PHASE: pending.phase, SERVER_ROUND: pending.server_round, FRACTION: self.run.recalibration_fraction}
        content = self.soup_content(pending.server_round)
        messages = [
            Message(
                content=RecordDict({**content, CONFIG_KEY: ConfigRecord(config)}),
                dst_node_id=node,
                message_type=NORM_STATS,
            )
            for node in grid.get_node_ids()
        ]
        pooled = NormStatsAverage(self.model)
        for reply in grid.send_and_receive(messages, timeout=timeout):
            try:
                pooled.add(*gate.norm_stats_reply(reply, pooled.template))
            except (gate.Rejected, NormStatsError) as error:
                self.log(
                    f"round {pending.server_round}: rejected norm statistics from node "
                    f"{reply.metadata.src_node_id}: {error}"
                )
        if pooled.count == 0:
            self.log(f"phase {pending.phase}: no client returned norm statistics; keeping the averaged statistics")
            return
        try:
            stats = pooled.result()
        except NormStatsError as error:
            self.log(f"phase {pending.phase}: {error}; keeping the averaged statistics")
            return
        self.engine.state = {**self.engine.state, **stats}
        self.log(f"phase {pending.phase}: norm statistics recalibrated by {pooled.count} clients")

    def _diagnostics(self, pending: _Pending) -> dict:
        """``fedsms.diagnostics.soup_diagnostics`` of the phase's kept candidates against the
        soup they started from, on the server's held-out and test splits, interior points
        recalibrated on the server's training data. Logged as one line."""
        mask = self.engine.mask
        candidates = [state_from_values(values, mask, pending.start) for values in pending.merge.candidates]
        recalibrate = self.engine.hooks.recalibrate
        result = soup_diagnostics(
            self.model,
            pending.start,
            candidates,
            self.engine.state,
            heldout=self.server_data.heldout,
            test=self.server_data.test,
            recalibrate=(lambda state: recalibrate(state, pending.phase)) if recalibrate else False,
            task=self.task,
        )
        self.log(describe(result, f"[fed-{self.fed.mode}] phase {pending.phase}"))
        return result
