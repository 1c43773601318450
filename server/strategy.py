"""``SparseSoupStrategy``: Sparse Model Soups as a Flower strategy.

A thin adapter between Flower messages and ``fedsms.engine.SoupEngine``, which owns the
mask and the soup. Each server round belongs to a phase (phase 0: optional dense
pretraining rounds); ``start`` runs one round top to bottom:

1. prune, when the round opens a phase (or a GMP interval);
2. send the soup (values under the mask + mask bits) and each client's candidate
   hyperparameters; every reply passes the codec's validating gate and streams into the
   engine's merge; too few valid replies: send the round again, then stop the job;
3. after the last round of a phase: greedy choice and norm recalibration (on server-held
   data, or by a federated round);
4. federated and central evaluation, one JSON line, a round checkpoint.

When every round has run (or the job stopped), the strategy writes ``summary.json``,
``results.jsonl``, plots and the final model to its ``out_dir``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedsms import FedSMSError, codec, safefile
from fedsms.checkpoint import Checkpoint, check_compatible, export_model, remove_stale, save_checkpoint
from fedsms.config import FederationConfig, RunConfig, soup_shaping_changes
from fedsms.data import DatasetSplits
from fedsms.diagnostics import describe, soup_diagnostics
from fedsms.engine import Merge, PhaseHooks, SoupEngine, data_hooks
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.masks import Mask, dense_mask, prunable_names, sparsity
from fedsms.norms import NormStatsAverage, NormStatsError, norm_layers
from fedsms.plots import plot_diagnostics, plot_results
from fedsms.recipe import CandidateConfig, for_phase
from fedsms.report import final_table, phase_table
from fedsms.schedule import Round, federated_rounds
from fedsms_flower.records import JOB_KEY, record_of
from fedsms_server import gate
from fedsms_server.flower_layout import ARRAYS_KEY, read_update, record_bytes, soup_record

NORM_STATS = "query.norm_stats"  # message type of the federated recalibration round


MAX_EXAMPLES = gate.MAX_EXAMPLES  # a reply claiming more is not believed


class JobStopped(FedSMSError):
    """The job stopped at its last completed round; its outputs and checkpoint are written."""


class RoundFailed(JobStopped):
    """Too few valid replies after every retry: the job stops at the last completed round."""


@dataclass
class Update:
    """One client's training reply, unpacked from its Message."""

    node: int
    payload: bytes = b""  # a compact reply (fedsms clients)
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the reply is unusable, before decoding
    arrays: ArrayRecord | None = None  # a reply in Flower's standard layout (unchanged ClientApps)

    @property
    def nbytes(self) -> int:
        """Bytes of the model data the reply carried."""
        return record_bytes(self.arrays) if self.arrays is not None else len(self.payload)


def unpack_reply(reply: Message, node: int) -> Update:
    """Unpack one training reply through the gate into an ``Update``.

    A reply the gate rejects becomes an ``Update`` carrying its reason in ``error``, so the
    strategy can log it and leave the soup untouched.

    Parameters
    ----------
    reply : Message
        A client's reply to a train message.
    node : int
        The client the reply answers for (the SuperLink itself answers, under its own node
        id, for a client that stopped sending heartbeats).

    Returns
    -------
    Update
        The compact payload or, for Flower's standard layout, the ``ArrayRecord``, with the
        checked metrics; or an ``Update`` with only ``error`` set.
    """
    try:
        model, metrics = gate.train_reply(reply)
    except gate.Rejected as error:
        return Update(node, error=str(error))
    if isinstance(model, ArrayRecord):  # Flower's standard layout
        return Update(node, metrics=metrics, arrays=model)
    return Update(node, model, metrics)


@dataclass
class RoundLog:
    """What one server round did; written as one JSON line."""

    server_round: int
    phase: int
    round_in_phase: int
    sparsity: float
    clients: int = 0
    accepted: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0  # server → clients, all clients of the round together
    bytes_up: int = 0  # clients → server
    train: dict = field(default_factory=dict)
    federated_eval: dict = field(default_factory=dict)
    central_eval: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # soup diagnostics of a phase's last round
    seconds: float = 0.0


