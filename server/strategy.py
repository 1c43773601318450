"""``SparseSoupStrategy``: Sparse Model Soups as a Flower strategy.

The server owns the mask and the soup (``fedsms.engine.SoupEngine``); each server round
belongs to a phase of the schedule (phase 0: optional dense pretraining rounds). The hooks
keep Flower's contract, so the strategy runs under Flower's own ``Strategy.start`` loop as
under its own ``start``:

- ``configure_train`` prunes when the round opens a phase (or a GMP interval) and sends
  each client the soup and its candidate's hyperparameters;
- ``aggregate_train`` finds each reply's candidate from the reply itself, streams the
  valid ones into the masked merge and, after a phase's last round, ends the phase
  (greedy choice, recalibration, diagnostics: ``phase_end.PhaseEnd``);
- ``configure_evaluate`` / ``aggregate_evaluate`` evaluate the soup on clients and on the
  server's data; ``aggregate_evaluate`` closes the round: its JSON line and checkpoint
  (``recorder.JobRecorder``).

``start`` adds what Flower's loop has no place for: a round whose replies are too few is
sent again (from the same starting soup) before the job stops at its last completed round,
and the job's outputs are written at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from fedsms import FedSMSError, codec
from fedsms.checkpoint import Checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.data import DatasetSplits
from fedsms.engine import PhaseHooks, SoupEngine, SoupGuard, data_hooks
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.masks import Mask, dense_mask, prune_plan, prune_table, sparsity
from fedsms.merge import State, out_of_range
from fedsms.schedule import Round, federated_rounds
from fedsms.task import CLASSIFICATION, Task
from fedsms_flower.records import (
    NORM_STATS,
    NUM_EXAMPLES,
    origin_of,
)
from fedsms_server import gate
from fedsms_server.flower_layout import read_arrays
from fedsms_server.messages import Outbox
from fedsms_server.phase_end import PhaseEnd
from fedsms_server.privacy import BudgetSpent, Privacy, check_job
from fedsms_server.recorder import JobRecorder, RoundLog, model_metadata
from fedsms_server.sampling import ClientSampler, NotEnoughClients
from fedsms_server.updates import Update, UpdateDecoder, unpack_reply

# Importable from here as before.
__all__ = ["NORM_STATS", "JobStopped", "RoundFailed", "RoundLog", "SparseSoupStrategy", "Update", "unpack_reply"]

MAX_EXAMPLES = gate.MAX_EXAMPLES  # a reply claiming more is not believed


class JobStopped(FedSMSError):
    """The job stopped at its last completed round; its outputs and checkpoint are written."""


class RoundFailed(JobStopped):
    """Too few valid replies after every retry: the job stops at the last completed round."""


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
        the same architecture. ``start(initial_arrays=...)`` may replace the weights.
    server_data : DatasetSplits, optional
        Data held by the server: central evaluation, norm recalibration and the held-out
        split of the greedy soup. Without it, norm statistics are recalibrated by a
        federated round and greedy merges are refused.
    out_dir : str or Path, optional
        Where round lines, checkpoints, results and the final model go (default:
        ``run.out_dir``); a relative path is resolved against the current folder now.
    log : callable, optional
        Receives one line per event (default: Flower's logger, at INFO).
    evaluate_fn : callable, optional
        ``evaluate_fn(server_round, arrays) -> MetricRecord | None``: your own central
        evaluation, called at the end of every round and recorded beside the strategy's
        own (``start(evaluate_fn=...)`` sets it too, and also calls it at round 0).
    task : Task, default CLASSIFICATION
        What the model is scored by (``fedsms.task``): the metrics of the central
        evaluation and the score that the greedy soup, best-of-m and the diagnostics
        maximise on ``server_data`` (e.g. ``REGRESSION``: MSE, MAE, R²).
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
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        task: Task = CLASSIFICATION,
    ) -> None:
        if run.ood and not task.images:
            raise FedSMSError(
                f"ood applies image corruptions, but the {task.name} task's inputs are not images; turn ood off"
            )
        if run.merge == "greedy" and server_data is None:
            raise FedSMSError(
                "merge 'greedy' needs a held-out split on the server; give the strategy server_data "
                "or use merge 'uniform' or 'weighted'"
            )
        self.run, self.fed = run, federation
        self.model = model.cpu()
        self.server_data = server_data
        self.evaluate_fn, self.task = evaluate_fn, task
        self.log = log or (lambda line: flower_log(INFO, line))
        self._plan = prune_plan(model, **run.prune_options())
        names = [name for name, reason in self._plan if not reason]
        hooks = PhaseHooks()
        if server_data is not None:
            hooks = data_hooks(self.model, server_data, fraction=run.recalibration_fraction, seed=run.seed, task=task)
        self.engine = SoupEngine(
            model.state_dict(),
            dense_mask(model, names),
            pruning=run.pruning,
            seed=run.seed,
            hooks=hooks,
            log=self.log,
            guard=SoupGuard.of(run.soup_guard, run.soup_guard_tolerance),
        )
        self.schedule: list[Round] = federated_rounds(run, federation)
        gmp = "-gmp" if federation.pruning_schedule == "gmp" else ""
        self.recorder = JobRecorder(
            Path(out_dir if out_dir is not None else run.out_dir).resolve(),
            {**run.to_dict(), **federation.to_dict()},
            self.schedule,
            f"fed-{federation.mode}{gmp}",
            self.log,
        )
        self.sampler = ClientSampler(federation, run.candidates, run.seed, self.log)
        self.outbox = Outbox(run, federation, self.recorder.settings, self.schedule, str(self.recorder.out_dir))
        self.phase_end = PhaseEnd(
            self.engine,
            self.model,
            run,
            federation,
            server_data,
            lambda server_round: self.outbox.soup_content(self.engine.soup, self.mask, server_round),
            self.log,
            task,
        )
        check_job(
            run,
            federation,
            federated_recalibration=self.phase_end.federated,
            diagnostics=self.phase_end.keeps_candidates(1),
        )
        self.privacy = Privacy(federation, self.log)
        self._decoder = UpdateDecoder()
        self._open: dict[int, RoundLog] = {}  # rounds configured but not yet closed
        self._opened = 0  # the last round whose prune was applied
        self._returned: ArrayRecord | None = None  # what aggregate_train last returned: the soup as Flower holds it
        self._central: tuple[State | None, dict] = (None, {})  # the central evaluation of a checked soup
        self._started = time.perf_counter()
        self._clients_cannot_evaluate = False  # set once every evaluation of a round failed alike

    # ---- the job's shape ---------------------------------------------------------------

    @property
    def soup(self) -> State:
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
    def out_dir(self) -> Path:
        """Where the job's files go."""
        return self.recorder.out_dir

    @property
    def rounds(self) -> list[RoundLog]:
        """The completed rounds."""
        return self.recorder.rounds

    @property
    def num_rounds(self) -> int:
        """Server rounds of the whole job."""
        return len(self.schedule)

    @property
    def rounds_left(self) -> int:
        """Server rounds still to run."""
        return self.num_rounds - self.recorder.done

    def summary(self) -> None:
        """Log the job's shape and what it prunes, tensor by tensor (Flower calls this at the start)."""
        self.log("tensors pruned and why others are not:\n" + prune_table(self.model, self.mask, self._plan))
        self.log(
            f"SparseSoupStrategy: {self.fed.mode} soup, {self.run.phases} phases to "
            f"{self.run.target_sparsity:.0%} sparsity ({self.run.pruning} magnitude), "
            f"{self.fed.pretrain_rounds} dense + {self.fed.rounds_per_phase}/phase rounds = {self.num_rounds}, "
            f"merge {self.run.merge}, values as {self.fed.value_dtype}; results in {self.out_dir}"
        )

    # ---- one job --------------------------------------------------------------------------

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
        """Run the job's remaining rounds, as Flower's ``Strategy.start`` runs rounds, then
        write its outputs.

        Parameters
        ----------
        grid : Grid
            Flower's grid to the clients.
        initial_arrays : ArrayRecord, optional
            The dense starting model (default: the ``model`` given to the constructor). It
            must have the model's tensor names, shapes and dtypes. Ignored, with a line,
            when the job resumes from a checkpoint.
        num_rounds : int, optional
            Rounds to run, at most the rounds left in the phase schedule (default: all of
            them); the job can resume after a shorter run.
        timeout : float, optional
            Seconds to wait for a round's replies (default: ``round-timeout``).
        train_config, evaluate_config : ConfigRecord, optional
            Extra entries added to every train / evaluate message's config.
        evaluate_fn : callable, optional
            ``evaluate_fn(server_round, arrays) -> MetricRecord | None``, called at round 0
            on the starting model and after every round on the soup, as in Flower's loop.
            Its metrics go to ``rounds.jsonl``, ``results.jsonl``, ``summary.json`` and the
            ``Result``, beside the strategy's own central evaluation.

        Returns
        -------
        Result
            The final soup and, per round, the training, federated and central metrics.

        Raises
        ------
        FedSMSError
            ``initial_arrays`` does not fit the model, or ``num_rounds`` exceeds the rounds left.
        RoundFailed
            After every retry a round had fewer than ``min-train-clients`` valid replies.
            The outputs of the completed rounds are written first.
        JobStopped
            Anything else failed during a round; the outputs are written first.
        """
        if num_rounds is not None and not 1 <= num_rounds <= self.rounds_left:
            raise FedSMSError(
                f"num_rounds={num_rounds}, but the phase schedule has {self.rounds_left} rounds left "
                f"({self.fed.pretrain_rounds} dense + {self.run.phases} phases x {self.fed.rounds_per_phase}); "
                "pass num_rounds=None to run them all"
            )
        self.summary()
        self.recorder.clean()
        if evaluate_fn is not None:
            self.evaluate_fn = evaluate_fn
        if initial_arrays is not None and len(initial_arrays):
            if self.recorder.done:
                self.log(f"initial_arrays ignored: the job resumes after round {self.recorder.done}")
            else:
                self._adopt(initial_arrays)
        if self.evaluate_fn is not None and not self.recorder.done:
            self.recorder.initial_eval = self._evaluate_fn(0)
        timeout = self.fed.round_timeout if timeout is None else timeout
        first = self.recorder.done + 1
        for server_round in range(first, first + (num_rounds or self.rounds_left)):
            good = (self.engine.soup, self.engine.mask, self.engine.digest)  # replaced, never mutated
            try:
                self._run_round(grid, server_round, timeout, train_config or ConfigRecord(), evaluate_config)
            except BudgetSpent as spent:  # a clean stop: the last round's checkpoint stands
                self._stop(str(spent), good)
                return self._result()
            except RoundFailed as error:
                self._stop(str(error), good)
                raise
            except Exception as error:  # any other failure ends the job as a failed round does
                reason = gate.short(f"{type(error).__name__}: {error}", 400)
                done = self.recorder.done
                stopped = (
                    f"unexpected error during round {done + 1} ({reason}); the job stopped at the last "
                    f"completed round ({done}); fix the cause, then rerun with --resume"
                )
                self._stop(stopped, good)
                raise JobStopped(stopped) from error
        self.write_outputs()
        return self._result()

    def _run_round(
        self, grid: Grid, server_round: int, timeout: float, train_config: ConfigRecord, evaluate_config
    ) -> None:
        """One round through the hooks; a round with too few valid replies is sent again,
        ``round-retries`` times, from the same starting soup."""
        for attempt in range(self.fed.round_retries + 1):
            if attempt:
                self.log(f"round {server_round}: retrying ({attempt} of {self.fed.round_retries})")
            try:
                messages = list(self.configure_train(server_round, ArrayRecord(), train_config, grid))
            except NotEnoughClients as error:
                raise RoundFailed(str(error)) from None
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            self._record_missing(server_round, messages, replies)
            if self.merge_replies(server_round, replies) is not None:
                break
            errors = {gate.client_error(reply) for reply in replies}
            if len(replies) == len(messages) and len(errors) == 1 and None not in errors:
                self.log(f"round {server_round}: every client failed with the same error; a retry would too")
                raise RoundFailed(self._failure(server_round, retried=attempt))
        else:
            raise RoundFailed(self._failure(server_round, retried=self.fed.round_retries))
        messages = self.configure_evaluate(server_round, ArrayRecord(), evaluate_config or ConfigRecord(), grid)
        self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout) if messages else [])

    def _result(self) -> Result:
        """Flower's ``Result`` of the job: every round's metrics and the final soup."""
        result = Result(arrays=ArrayRecord(self.soup))
        if self.recorder.initial_eval:
            result.evaluate_metrics_serverapp[0] = MetricRecord(self.recorder.initial_eval)
        for log in self.rounds:
            if log.train:
                result.train_metrics_clientapp[log.server_round] = MetricRecord(log.train)
            if log.federated_eval:
                result.evaluate_metrics_clientapp[log.server_round] = MetricRecord(log.federated_eval)
            if log.central_eval or log.evaluate_fn:  # evaluate_fn's value wins a shared key; both are in rounds.jsonl
                result.evaluate_metrics_serverapp[log.server_round] = MetricRecord(
                    {**log.central_eval, **log.evaluate_fn}
                )
        return result

    def _stop(self, reason: str, good: tuple) -> None:
        """Back to the soup, mask and digest of the last completed round (``good``), then the
        outputs with ``reason``."""
        self.engine.state, self.engine.mask, self.engine.digest = good
        self._open.clear()
        try:
            self.write_outputs(stopped=reason)
        except Exception as error:  # the summary must not hide the first failure
            self.log(f"job stopped ({reason}); writing its outputs failed too: {gate.short(error)}")

    # ---- training ----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client: the soup, the client's candidate hyperparameters and the
        job's settings (a client needs no run config of its own).

        When ``server_round`` opens a phase (or a GMP interval) the soup is pruned first,
        once per round (a retry of the round sends the same soup). The clients are drawn
        from the connected nodes (``clients-per-round``, seeded by the job's seed and the
        round), waiting at most ``client-wait`` seconds for enough of them. With
        ``client-protocol = flower`` the soup goes as a dense ``ArrayRecord``.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        arrays : ArrayRecord
            The current global model. Empty, or what ``aggregate_train`` returned: the
            strategy's own soup. Anything else replaces the soup (the dense start in round
            1 under Flower's loop); it must fit the model and be zero where the mask prunes.
        config : ConfigRecord
            Extra entries added to every message's config.
        grid : Grid
            Flower's grid to the clients.

        Returns
        -------
        list of Message
            One train message per sampled client, in candidate order; each message's group
            id names the round, the candidate and the node.

        Raises
        ------
        FedSMSError
            ``server_round`` is outside the schedule, or ``arrays`` does not fit.
        NotEnoughClients
            Fewer than the needed clients connected within ``client-wait``.
        """
        step = self._step(server_round)
        self._complete_phase(grid)
        self._adopt(arrays)
        retry = server_round == self._opened
        if not retry:
            if step.prune is not None:
                self.engine.prune(step.prune)
            self._opened = server_round
            self._open[server_round] = RoundLog(server_round, step.phase, step.round_in_phase, sparsity(self.mask))
            self.log(
                f"round {server_round}: phase {step.phase} round {step.round_in_phase}, sparsity {sparsity(self.mask):.2%}"
            )
        log = self._log(server_round)
        nodes = self.sampler.train_nodes(grid, server_round, exclude=log.rejected if retry else ())
        self.privacy.open_round(server_round, len(grid.get_node_ids()), len(nodes))
        soup, nbytes = self.outbox.soup_entry(self.engine.soup, self.mask, server_round)
        log.clients = len(nodes)
        log.partitions = [self.sampler.partitions.get(node) for node in nodes]
        log.bytes_down += nbytes * len(nodes)
        return self.outbox.train(soup, nodes, server_round, self.privacy.train_config(config))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the valid replies under the mask into the new soup (``merge_replies``) and
        return it as Flower's loop carries it.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The replies to the round's train messages.

        Returns
        -------
        tuple of (ArrayRecord or None, MetricRecord or None)
            The new soup (dense, zero outside the mask) and each training metric's mean
            over the valid replies that report it; ``(None, None)`` when fewer than
            ``min-train-clients`` were valid (the soup is then the one the round started from).
        """
        metrics = self.merge_replies(server_round, replies)
        if metrics is None:
            return None, None
        self._returned = ArrayRecord(self.soup)
        return self._returned, MetricRecord(metrics)

    def merge_replies(self, server_round: int, replies: Iterable[Message]) -> dict[str, float] | None:
        """``aggregate_train`` without the dense ``ArrayRecord`` copy of the soup that
        Flower's loop carries between hooks (``start`` needs none: 40 ms a round for a
        ResNet-18): merge the valid replies under the mask, in candidate order.

        Each reply's candidate and client come from the reply itself (its group id); the
        float sum, hence the soup, is the same whatever order the replies arrived in. An
        invalid reply is logged with its reason and never touches the soup. The merge rule
        is the job's ``merge`` (``uniform`` in phase 0 when it is ``greedy``); updates the
        norm bound drops are rejected. After a phase's last round the phase ends: greedy
        choice, recalibration, diagnostics.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The replies to the round's train messages.

        Returns
        -------
        dict of str to float or None
            Each training metric's mean over the valid replies that report it (at most
            ``gate.MAX_METRICS`` names); None when fewer than ``min-train-clients`` were
            valid, or when the merged soup is unusable (a value beyond the numeric contract,
            or a central evaluation that is not finite; the client that sent the largest
            values is named among the rejected): the soup is then the one the round started
            from, and the round is sent again.
        """
        step = self._step(server_round)
        log = self._log(server_round)
        rule = "uniform" if step.phase == 0 and self.run.merge == "greedy" else self.run.merge
        merge = self.engine.merge(
            rule,
            ends_phase=step.ends_phase,
            keep=step.ends_phase and self.phase_end.keeps_candidates(step.phase),
            **self.run.merge_options(),
        )
        merge = self.privacy.wrap(merge, self.engine.soup, self.mask)  # dp: clipped updates, noise under the mask
        totals: dict[str, list] = {}  # metric -> [sum, count] over the replies that report it
        added: list[int] = []  # the nodes of the merged candidates, in order
        peaks: list[tuple[float, int]] = []  # each merged reply's largest magnitude, and its node
        for update in self._updates(server_round, replies):
            node, nbytes, metrics = update.node, update.nbytes, update.metrics
            try:
                decoded = self._decoder.decode(
                    update, self.engine.soup, self.mask, self.digest, step.phase, server_round
                )
            except codec.PayloadError as error:
                decoded, reason = None, gate.short(error)
            update = None  # the payload may go before the next reply is unpacked (one reply held, not two)
            if decoded is None:
                log.rejected[node] = reason
                self.log(f"round {server_round}: rejected reply from node {node}: {reason}")
                continue
            log.bytes_up += nbytes
            merge.add_reply(*decoded)  # either layout, read into the compact reader's blocks
            peaks.append((decoded[0].largest, node))
            decoded = None  # the payload's memory may go once it is summed
            added.append(node)
            for key, value in metrics.items():
                if gate.room_for(totals, key):
                    total = totals.setdefault(key, [0.0, 0])
                    total[0] += float(value)
                    total[1] += 1
        start = self.engine.soup  # what the candidates retrained from (replaced, never mutated)
        if merge.count >= self.fed.min_train_clients:
            self.engine.end_round(merge)
            for i in merge.dropped:
                log.rejected[added[i]] = "its update is far larger than the round's median (update-norm-bound)"
        log.accepted = merge.count
        if merge.count < self.fed.min_train_clients:
            self.engine.state = start
            self.log(
                f"round {server_round}: only {merge.count} valid replies (min-train-clients is "
                f"{self.fed.min_train_clients}); the soup stays as it was"
            )
            return None
        if step.ends_phase:
            self.phase_end.begin(server_round, step.phase, merge, start)
            log.guard = self.engine.fallback or {}
        problem = self._unusable_soup()
        if problem is not None:  # dropped and sent again, never checkpointed
            value, node = max(peaks)
            reason = f"{problem}; node {node} sent the largest values (|value| up to {value:.3g})"
            self.engine.state = start
            self.phase_end.cancel()
            log.rejected[node], log.accepted = reason, merge.count - 1
            self.log(f"round {server_round}: dropped: {reason}; the soup stays as it was")
            return None
        log.train = {key: total / count for key, (total, count) in totals.items()}
        log.privacy = self.privacy.release(server_round, merge, log.train)  # a kept round only
        if step.ends_phase:
            self._complete_phase(None)
        return log.train

    def _unusable_soup(self) -> str | None:
        """Why the round's soup cannot be kept (a value beyond the numeric contract, or a
        central evaluation that is not finite), or None. The central evaluation made here is
        the round's when nothing changes the soup before the round closes."""
        name = out_of_range(self.engine.soup)
        if name is not None:
            return f"the soup's tensor {name!r} has NaN or Inf values or values beyond ±{codec.MAX_MAGNITUDE:g}"
        if self.server_data is None:
            return None
        metrics = self.central_evaluation()
        self._central = (self.soup, metrics)
        bad = sorted(key for key, value in metrics.items() if not math.isfinite(value))
        return f"the soup's central evaluation is not finite ({', '.join(bad)})" if bad else None

    def _updates(self, server_round: int, replies: Iterable[Message]) -> Iterable[Update]:
        """The replies' updates in candidate order, unpacked one at a time (each payload
        copy lives only while it is averaged)."""
        replies = list(replies)
        origins = [origin_of(reply, server_round) for reply in replies]
        nodes = [o[1] if o else reply.metadata.src_node_id for o, reply in zip(origins, replies)]
        order = sorted(range(len(replies)), key=lambda i: (origins[i] is None, origins[i] or (0, nodes[i])))
        for i in order:
            yield unpack_reply(replies[i], nodes[i], origins[i][0] if origins[i] else None)
            replies[i] = None  # one reply held at a time

    # ---- evaluation ------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The soup to a ``fraction-evaluate`` share of the clients, for federated evaluation.

        A phase that ended in this round and whose norm statistics the clients recalibrate
        is finished first (the norm-statistics round needs the grid). The clients are the
        first of the connected nodes in id order (at least one).

        Parameters
        ----------
        server_round : int
            The round, from 1.
        arrays : ArrayRecord
            Not read: clients evaluate the strategy's soup (what ``aggregate_train`` returned,
            its norm statistics recalibrated).
        config : ConfigRecord
            Extra entries added to every message's config.
        grid : Grid
            Flower's grid to the clients.

        Returns
        -------
        list of Message
            One evaluate message per chosen client; empty when ``fraction-evaluate`` is 0,
            or once a round's evaluations all failed alike (the clients' app cannot
            evaluate: a quickstart ClientApp without an evaluate handler, say).
        """
        self._step(server_round)
        self._complete_phase(grid)
        nodes = [] if self._clients_cannot_evaluate else self.sampler.evaluate_nodes(grid)
        if not nodes:
            return []
        soup, nbytes = self.outbox.soup_entry(self.engine.soup, self.mask, server_round)
        self._log(server_round).bytes_down += nbytes * len(nodes)
        return self.outbox.evaluate(soup, nodes, server_round, config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics; then the round closes:
        central evaluation on the server's data, ``evaluate_fn``, the round's JSON line and
        its checkpoint.

        Replies the gate rejects are logged and left out.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        replies : iterable of Message
            The replies to the round's evaluate messages (none when nothing was sent).

        Returns
        -------
        MetricRecord or None
            The weighted means (``num-examples`` left out); None when no reply was valid.
        """
        self._step(server_round)
        self._complete_phase(None)
        log = self._log(server_round)
        totals, examples, failures = {}, 0, []
        for reply in replies:
            try:
                metrics, n = gate.evaluate_reply(reply)
            except gate.Rejected as error:
                self.log(f"round {server_round}: evaluation rejected from node {reply.metadata.src_node_id}: {error}")
                failures.append(gate.client_error(reply))
                continue
            examples += n
            for key, value in metrics.items():
                if key != NUM_EXAMPLES and gate.room_for(totals, key):
                    totals[key] = totals.get(key, 0.0) + float(value) * n
        if examples:
            log.federated_eval = {k: v / examples for k, v in totals.items()}
        elif failures and len(set(failures)) == 1 and failures[0] is not None:
            self._clients_cannot_evaluate = True
            self.log(f"every client's evaluation failed alike ({failures[0]}); federated evaluation is off from now on")
        self._close_round(log)
        return MetricRecord(log.federated_eval) if log.federated_eval else None

    def central_evaluation(self) -> dict[str, float]:
        """The soup on the server's test data (empty without server data).

        Returns
        -------
        dict of str to float
            The task's metrics (classification: accuracy, loss, ECE) and, with ``ood``,
            accuracy and ECE under corruptions.
        """
        if self.server_data is None:
            return {}
        self.model.load_state_dict(self.soup)
        metrics = evaluate(self.model, self.server_data.test, task=self.task)
        if self.run.ood:
            ood = evaluate_ood(self.model, self.server_data.test.head(self.run.ood_examples), seed=self.run.seed)
            metrics.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return {k: float(v) for k, v in metrics.items()}

    # ---- records -----------------------------------------------------------------------

    def write_outputs(self, stopped: str = "") -> Path:
        """``final_model``, ``results.jsonl``, plots and ``summary.json`` in ``out_dir``
        (``recorder.JobRecorder.write_outputs`` with the current soup).

        Parameters
        ----------
        stopped : str, optional
            Why the job ended early, recorded in ``summary.json`` (default: empty).

        Returns
        -------
        Path
            ``out_dir``.
        """
        self.model.load_state_dict(self.soup)
        return self.recorder.write_outputs(self.model, self._model_metadata(), stopped, self.privacy.summary())

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a round checkpoint of this job, written under the same settings
        (those that do not shape the soup may differ).

        Parameters
        ----------
        checkpoint : Checkpoint
            A checkpoint loaded from ``out_dir/checkpoints/soup``.

        Raises
        ------
        FedSMSError
            The checkpoint does not fit the settings, the model or the schedule (see
            ``recorder.JobRecorder.restore``).
        """
        done = self.recorder.restore(checkpoint, self.model)
        self.engine.restore(checkpoint.state, checkpoint.mask)
        self.privacy.restore([log.privacy for log in self.rounds])
        self._opened = done
        self.log(
            f"resumed after round {done} (phase {self.schedule[done - 1].phase}, sparsity {sparsity(self.mask):.2%}); "
            f"{self.rounds_left} rounds left"
        )

    def evaluate_round(self, *args, **kwargs) -> None:
        """Removed: see ``aggregate_evaluate`` (raises ``FedSMSError`` naming the replacement)."""
        raise FedSMSError(
            "SparseSoupStrategy.evaluate_round was removed: the round's evaluation is aggregate_evaluate "
            "(federated and central), and start(..., evaluate_fn=...) adds your own"
        )

    # ---- helpers -----------------------------------------------------------------------

    def _step(self, server_round: int) -> Round:
        if not 1 <= server_round <= self.num_rounds:
            raise FedSMSError(
                f"round {server_round} is outside this job's {self.num_rounds} rounds "
                f"({self.fed.pretrain_rounds} dense + {self.run.phases} phases x {self.fed.rounds_per_phase})"
            )
        return self.schedule[server_round - 1]

    def _log(self, server_round: int) -> RoundLog:
        """The record of an open round (opened here if a hook is called out of order)."""
        if server_round not in self._open:
            step = self._step(server_round)
            self._open[server_round] = RoundLog(server_round, step.phase, step.round_in_phase, sparsity(self.mask))
        return self._open[server_round]

    def _close_round(self, log: RoundLog) -> None:
        soup, central = self._central
        log.central_eval = central if soup is self.soup else self.central_evaluation()
        self._central = (None, {})
        bad = sorted(key for key, value in log.central_eval.items() if not math.isfinite(value))
        if bad:  # the soup changed after its merge was checked (a federated recalibration)
            raise RoundFailed(
                f"round {log.server_round}: the soup's central evaluation ({', '.join(bad)}) is not finite after the phase's "
                "norm statistics were recalibrated; the round is not checkpointed and the job stops at the last "
                "completed round: rerun with --resume"
            )
        if self.evaluate_fn is not None:
            log.evaluate_fn = self._evaluate_fn(log.server_round)
        log.seconds = round(time.perf_counter() - self._started, 3)
        self._started = time.perf_counter()
        self._open.pop(log.server_round, None)
        self.recorder.end_round(log, self.soup, self.mask, self._model_metadata())

    def _evaluate_fn(self, server_round: int) -> dict:
        metrics = self.evaluate_fn(server_round, ArrayRecord(self.soup))
        return {k: v for k, v in dict(metrics).items()} if metrics is not None else {}

    def _complete_phase(self, grid: Grid | None) -> None:
        """Finish a phase whose end waits for the grid; its diagnostics join its round's record."""
        server_round = self.phase_end.pending
        if server_round is None:
            return
        diagnostics = self.phase_end.complete(grid)
        if diagnostics and server_round in self._open:
            self._open[server_round].diagnostics = diagnostics

    def _adopt(self, arrays: ArrayRecord | None) -> None:
        """Take ``arrays`` as the soup unless it is empty or the soup this strategy returned."""
        if arrays is None or not len(arrays) or arrays is self._returned:
            return
        self.engine.state = read_arrays(arrays, self.engine.state, self.mask, type(self.model).__name__)
        self._returned = arrays

    def _record_missing(self, server_round: int, messages: list[Message], replies: list[Message]) -> None:
        """Clients sent the round that did not answer in time (dead or straggling)."""
        answered = {r.metadata.reply_to_message_id for r in replies}
        log = self._log(server_round)
        for message in messages:
            if message.metadata.message_id not in answered:
                reason = f"no reply within round-timeout ({self.fed.round_timeout:g} s)"
                log.rejected[message.metadata.dst_node_id] = reason
                self.log(f"round {server_round}: node {message.metadata.dst_node_id}: {reason}")

    def _model_metadata(self) -> dict:
        dataset = self.server_data.name if self.server_data is not None else self.run.dataset
        return {**model_metadata(self.run.model, self.model, self.mask), "task": self.task.name, "dataset": dataset}

    def _failure(self, server_round: int, retried: int) -> str:
        """Why a round failed after ``retried`` retries, in one sentence: what the clients
        reported, or that none answered."""
        log = self._log(server_round)
        reasons = sorted(set(log.rejected.values()))
        said = f"; clients reported: {' | '.join(reasons[:3])}" if reasons else ""
        advice = (
            "fix what the clients reported"
            if any("timeout" not in r for r in reasons)
            else "start more clients or lower min-train-clients"
        )
        return (
            f"round {server_round} got {log.accepted} valid replies after {retried} "
            f"retries, fewer than min-train-clients={self.fed.min_train_clients}{said}; {advice}, then rerun with "
            "--resume to continue from the last completed round"
        )
