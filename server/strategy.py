"""``SparseSoupStrategy``: Sparse Model Soups as a Flower strategy.

The strategy owns the phase, the global mask and the soup. Each server round belongs to a
phase (phase 0: optional dense pretraining rounds). The first round of phase p prunes
the soup to that phase's sparsity; every client then retrains the same sparse model with
its own candidate hyperparameters (hyperparameter soup) or on its own shard (data soup),
and its reply (values under the mask, no indices) streams into one running average.
After the last round of a phase the norm statistics are recalibrated (on server-held data,
or by a federated round), and the soup is checkpointed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsms import FedSMSError, codec
from fedsms.checkpoint import Checkpoint, check_compatible, save_checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.data import DatasetSplits
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.gmp import federated_prune_step, federated_update_rounds
from fedsms.masks import Mask, dense_mask, mask_digest, prunable_names, prune_state, sparsity
from fedsms.norms import NormStatsAverage, norm_layers, recalibrate_norms
from fedsms.recipe import CandidateConfig, for_phase
from fedsms.soup import RunningAverage, greedy_soup

from fedsms_flower.records import payload_of, record_of


logger = logging.getLogger("fedsms.server")

NORM_STATS = "query.norm_stats"  # message type of the federated recalibration round


MAX_EXAMPLES = 10**9  # a reply claiming more is not believed

# Config keys a resumed job may change: where things live and how patient the server is.
# Every other key shapes the soup, so a checkpoint written under another value is refused.
RESUMABLE_CHANGES = frozenset({
    "out_dir", "data_dir", "device", "workers", "round_timeout", "round_retries", "resume",
    "min_available_clients", "min_train_clients", "fraction_evaluate",
})


class RoundFailed(FedSMSError):
    """Too few valid replies after every retry: the job stops at the last completed round."""


@dataclass
class Update:
    """One client's training reply, unpacked from its Message."""

    node: int
    payload: bytes = b""
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the reply is unusable, before decoding


def unpack_reply(reply: Message, node: int) -> Update:
    """``node`` is the client the reply answers for (the SuperLink itself answers, under its
    own node id, for a client that stopped sending heartbeats)."""
    if reply.has_error():
        return Update(node, error=f"the client failed: {reply.error.reason}")
    try:
        return Update(node, payload_of(reply.content["update"]), dict(reply.content["metrics"]))
    except (KeyError, TypeError, ValueError, codec.PayloadError) as error:
        return Update(node, error=f"the reply has no readable update ({error})")


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
    seconds: float = 0.0