class SparseSoupStrategy(Strategy):
    """Sparse Model Soups as a Flower strategy: the server owns the mask and the soup.

    Parameters
    ----------
    run : RunConfig
        What shapes the soup: target sparsity, phases, candidates and their recipe, the
        merge rule, pruning, retraining hyperparameters, seed, ``out_dir``.
    federation : FederationConfig
        How the federation runs: soup mode, rounds per phase, pruning schedule,
        partitioning, client counts, wire dtype, recalibration, timeouts, retries.
    model : nn.Module
        A model of the job's architecture holding the starting weights (a pretrained dense
        model, or fresh weights that the dense pretraining rounds train). Clients must hold
        the same architecture.
    server_data : DatasetSplits, optional
        Data held by the server: central evaluation, norm recalibration and the held-out
        split of the greedy soup. Without it, norm statistics are recalibrated by a
        federated round and greedy merges are refused.
    out_dir : str or Path, optional
        Where round lines, checkpoints, results and the final model go (default:
        ``run.out_dir``); a relative path is resolved against the current folder now.
    log : callable, optional
        Receives one line per event (default: Flower's logger, at INFO).
    """

    def __init__(
        self,
        run: RunConfig,
        federation: FederationConfig,
        model: nn.Module,
        *,
        server_data: DatasetSplits | None = None,
        out_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if run.merge == "greedy" and server_data is None:
            raise FedSMSError(
                "merge 'greedy' needs a held-out split on the server; give the strategy server_data "
                "or use merge 'uniform' or 'weighted'"
            )
        self.run, self.fed = run, federation
        self.model = model.cpu()
        self.server_data = server_data
        self.out_dir = Path(out_dir if out_dir is not None else run.out_dir).resolve()
        self.log = log or (lambda line: flower_log(INFO, line))
        names = prunable_names(model, keep_first_dense=run.keep_first_dense, keep_last_dense=run.keep_last_dense)
        hooks = PhaseHooks()
        if server_data is not None:
            hooks = data_hooks(self.model, server_data, fraction=run.recalibration_fraction, seed=run.seed)
        self.engine = SoupEngine(
            model.state_dict(),
            dense_mask(model, names),
            pruning=run.pruning,
            seed=run.seed,
            hooks=hooks,
            log=lambda line: self.log(line),
        )
        self.candidates = run.candidate_configs()
        self.schedule: list[Round] = federated_rounds(run, federation)
        self.rounds: list[RoundLog] = []  # the completed rounds
        self.current: RoundLog | None = None  # the round in progress
        self.round_offset = 0  # rounds done before this process started (a resumed job)
        self._merge: Merge | None = None
        self._round_start: dict[str, torch.Tensor] = {}  # the soup the last merged round's candidates started from
        self._sent: list[Message] = []  # this round's train messages, in candidate order
        self._started = time.perf_counter()
        self._good: tuple | None = None  # the soup, mask and digest of the last completed round
        self._stopped = ""
        self._reader_cache: codec.UpdateReader | None = None  # the current mask's reply reader, built once per mask

    # ---- the job's shape ---------------------------------------------------------------

    @property
    def soup(self) -> dict[str, torch.Tensor]:
        """The current soup (a full state dict, zero outside the mask)."""
        return self.engine.state

    @property
    def mask(self) -> Mask:
        """The current global mask."""
        return self.engine.mask

    @property
    def digest(self) -> str:
        """Digest of the current mask; every reply must name it."""
        return self.engine.digest

    @property
    def num_rounds(self) -> int:
        """Server rounds of the whole job."""
        return len(self.schedule)

    @property
    def rounds_left(self) -> int:
        """Server rounds still to run."""
        return self.num_rounds - self.round_offset

    def phase_at(self, server_round: int) -> tuple[int, int]:
        """(phase, round within phase) of ``server_round``.

        Parameters
        ----------
        server_round : int
            A server round of the job, from 1.

        Returns
        -------
        tuple of (int, int)
            The phase (0: dense pretraining) and the round's index within it.
        """
        step = self.schedule[server_round - 1]
        return step.phase, step.round_in_phase

    def ends_phase(self, server_round: int) -> bool:
        """Whether ``server_round`` is the last round of its phase.

        Parameters
        ----------
        server_round : int
            A server round of the job, from 1.

        Returns
        -------
        bool
            True for the round after which the phase ends (greedy choice, recalibration).
        """
        return self.schedule[server_round - 1].ends_phase

    def summary(self) -> None:
        """Log the job's shape (Flower calls this at the start)."""
        self.log(
            f"SparseSoupStrategy: {self.fed.mode} soup, {self.run.phases} phases to "
            f"{self.run.target_sparsity:.0%} sparsity ({self.run.pruning} magnitude), "
            f"{self.fed.pretrain_rounds} dense + {self.fed.rounds_per_phase}/phase rounds, "
            f"merge {self.run.merge}, values as {self.fed.value_dtype}; results in {self.out_dir}"
        )

    # ---- one job, one round after the other ----------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the job's remaining rounds, then write its outputs.

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        initial_arrays : ArrayRecord, optional
            Ignored: the soup starts from the ``model`` given to the constructor (or a
            restored checkpoint). Accepted so ``start`` is called as for any strategy.
        num_rounds : int, optional
            Rounds to run (default: every remaining round of the schedule).
        timeout : float, optional
            Seconds to wait for a round's replies (default: ``round-timeout``).
        train_config, evaluate_config : ConfigRecord, optional
            Extra entries added to every train / evaluate message's config.
        evaluate_fn : callable, optional
            ``evaluate_fn(server_round, arrays)``, called after each round as Flower's
            strategies do, besides the strategy's own central evaluation.

        Returns
        -------
        Result
            The final soup and the metrics of every round.

        Raises
        ------
        RoundFailed
            After every retry a round had fewer than ``min-train-clients`` valid replies.
            The outputs of the completed rounds are written first.
        """
        self.summary()
        for stale in remove_stale(self.out_dir / "checkpoints" / "soup"):
            self.log(f"removed {stale.name}, left by a checkpoint that was interrupted")
        timeout = self.fed.round_timeout if timeout is None else timeout
        extra_train, extra_evaluate = dict(train_config or {}), dict(evaluate_config or {})
        result = Result()
        todo = self.schedule[self.round_offset :][: num_rounds or None]
        try:
            for step in todo:
                self.run_round(grid, step, timeout, extra_train, extra_evaluate)
                log = self.rounds[-1]
                result.train_metrics_clientapp[step.number] = MetricRecord(log.train)
                if log.federated_eval:
                    result.evaluate_metrics_clientapp[step.number] = MetricRecord(log.federated_eval)
                if log.central_eval:
                    result.evaluate_metrics_serverapp[step.number] = MetricRecord(log.central_eval)
                if (
                    evaluate_fn is not None
                    and (metrics := evaluate_fn(step.number, ArrayRecord(self.soup))) is not None
                ):
                    result.evaluate_metrics_serverapp[step.number] = metrics
        except RoundFailed as error:
            self._stop(str(error))
            raise
        except Exception as error:  # any other failure ends the job as a failed round does
            reason = gate.short(f"{type(error).__name__}: {error}", 400)
            done = self.rounds[-1].server_round if self.rounds else self.round_offset
            self._stop(
                f"unexpected error during round {done + 1} ({reason}); the job stopped at the last "
                f"completed round ({done}); fix the cause, then rerun with --resume"
            )
            raise JobStopped(self._stopped) from error
        self.write_outputs()
        result.arrays = ArrayRecord(self.soup)
        return result

    def _stop(self, reason: str) -> None:
        """Back to the last completed round's soup, then the outputs with ``reason``."""
        self._stopped = reason
        if self._good is not None:
            self.engine.state, self.engine.mask, self.engine.digest = self._good
        try:
            self.write_outputs(stopped=reason)
        except Exception as error:  # the summary must not hide the first failure
            self.log(f"job stopped ({reason}); writing its outputs failed too: {gate.short(error)}")

    def run_round(self, grid: Grid, step: Round, timeout: float, extra_train: dict, extra_evaluate: dict) -> None:
        """One server round, top to bottom.

        Prunes when the round opens a phase, sends the train messages and merges the replies
        (sending the round again, up to ``round-retries`` times, while fewer than
        ``min-train-clients`` replies are valid), ends the phase when it is the phase's last
        round, runs federated evaluation, then writes the round's line and checkpoint.

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        step : Round
            The schedule's entry for this round.
        timeout : float
            Seconds to wait for each batch of replies.
        extra_train, extra_evaluate : dict
            Extra entries added to every train / evaluate message's config.

        Raises
        ------
        RoundFailed
            Every attempt had fewer than ``min-train-clients`` valid replies, or too few
            clients connected within ``client-wait``.
        """
        self._good = (self.engine.state, self.engine.mask, self.engine.digest)  # replaced, never mutated
        self.begin_round(step.number)
        for attempt in range(self.fed.round_retries + 1):
            if attempt:
                self.log(f"round {step.number}: retrying ({attempt} of {self.fed.round_retries})")
            messages = self.configure_train(step.number, ArrayRecord(), ConfigRecord(extra_train), grid)
            self.aggregate_train(step.number, grid.send_and_receive(messages, timeout=timeout))
            if self.current.accepted >= self.fed.min_train_clients:
                break
        else:
            raise RoundFailed(self._failure(step.number))
        if step.ends_phase:
            self.finish_phase(step.number, grid, timeout)
        messages = self.configure_evaluate(step.number, ArrayRecord(), ConfigRecord(extra_evaluate), grid)
        if messages:
            self.aggregate_evaluate(step.number, grid.send_and_receive(messages, timeout=timeout))
        self.end_round(step.number)

    def begin_round(self, server_round: int) -> bytes:
        """Start ``server_round``: prune first if it opens a phase (or a GMP interval).

        Also opens the round's ``RoundLog`` and logs the round's phase and sparsity.

        Parameters
        ----------
        server_round : int
            The round to start, from 1.

        Returns
        -------
        bytes
            The soup payload the round sends (see ``soup_payload``).
        """
        step = self.schedule[server_round - 1]
        if step.prune is not None:
            self.engine.prune(step.prune)
        self.current = RoundLog(server_round, step.phase, step.round_in_phase, sparsity(self.mask))
        phase, _ = self.phase_at(server_round)
        self.log(f"round {server_round}: phase {phase} round {step.round_in_phase}, sparsity {sparsity(self.mask):.2%}")
        return self.soup_payload(server_round)

    def soup_payload(self, server_round: int) -> bytes:
        """The soup as the clients receive it: values under the mask and the mask bits.

        Parameters
        ----------
        server_round : int
            The round the payload is stamped with (with its phase).

        Returns
        -------
        bytes
            The ``codec.encode`` payload of kind ``soup``, values as ``value-dtype``.
        """
        return codec.encode(
            self.soup,
            self.mask,
            phase=self.phase_at(server_round)[0],
            round=server_round,
            kind="soup",
            value_dtype=self.fed.value_dtype,
        )

    def _soup_entry(self, server_round: int) -> tuple[dict, int]:
        """The soup under its record key, as the clients read it, and its bytes: the compact
        payload (values under the mask and the mask bits), or for unchanged Flower
        ClientApps (``client-protocol = flower``) the dense ``ArrayRecord``."""
        if self.fed.client_protocol == "flower":
            record = soup_record(self.soup)
            return {ARRAYS_KEY: record}, record_bytes(record)
        payload = self.soup_payload(server_round)
        return {"soup": record_of(payload)}, len(payload)

    # ---- training ----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client: the soup payload, the client's candidate hyperparameters
        and the job's settings (a client needs no run config of its own).

        The clients are drawn from the connected nodes (``clients-per-round``, seeded by the
        job's seed and the round), waiting at most ``client-wait`` seconds for enough of them.
        With ``client-protocol = flower`` the soup goes as a dense ``ArrayRecord``.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        arrays : ArrayRecord
            Ignored: the strategy sends its own soup. Accepted as Flower's signature has it.
        config : ConfigRecord
            Extra entries added to every message's config.
        grid : Grid
            Flower's grid to the clients.

        Returns
        -------
        list of Message
            One train message per sampled client, in candidate order.

        Raises
        ------
        RoundFailed
            Fewer than the needed clients connected within ``client-wait``.
        """
        phase, _ = self.phase_at(server_round)
        soup, nbytes = self._soup_entry(server_round)
        nodes = self._sample(grid, server_round)
        self.current.clients = len(nodes)
        self.current.bytes_down += nbytes * len(nodes)
        messages = []
        for i, node in enumerate(nodes):
            candidate = self.candidate_for(i, phase, server_round)
            content = RecordDict(
                {
                    **soup,
                    "config": ConfigRecord(
                        {
                            **dict(config),
                            **candidate.to_dict(),
                            "phase": phase,
                            "server-round": server_round,
                            "candidate": i,
                            "num-candidates": len(nodes),
                            **self._job_flags(server_round),
                        }
                    ),
                    JOB_KEY: self._job_record(),
                }
            )
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stream this attempt's replies into the merge, in candidate order.

        Clients sent the round that did not reply are recorded as rejected.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The replies to this attempt's train messages.

        Returns
        -------
        tuple of (ArrayRecord or None, MetricRecord or None)
            The new soup and the mean training metrics, or ``(None, None)`` when fewer than
            ``min-train-clients`` replies were valid (the soup is then unchanged).
        """
        metrics = self.aggregate_updates(server_round, self._updates_in_candidate_order(server_round, list(replies)))
        if self.current.accepted < self.fed.min_train_clients:
            return None, None
        return ArrayRecord(self.soup), MetricRecord(metrics)

    def _updates_in_candidate_order(self, server_round: int, replies: list[Message]) -> Iterator[Update]:
        """The replies' updates, unpacked one at a time (each payload copy lives only while
        it is averaged) in candidate order, not arrival order: the float sum, hence the
        soup, is then reproducible. Clients sent the round that did not answer in time (dead
        or straggling) are recorded as rejected."""
        # The Grid gave each message its id when it sent it; the SuperLink answers for a dead client.
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        candidate_of_node = {m.metadata.dst_node_id: i for i, m in enumerate(self._sent)}
        nodes = [node_of_message.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]
        for node in candidate_of_node.keys() - set(nodes):
            reason = f"no reply within round-timeout ({self.fed.round_timeout:g} s)"
            self.current.rejected[node] = reason
            self.log(f"round {server_round}: node {node}: {reason}")
        order = sorted(range(len(replies)), key=lambda i: candidate_of_node.get(nodes[i], len(candidate_of_node)))
        for i in order:
            yield unpack_reply(replies[i], nodes[i])

    def aggregate_updates(self, server_round: int, updates: Iterable[Update]) -> dict[str, float]:
        """Stream every valid update into a new merge; with at least ``min-train-clients``
        of them the soup becomes their masked average. Invalid updates are logged with their
        reason and never touch the soup.

        The merge rule is the job's ``merge`` (``uniform`` in phase 0 when it is ``greedy``);
        updates the merge drops for their norm (``update-norm-bound``) are recorded as
        rejected.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        updates : iterable of Update
            The unpacked replies, in the order they are merged.

        Returns
        -------
        dict of str to float
            Each training metric's mean over the valid replies that report it; empty when
            fewer than ``min-train-clients`` were valid.
        """
        step = self.schedule[server_round - 1]
        rule = "uniform" if step.phase == 0 and self.run.merge == "greedy" else self.run.merge
        merge = self.engine.merge(
            rule,
            ends_phase=step.ends_phase,
            keep=self.diagnosing(server_round),
            trim_fraction=self.run.trim_fraction,
            max_weight=self.run.max_client_weight,
            norm_bound=self.run.update_norm_bound,
        )
        metrics: dict[str, list] = {}  # key -> [sum, count] over the replies that report it
        added: list[int] = []  # the nodes of the merged candidates, in order
        log = self.current
        reader = self._reader(step.phase, server_round)
        for update in updates:
            node, nbytes, reply_metrics = update.node, update.nbytes, update.metrics
            try:
                decoded, reason = self._decode_update(update, reader), ""
            except codec.PayloadError as error:
                decoded, reason = None, gate.short(error)
            update = None  # the payload may go before the next reply is unpacked (one reply held, not two)
            if decoded is None:
                log.rejected[node] = reason
                self.log(f"round {server_round}: rejected reply from node {node}: {reason}")
                continue
            log.bytes_up += nbytes
            if isinstance(decoded[0], codec.FlatReply):  # read in place: summed without a copy
                merge.add_reply(*decoded)
            else:
                merge.add(*decoded)
            decoded = None  # the payload's memory may go once it is summed
            added.append(node)
            for key, value in reply_metrics.items():  # each key over the replies that report it
                total = metrics.setdefault(key, [0.0, 0])
                total[0] += float(value)
                total[1] += 1
        log.accepted = merge.count
        if merge.count < self.fed.min_train_clients:
            self.log(
                f"round {server_round}: only {merge.count} valid replies (min-train-clients is "
                f"{self.fed.min_train_clients}); the soup stays as it was"
            )
            return {}
        self._round_start = self.engine.state  # what the candidates retrained from (replaced, never mutated)
        self.engine.end_round(merge)
        for i in merge.dropped:
            log.rejected[added[i]] = "its update is far larger than the round's median (update-norm-bound)"
        log.accepted = merge.count
        self._merge = merge
        log.train = {key: total / count for key, (total, count) in metrics.items()}
        return log.train

    def finish_phase(self, server_round: int, grid: Grid | None = None, timeout: float | None = None) -> None:
        """After a phase's last round: greedy choice and norm recalibration, on the server's
        data or, without it or when asked, by a federated norm-statistics round.

        Parameters
        ----------
        server_round : int
            The phase's last round.
        grid : Grid, optional
            Flower's grid to the clients; needed only for a federated recalibration.
        timeout : float, optional
            Seconds to wait for the norm-statistics replies (default: ``round-timeout``).
        """
        phase, _ = self.phase_at(server_round)
        federated = norm_layers(self.model) and (self.fed.recalibration == "federated" or self.server_data is None)
        self.engine.end_phase(phase, self._merge, recalibrate=not federated)
        if federated:
            if grid is None:
                raise FedSMSError("this phase needs a federated norm recalibration; pass the grid to finish_phase")
            self._federated_recalibration(server_round, grid, self.fed.round_timeout if timeout is None else timeout)
        if self.diagnosing(server_round) and self._merge.count > 1:
            self.current.diagnostics = self.phase_diagnostics(server_round)

    def diagnosing(self, server_round: int) -> bool:
        """Whether ``server_round`` ends with soup diagnostics: ``diagnostics`` is on, the
        server holds data, and the round is the last of a pruned phase. Only then does the
        round's merge keep its candidates (m times the memory of the running sum).

        Parameters
        ----------
        server_round : int
            A server round of the job, from 1.

        Returns
        -------
        bool
            True when ``finish_phase`` computes diagnostics after this round.
        """
        step = self.schedule[server_round - 1]
        return self.run.diagnostics and self.server_data is not None and step.ends_phase and step.phase > 0

    def phase_diagnostics(self, server_round: int) -> dict:
        """``fedsms.diagnostics.soup_diagnostics`` of the phase's last round: its kept
        candidates against the soup they started from, on the server's held-out and test
        splits, interior points recalibrated on the server's training data (as the soup is
        with ``recalibration = server``). Logged as one line.

        Parameters
        ----------
        server_round : int
            The phase's last round, after ``end_phase``.

        Returns
        -------
        dict
            What ``soup_diagnostics`` returns.
        """
        phase, _ = self.phase_at(server_round)
        start = self._round_start
        candidates = [codec.state_from_values(values, self.mask, start) for values in self._merge.candidates]
        recalibrate = self.engine.hooks.recalibrate
        result = soup_diagnostics(
            self.model,
            start,
            candidates,
            self.soup,
            heldout=self.server_data.heldout,
            test=self.server_data.test,
            recalibrate=(lambda state: recalibrate(state, phase)) if recalibrate else False,
        )
        self.log(describe(result, f"[fed-{self.fed.mode}] phase {phase}"))
        return result

    def _federated_recalibration(self, server_round: int, grid: Grid, timeout: float) -> None:
        """Clients re-estimate norm statistics of the soup on their data; the server
        combines them exactly (pooled mean and variance, weighted by examples)."""
        phase, _ = self.phase_at(server_round)
        payload = self.soup_payload(server_round)
        messages = [
            Message(
                content=RecordDict(
                    {
                        "soup": record_of(payload),
                        JOB_KEY: self._job_record(),
                        "config": ConfigRecord(
                            {"phase": phase, "server-round": server_round, "fraction": self.run.recalibration_fraction}
                        ),
                    }
                ),
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
                    f"round {server_round}: rejected norm statistics from node {reply.metadata.src_node_id}: {error}"
                )
        if pooled.count == 0:
            self.log(f"phase {phase}: no client returned norm statistics; keeping the averaged statistics")
            return
        self.engine.state = {**self.soup, **pooled.result()}
        self.log(f"phase {phase}: norm statistics recalibrated by {pooled.count} clients")

    # ---- evaluation ------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The soup to a ``fraction-evaluate`` share of the clients, for federated evaluation.

        The clients are the first of the connected nodes in id order (at least one).

        Parameters
        ----------
        server_round : int
            The round, from 1.
        arrays : ArrayRecord
            Ignored: the strategy sends its own soup. Accepted as Flower's signature has it.
        config : ConfigRecord
            Extra entries added to every message's config.
        grid : Grid
            Flower's grid to the clients.

        Returns
        -------
        list of Message
            One evaluate message per chosen client; empty when ``fraction-evaluate`` is 0.
        """
        if self.fed.fraction_evaluate == 0:
            return []
        available = sorted(grid.get_node_ids())
        count = max(1, int(round(self.fed.fraction_evaluate * len(available))))
        phase, _ = self.phase_at(server_round)
        soup, nbytes = self._soup_entry(server_round)
        self.current.bytes_down += nbytes * count
        evaluate_config = ConfigRecord(
            {
                **dict(config),
                "phase": phase,
                "server-round": server_round,
                "ood": self.run.ood,
                "ood-examples": self.run.ood_examples,
                **self._job_flags(server_round),
            }
        )
        return [
            Message(
                content=RecordDict({**soup, "config": evaluate_config, JOB_KEY: self._job_record()}),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in available[:count]
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics.

        Replies the gate rejects are logged and left out.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The replies to the round's evaluate messages.

        Returns
        -------
        MetricRecord or None
            The weighted means (``num-examples`` left out), also kept as the round's
            ``federated_eval``; None when no reply was valid.
        """
        totals, examples = {}, 0
        for reply in replies:
            try:
                metrics, n = gate.evaluate_reply(reply)
            except gate.Rejected as error:
                self.log(f"round {server_round}: evaluation rejected from node {reply.metadata.src_node_id}: {error}")
                continue
            examples += n
            for key, value in metrics.items():
                if key != "num-examples":
                    totals[key] = totals.get(key, 0.0) + float(value) * n
        if not examples:
            return None
        self.current.federated_eval = {k: v / examples for k, v in totals.items()}
        return MetricRecord(self.current.federated_eval)

    def central_evaluation(self) -> dict[str, float]:
        """The soup on the server's test data (empty without server data)."""
        if self.server_data is None:
            return {}
        self.model.load_state_dict(self.soup)
        metrics = evaluate(self.model, self.server_data.test)
        if self.run.ood:
            ood = evaluate_ood(self.model, self.server_data.test.head(self.run.ood_examples), seed=self.run.seed)
            metrics.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return {k: float(v) for k, v in metrics.items()}

    # ---- records -----------------------------------------------------------------------

    def end_round(self, server_round: int) -> None:
        """Evaluate the soup centrally, write the round's JSON line and checkpoint the round.

        Parameters
        ----------
        server_round : int
            The round that ends.
        """
        log = self.current
        log.central_eval = self.central_evaluation()
        log.seconds = round(time.perf_counter() - self._started, 3)
        self._started = time.perf_counter()
        self.rounds.append(log)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        safefile.append_line(self.out_dir / "rounds.jsonl", json.dumps(log.__dict__) + "\n")
        self.save_checkpoint(server_round)

    def phase_rows(self) -> list[dict]:
        """The last round of every phase as a result row, in the local driver's format."""
        rows = []
        gmp = "-gmp" if self.fed.pruning_schedule == "gmp" else ""
        for log in self.rounds:
            if self.ends_phase(log.server_round):
                metrics = log.central_eval or log.federated_eval
                rows.append(
                    {
                        "method": "fed-dense" if log.phase == 0 else f"fed-{self.fed.mode}{gmp}",
                        "seed": self.run.seed,
                        "phase": log.phase,
                        "sparsity": log.sparsity,
                        **{k: metrics[k] for k in ("accuracy", "loss", "ece", "ood_accuracy") if k in metrics},
                        **({"diagnostics": log.diagnostics} if log.diagnostics else {}),
                    }
                )
        return rows

    def write_outputs(self, stopped: str = "") -> Path:
        """``final_model``, ``results.jsonl``, plots and ``summary.json`` in ``out_dir``;
        ``stopped`` says why the job ended early (empty when every round ran).

        Plots and the result tables are made only when every phase row has an accuracy.

        Parameters
        ----------
        stopped : str, optional
            Why the job ended early, recorded in ``summary.json`` (default: empty).

        Returns
        -------
        Path
            ``out_dir``.
        """
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.model.load_state_dict(self.soup)
        final = export_model(out / "final_model", self.model, self._model_metadata())
        rows = self.phase_rows()
        safefile.write_text(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        if rows and all("accuracy" in r for r in rows):
            plot_results(rows, out)
            plot_diagnostics(rows, out)
            self.log("\n" + phase_table(rows) + "\n" + final_table(rows))
        safefile.write_text(
            out / "summary.json",
            json.dumps(
                {
                    "config": self._settings(),
                    "model": self._model_metadata(),
                    "phases": rows,
                    "bytes_down": sum(r.bytes_down for r in self.rounds),
                    "bytes_up": sum(r.bytes_up for r in self.rounds),
                    "final_model": str(final),
                    "stopped": stopped,
                },
                indent=2,
            ),
        )
        self.log(f"job {'stopped: ' + stopped if stopped else 'finished'}; results in {out}")
        return out

    def save_checkpoint(self, server_round: int) -> Path:
        """The round checkpoint a resumed job continues from.

        Written to ``out_dir/checkpoints/soup``: the soup, the mask, and metadata with the
        phase, round, model, data set, settings, central metrics and every round's record.

        Parameters
        ----------
        server_round : int
            The round just completed.

        Returns
        -------
        Path
            What ``fedsms.checkpoint.save_checkpoint`` returns for the checkpoint.
        """
        phase, r = self.phase_at(server_round)
        return save_checkpoint(
            self.out_dir / "checkpoints" / "soup",
            self.soup,
            self.mask,
            {
                "phase": phase,
                "round_in_phase": r,
                "server_round": server_round,
                **self._model_metadata(),
                "dataset": self.run.dataset,
                "config": self._settings(),
                "metrics": self.rounds[-1].central_eval if self.rounds else {},
                "rounds": [log.__dict__ for log in self.rounds],  # the history a resumed job continues
            },
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a round checkpoint written by ``save_checkpoint`` under the same settings.

        Settings that do not shape the soup may differ. The round history is restored and
        ``rounds.jsonl`` rewritten from it (a line for a round whose checkpoint never landed
        is dropped; that round reruns).

        Parameters
        ----------
        checkpoint : Checkpoint
            A checkpoint loaded from ``out_dir/checkpoints/soup``.

        Raises
        ------
        FedSMSError
            The checkpoint was written under other soup-shaping settings, does not fit the
            model (names, shapes or dtypes), lacks or has a damaged config or round
            history, or is of a round outside this job's schedule.
        """
        meta = checkpoint.metadata
        saved = meta.get("config", {})
        if not isinstance(saved, dict):
            raise FedSMSError(
                "the checkpoint's 'config' is not a JSON object; it is damaged, start a new job in another --out-dir"
            )
        mine = self._settings()
        changed = soup_shaping_changes(saved, mine)  # keys declared with shapes_soup=False may change
        if changed:
            shown = ", ".join(f"{k.replace('_', '-')}={saved.get(k)!r} (now {mine[k]!r})" for k in changed[:4])
            raise FedSMSError(
                f"the checkpoint was written by a job with other settings: {shown}; "
                "resume with the same settings or start a new job in another --out-dir"
            )
        check_compatible(checkpoint, self.model)
        for name, tensor in self.model.state_dict().items():
            if checkpoint.state[name].dtype != tensor.dtype:
                raise FedSMSError(
                    f"the checkpoint holds {name!r} as {checkpoint.state[name].dtype}, not "
                    f"{tensor.dtype}; it was not written by this job, start a new job in another --out-dir"
                )
        done, history = meta.get("server_round"), meta.get("rounds")
        if not isinstance(done, int) or not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise FedSMSError(
                "the checkpoint lacks 'server_round' (int) or 'rounds' (list of round records); "
                "it is not a fedsms server checkpoint, start a new job in another --out-dir"
            )
        if not 1 <= done <= self.num_rounds:
            raise FedSMSError(
                f"the checkpoint is of round {done}, outside this job's {self.num_rounds} rounds; start a new job"
            )
        try:
            self.rounds = [RoundLog(**log) for log in history]
        except TypeError as error:
            raise FedSMSError(
                f"the checkpoint's round history does not fit this fedsms ({error}); start a new job"
            ) from None
        self.engine.restore(checkpoint.state, checkpoint.mask)
        self.round_offset = done
        # rounds.jsonl may hold a line for a round whose checkpoint never landed: that round reruns.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        safefile.write_text(
            self.out_dir / "rounds.jsonl", "".join(json.dumps(log.__dict__) + "\n" for log in self.rounds)
        )
        self.log(
            f"resumed after round {done} (phase {self.phase_at(done)[0]}, sparsity {sparsity(self.mask):.2%}); "
            f"{self.rounds_left} rounds left"
        )

    # ---- helpers -----------------------------------------------------------------------

    def _settings(self) -> dict:
        return {**self.run.to_dict(), **self.fed.to_dict()}

    def _job_record(self) -> ConfigRecord:
        """Every job setting, under its run-config name: what shapes a client's work
        travels with the message, so a client is correct with an empty run config."""
        return ConfigRecord({k.replace("_", "-"): v for k, v in self._settings().items()})

    def _model_metadata(self) -> dict:
        params = dict(self.model.named_parameters())
        return {
            "model": self.run.model,
            "model_class": type(self.model).__name__,
            "parameters": sum(p.numel() for p in params.values()),
            "prunable": sum(params[n].numel() for n in self.mask),
        }

    def _failure(self, server_round: int) -> str:
        """Why a round failed, in one sentence: what the clients reported, or that none answered."""
        reasons = sorted(set(self.current.rejected.values()))
        said = f"; clients reported: {' | '.join(reasons[:3])}" if reasons else ""
        advice = (
            "fix what the clients reported"
            if any("timeout" not in r for r in reasons)
            else "start more clients or lower min-train-clients"
        )
        return (
            f"round {server_round} got {self.current.accepted} valid replies after {self.fed.round_retries} "
            f"retries, fewer than min-train-clients={self.fed.min_train_clients}{said}; {advice}, then rerun with "
            "--resume to continue from the last completed round"
        )

    def _job_flags(self, server_round: int) -> dict:
        """Lets clients tell when the job is over (``fedsms-client`` exits then)."""
        return {"last-round": server_round == self.num_rounds, "out-dir": str(self.out_dir)}

    def candidate_for(self, index: int, phase: int, server_round: int) -> CandidateConfig:
        """The hyperparameters of the ``index``-th client of ``server_round``: its recipe
        candidate (hyperparameter soup) or the base config with its own seed (data soup).

        In phase 0 every client gets the pretraining config with its own seed. The seed is
        then shifted per phase (``for_phase``) and by ``101 * server_round``.

        Parameters
        ----------
        index : int
            The client's position among the round's clients (its candidate index).
        phase : int
            The round's phase.
        server_round : int
            The round, from 1.

        Returns
        -------
        CandidateConfig
            The hyperparameters the client trains with.
        """
        if phase == 0:
            base = replace(self.run.pretrain_candidate(), seed=self.run.seed + index)
        elif self.fed.mode == "hyperparameter":
            base = self.candidates[index % len(self.candidates)]
        else:
            base = replace(self.run.base_candidate(), seed=self.run.seed + index)
        return replace(for_phase(base, phase), seed=for_phase(base, phase).seed + 101 * server_round)

    def _sample(self, grid: Grid, server_round: int) -> list[int]:
        """The clients of a training round: ``clients-per-round`` of the connected ones (by
        default the m candidates' worth in a hyperparameter soup, all in a data soup),
        drawn with a seed derived from the job's seed and the round. Waits at most
        ``client-wait`` seconds for ``min-available-clients``."""
        wanted = max(self.fed.min_train_clients, self.fed.min_available_clients)
        deadline = time.monotonic() + self.fed.client_wait
        announced = -math.inf
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            now = time.monotonic()
            if now >= deadline:
                raise RoundFailed(
                    f"only {len(nodes)} of the {wanted} clients the job needs connected within "
                    f"client-wait ({self.fed.client_wait:g} s); start more clients or lower "
                    "min-available-clients / min-train-clients"
                )
            if now - announced >= 10:
                self.log(f"waiting for clients: {len(nodes)} connected, {wanted} needed")
                announced = now
            time.sleep(0.5)
        count = self.fed.clients_per_round or (
            len(self.candidates) if self.fed.mode == "hyperparameter" else len(nodes)
        )
        count = max(count, self.fed.min_train_clients)
        if count >= len(nodes):
            return nodes
        # Derived from the job's seed and the round: a resumed job draws the same clients.
        draw = torch.randperm(
            len(nodes), generator=torch.Generator().manual_seed(self.run.seed * 100_003 + server_round)
        )
        return [nodes[i] for i in sorted(draw[:count].tolist())]

    def _reader(self, phase: int, server_round: int) -> codec.UpdateReader:
        """The reply reader for this round: built once per mask (its metadata signature and
        the soup's scatter plan), then only re-stamped with the phase and round."""
        if (
            self._reader_cache is None
            or self._reader_cache.digest != self.digest
            or self._reader_cache.mask is not self.mask
        ):
            self._reader_cache = codec.UpdateReader(
                self.mask, self.soup, digest=self.digest, phase=phase, round=server_round
            )
        return self._reader_cache.at(phase=phase, round=server_round)

    def _decode_update(
        self, update: Update, reader: codec.UpdateReader
    ) -> tuple[dict[str, torch.Tensor] | codec.FlatReply, int]:
        """The update's values under the mask (and dense extras), or the reply read in place,
        and its example count."""
        if update.error is not None:
            raise codec.PayloadError(update.error)
        if update.arrays is not None:  # Flower's standard layout: the gate checked num-examples in the metrics
            values, examples = read_update(update.arrays, self.soup, self.mask), int(update.metrics["num-examples"])
        else:
            decoded = reader.read(update.payload)
            if isinstance(decoded, codec.FlatReply):
                values, examples = decoded, decoded.num_examples
            else:
                values, examples = {**decoded.values, **decoded.dense}, decoded.num_examples
        if not 0 < examples <= MAX_EXAMPLES:
            raise codec.PayloadError(f"the reply claims {examples} training examples")
        return values, examples