class SparseSoupStrategy(Strategy):
    def __init__(
        self,
        run: RunConfig,
        federation: FederationConfig,
        model: nn.Module,
        *,
        server_data: DatasetSplits | None = None,
        out_dir: str | Path = "runs/federated",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.run, self.fed = run, federation
        self.model = model.cpu()
        self.server_data = server_data
        self.out_dir = Path(out_dir)
        self.log = log or logger.info
        self.names = prunable_names(model, keep_first_dense=run.keep_first_dense, keep_last_dense=run.keep_last_dense)
        self.mask: Mask = dense_mask(model, self.names)
        self.digest = mask_digest(self.mask)
        self.soup: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.candidates = run.candidate_configs()
        self.phase_of_round = self._schedule()
        if federation.pruning_schedule == "gmp":
            federated_update_rounds(run, federation)  # too many mask updates for the rounds fail now, not mid-run
        self.rounds: list[RoundLog] = []
        self._current: RoundLog | None = None
        self._kept_candidates: list[dict[str, torch.Tensor]] = []
        self._sent: list[Message] = []  # this round's train messages, in candidate order
        self._grid: Grid | None = None
        self._started = time.perf_counter()
        # Flower numbers the rounds of each start() from 1; a resumed job continues after
        # the checkpoint's round, so every Flower round is shifted by the rounds already done.
        self.round_offset = 0

    # ---- schedule --------------------------------------------------------------------

    def _schedule(self) -> list[tuple[int, int]]:
        """(phase, round within phase) of every server round, index 0 = round 1."""
        rounds = [(0, r) for r in range(1, self.fed.pretrain_rounds + 1)]
        for phase in range(1, self.run.phases + 1):
            rounds += [(phase, r) for r in range(1, self.fed.rounds_per_phase + 1)]
        return rounds

    @property
    def num_rounds(self) -> int:
        return len(self.phase_of_round)

    def phase_at(self, server_round: int) -> tuple[int, int]:
        return self.phase_of_round[server_round - 1]

    def ends_phase(self, server_round: int) -> bool:
        phase, r = self.phase_at(server_round)
        return r == (self.fed.rounds_per_phase if phase else self.fed.pretrain_rounds)

    @property
    def rounds_left(self) -> int:
        return self.num_rounds - self.round_offset

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a round checkpoint written by ``save_checkpoint`` under the same config."""
        meta = checkpoint.metadata
        saved = meta.get("config", {})
        mine = {**self.run.to_dict(), **self.fed.__dict__}
        changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and saved.get(k) != mine[k])
        if changed:
            shown = ", ".join(f"{k.replace('_', '-')}={saved.get(k)!r} (now {mine[k]!r})" for k in changed[:4])
            raise FedSMSError(f"the checkpoint was written by a job with other settings: {shown}; "
                              "resume with the same settings or start a new job in another --out-dir")
        check_compatible(checkpoint, self.model)
        done, history = meta.get("server_round"), meta.get("rounds")
        if not isinstance(done, int) or not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise FedSMSError("the checkpoint lacks 'server_round' (int) or 'rounds' (list of round records); "
                              "it is not a fedsms server checkpoint, start a new job in another --out-dir")
        if not 1 <= done <= self.num_rounds:
            raise FedSMSError(f"the checkpoint is of round {done}, outside this job's {self.num_rounds} rounds; start a new job")
        self.soup = {k: v.clone() for k, v in checkpoint.state.items()}
        self.mask = {k: v.clone() for k, v in checkpoint.mask.items()}
        self.digest = mask_digest(self.mask)
        try:
            self.rounds = [RoundLog(**log) for log in history]
        except TypeError as error:
            raise FedSMSError(f"the checkpoint's round history does not fit this fedsms ({error}); start a new job") from None
        self.round_offset = done
        # rounds.jsonl may hold a line for a round whose checkpoint never landed: that round reruns.
        self._write_round_lines()
        self.log(f"resumed after round {done} (phase {self.phase_at(done)[0]}, sparsity {sparsity(self.mask):.2%}); "
                 f"{self.rounds_left} rounds left")

    # ---- Strategy (Flower's round numbers are shifted by ``round_offset``) ---------------

    def summary(self) -> None:
        self.log(
            f"SparseSoupStrategy: {self.fed.mode} soup, {self.run.phases} phases to "
            f"{self.run.target_sparsity:.0%} sparsity ({self.run.pruning} magnitude), "
            f"{self.fed.pretrain_rounds} dense + {self.fed.rounds_per_phase}/phase rounds, "
            f"merge {self.run.merge}, values as {self.fed.value_dtype}"
        )

    def begin_round(self, server_round: int) -> bytes:
        """Start ``server_round`` (pruning first if it opens a phase, or a GMP interval); returns the soup payload."""
        phase, r = self.phase_at(server_round)
        step = federated_prune_step(self.run, self.fed, phase, r)
        if step is not None:
            self._prune_for(*step)
        self._current = RoundLog(server_round, phase, r, sparsity(self.mask))
        return self.soup_payload(server_round)

    def soup_payload(self, server_round: int) -> bytes:
        return codec.encode(self.soup, self.mask, phase=self.phase_at(server_round)[0], round=server_round,
                            kind="soup", value_dtype=self.fed.value_dtype)

    def configure_train(self, flower_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = flower_round + self.round_offset
        self._grid = grid
        payload = self.begin_round(server_round)
        messages = self._train_messages(server_round, payload)
        phase, r = self.phase_at(server_round)
        self.log(f"round {server_round}: phase {phase} round {r}, sparsity {sparsity(self.mask):.2%}, "
                 f"{len(messages)} clients, {len(payload)} bytes each")
        return messages

    def _train_messages(self, server_round: int, payload: bytes) -> list[Message]:
        """One message per client, each with its own candidate's hyperparameters."""
        phase, _ = self.phase_at(server_round)
        nodes = self._sample(self._grid, self.fed.min_train_clients)
        self._current.clients = len(nodes)
        self._current.bytes_down += len(payload) * len(nodes)
        messages = []
        for i, node in enumerate(nodes):
            candidate = self._candidate_for(i, phase, server_round)
            content = RecordDict({
                "soup": record_of(payload),
                "config": ConfigRecord({
                    **candidate.to_dict(), "phase": phase, "server-round": server_round,
                    "candidate": i, "num-candidates": len(nodes), **self._job_flags(server_round),
                }),
            })
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._sent = messages
        return messages

    def aggregate_train(self, flower_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies; with fewer than ``min-train-clients`` of them, send the
        round again (``round-retries`` times), then stop the job at the last completed round."""
        server_round = flower_round + self.round_offset
        replies = list(replies)
        for retry in range(self.fed.round_retries + 1):
            metrics = self.aggregate_updates(server_round, self._updates_in_candidate_order(server_round, replies))
            if self._current.accepted >= self.fed.min_train_clients:
                return ArrayRecord(self.soup), MetricRecord(metrics)
            if retry == self.fed.round_retries:
                break
            self.log(f"round {server_round}: retrying ({retry + 1} of {self.fed.round_retries})")
            messages = self._train_messages(server_round, self.soup_payload(server_round))
            replies = list(self._grid.send_and_receive(messages, timeout=self.fed.round_timeout))
        raise RoundFailed(
            f"round {server_round} got {self._current.accepted} valid replies after {self.fed.round_retries} "
            f"retries, fewer than min-train-clients={self.fed.min_train_clients}; start more clients or lower "
            "min-train-clients, then rerun with --resume to continue from the last completed round"
        )

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
            self._current.rejected[node] = reason
            self.log(f"round {server_round}: node {node}: {reason}")
        order = sorted(range(len(replies)), key=lambda i: candidate_of_node.get(nodes[i], len(candidate_of_node)))
        for i in order:
            yield unpack_reply(replies[i], nodes[i])

    def aggregate_updates(self, server_round: int, updates: Iterable[Update]) -> dict[str, float]:
        """Stream every valid update into the masked average; the soup becomes that average.
        Invalid updates are logged with their reason and never touch the soup."""
        phase, _ = self.phase_at(server_round)
        average, metrics = RunningAverage(), RunningAverage()
        keep = self.run.merge == "greedy" and phase >= 1 and self.ends_phase(server_round) and self.server_data
        self._kept_candidates = []
        log = self._current
        for update in updates:
            try:
                decoded = self._decode_update(update, phase, server_round)
            except codec.PayloadError as error:
                log.rejected[update.node] = str(error)
                self.log(f"round {server_round}: rejected reply from node {update.node}: {error}")
                continue
            log.bytes_up += len(update.payload)
            weight = float(decoded.num_examples) if self.run.merge == "weighted" else 1.0
            average.add({**decoded.values, **decoded.dense}, weight)
            metrics.add({k: torch.tensor(float(v)) for k, v in update.metrics.items()})
            if keep:
                self._kept_candidates.append(decoded.to_state_dict(self.soup))
        log.accepted = average.count
        if average.count < self.fed.min_train_clients:
            self.log(
                f"round {server_round}: only {average.count} valid replies (min-train-clients is "
                f"{self.fed.min_train_clients}); the soup stays as it was"
            )
            return {}
        self.soup = codec.state_from_values(average.mean(), self.mask, self.soup)
        log.train = {k: float(v) for k, v in metrics.mean().items()}
        return log.train

    def configure_evaluate(self, flower_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = flower_round + self.round_offset
        if self.ends_phase(server_round):
            self._finish_phase(server_round, grid)
        if self.fed.fraction_evaluate == 0:
            return []
        available = list(grid.get_node_ids())
        count = max(1, int(round(self.fed.fraction_evaluate * len(available))))
        phase, _ = self.phase_at(server_round)
        payload = self.soup_payload(server_round)
        self._current.bytes_down += len(payload) * count
        evaluate_config = ConfigRecord({"phase": phase, "server-round": server_round, "ood": self.run.ood,
                                        "ood-examples": self.run.ood_examples, **self._job_flags(server_round)})
        return [
            Message(content=RecordDict({"soup": record_of(payload), "config": evaluate_config}),
                    dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in sorted(available)[:count]
        ]

    def aggregate_evaluate(self, flower_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round = flower_round + self.round_offset
        totals, examples = {}, 0
        for reply in replies:
            if reply.has_error():
                self.log(f"round {server_round}: evaluation failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            metrics = reply.content["metrics"]
            n = int(metrics["num-examples"])
            examples += n
            for key, value in metrics.items():
                if key != "num-examples":
                    totals[key] = totals.get(key, 0.0) + float(value) * n
        if not examples:
            return None
        self._current.federated_eval = {k: v / examples for k, v in totals.items()}
        return MetricRecord(self._current.federated_eval)

    # ---- centralised evaluation: Flower calls it last in every round --------------------

    def evaluate_round(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """evaluate_fn: evaluates the strategy's own soup (already recalibrated) on the
        server's test data, writes the round's JSON line and checkpoints the round."""
        result = None
        if self.server_data is not None:
            self.model.load_state_dict(self.soup)
            metrics = evaluate(self.model, self.server_data.test)
            if self.run.ood:
                ood = evaluate_ood(self.model, self.server_data.test.head(self.run.ood_examples), seed=self.run.seed)
                metrics.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
            result = MetricRecord({k: float(v) for k, v in metrics.items()})
        if flower_round == 0:  # Flower's look at the initial arrays, before any round
            return result
        server_round = flower_round + self.round_offset
        log = self._current
        log.central_eval = dict(result) if result is not None else {}
        log.seconds = round(time.perf_counter() - self._started, 3)
        self._started = time.perf_counter()
        self.rounds.append(log)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(log.__dict__) + "\n")
        self.save_checkpoint(server_round)
        return result

    def _write_round_lines(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "rounds.jsonl").write_text("".join(json.dumps(log.__dict__) + "\n" for log in self.rounds))

    # ---- phase machinery ---------------------------------------------------------------

    def _prune_for(self, step: int, target: float) -> None:
        self.soup, self.mask = prune_state(self.soup, self.mask, target, method=self.run.pruning,
                                           seed=self.run.seed * 1000 + step)
        self.digest = mask_digest(self.mask)
        unit = "phase" if self.fed.pruning_schedule == "imp" else "mask update"
        self.log(f"{unit} {step}: pruned to {sparsity(self.mask):.4%} sparsity (mask {self.digest[:12]})")

    def _finish_phase(self, server_round: int, grid: Grid) -> None:
        phase, _ = self.phase_at(server_round)
        if self._kept_candidates:
            self.soup, chosen, _ = greedy_soup(self._kept_candidates, self.mask, self._heldout_score)
            self.log(f"phase {phase}: greedy soup kept candidates {chosen}")
            self._kept_candidates = []
        if not norm_layers(self.model):
            return
        if self.fed.recalibration == "server" and self.server_data is not None:
            self.soup = self._recalibrated(self.soup)
        else:
            self._federated_recalibration(server_round, grid)

    def _recalibrated(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.load_state_dict(state)
        recalibrate_norms(self.model, self.server_data.train, fraction=self.run.recalibration_fraction, seed=self.run.seed)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _heldout_score(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(self._recalibrated(state))
        return evaluate(self.model, self.server_data.heldout)["accuracy"]

    def _federated_recalibration(self, server_round: int, grid: Grid) -> None:
        """Clients re-estimate norm statistics of the soup on their data; the server
        combines them exactly (pooled mean and variance, weighted by examples)."""
        phase, _ = self.phase_at(server_round)
        payload = self.soup_payload(server_round)
        nodes = list(grid.get_node_ids())
        messages = [
            Message(content=RecordDict({"soup": record_of(payload), "config": ConfigRecord({
                "phase": phase, "server-round": server_round, "fraction": self.run.recalibration_fraction})}),
                dst_node_id=node, message_type=NORM_STATS)
            for node in nodes
        ]
        pooled = NormStatsAverage(self.model)
        for reply in grid.send_and_receive(messages, timeout=self.fed.round_timeout):
            if reply.has_error():
                self.log(f"round {server_round}: norm statistics failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            try:
                pooled.add(reply.content["stats"].to_torch_state_dict(), int(reply.content["metrics"]["num-examples"]))
            except (KeyError, ValueError) as error:
                self.log(f"round {server_round}: rejected norm statistics from node {reply.metadata.src_node_id}: {error}")
        if pooled.count == 0:
            self.log(f"phase {phase}: no client returned norm statistics; keeping the averaged statistics")
            return
        self.soup = {**self.soup, **pooled.result()}
        self.log(f"phase {phase}: norm statistics recalibrated by {pooled.count} clients")

    def _job_flags(self, server_round: int) -> dict:
        """Lets clients tell when the job is over (``fedsms-client`` exits then)."""
        return {"last-round": server_round == self.num_rounds, "out-dir": str(self.out_dir.resolve())}

    def _candidate_for(self, index: int, phase: int, server_round: int) -> CandidateConfig:
        if phase == 0:
            base = replace(self.run.pretrain_candidate(), seed=self.run.seed + index)
        elif self.fed.mode == "hyperparameter":
            base = self.candidates[index % len(self.candidates)]
        else:
            base = replace(self.run.base_candidate(), seed=self.run.seed + index)
        return replace(for_phase(base, phase), seed=for_phase(base, phase).seed + 101 * server_round)

    def _sample(self, grid: Grid, minimum: int) -> list[int]:
        wanted = max(minimum, self.fed.min_available_clients)
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if waited == 0.0 or waited % 10 < 1:
                self.log(f"waiting for clients: {len(nodes)} connected, {wanted} needed")
            time.sleep(1.0)
            waited += 1.0
        return nodes

    def _decode_update(self, update: Update, phase: int, server_round: int) -> codec.Decoded:
        if update.error is not None:
            raise codec.PayloadError(update.error)
        decoded = codec.decode(
            update.payload, expected_mask=self.mask, expected_digest=self.digest, template=self.soup,
            expected_phase=phase, expected_round=server_round, expected_kind="update",
        )
        if not 0 < decoded.num_examples <= MAX_EXAMPLES:
            raise codec.PayloadError(f"the reply claims {decoded.num_examples} training examples")
        return decoded

    def save_checkpoint(self, server_round: int) -> Path:
        phase, r = self.phase_at(server_round)
        return save_checkpoint(self.out_dir / "checkpoints" / "soup", self.soup, self.mask, {
            "phase": phase, "round_in_phase": r, "server_round": server_round, "model": self.run.model,
            "dataset": self.run.dataset, "config": {**self.run.to_dict(), **self.fed.__dict__},
            "metrics": self.rounds[-1].central_eval if self.rounds else {},
            "rounds": [log.__dict__ for log in self.rounds],  # the history a resumed job continues
        })
