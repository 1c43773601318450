"""Gradual magnitude pruning (GMP) with a soup at every mask update, locally and federated.

GMP raises the sparsity along the cubic schedule of Zhu & Gupta,

    s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3,

recomputing the global magnitude mask at every update (never regrowing). Here the clock
counts mask updates: t = 0 is the dense (pretrained) model, where the curve starts at
``gmp-initial-sparsity`` s_i, and the N updates fall at t = 1..N, the last one reaching
``target-sparsity`` s_f exactly. Between two updates the model trains under the current
mask: one candidate (``gmp``) or m candidates from the current soup that are then averaged
(``gmp-soup``), and the soup is pruned to the next sparsity.

Epoch budget: the same as IMP's, P phases × ``retrain-epochs`` per candidate, split as
evenly as whole epochs allow over the N intervals (``gmp-updates``, 0 meaning one per
phase, in which case every interval is exactly one IMP phase long).

Federated (``pruning-schedule = "gmp"``): the mask updates happen on the server after
aggregation, at round boundaries: the P × ``rounds-per-phase`` pruning rounds are split
evenly over the N updates and the first round of each interval opens with the prune.
The budget is federated IMP's: the same rounds, each client training ``retrain-epochs``
epochs per round.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from fedsms import FedSMSError
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import Mask, prune_state, sparsity, sparsity_after_phase
from fedsms.recipe import for_phase

if TYPE_CHECKING:  # local.py imports this module to dispatch to it
    from fedsms.candidates import State
    from fedsms.local import LocalRun

GMP_METHODS = ("gmp", "gmp-soup")


def cubic_sparsity(step: float, start: float, end: float, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` up to ``start``, ``final`` from ``end`` on."""
    if step >= end:
        return final
    if step <= start:
        return initial
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` whole units over ``parts`` intervals, as evenly as possible (earlier ones shorter)."""
    if not 1 <= parts <= total:
        raise FedSMSError(f"cannot split {total} epochs or rounds into {parts} mask-update intervals; "
                          f"set gmp-updates to at most {total}")
    return [(i + 1) * total // parts - i * total // parts for i in range(parts)]


def num_updates(run: RunConfig) -> int:
    return run.gmp_updates or run.phases


def update_targets(run: RunConfig) -> list[float]:
    """Sparsity after each of the N mask updates (t = 1..N on the cubic schedule)."""
    n = num_updates(run)
    return [cubic_sparsity(t, 0, n, run.gmp_initial_sparsity, run.target_sparsity) for t in range(1, n + 1)]


def interval_epochs(run: RunConfig) -> list[int]:
    """Epochs each candidate trains after each update: IMP's budget, P × retrain-epochs, split evenly."""
    return split_evenly(run.phases * run.retrain_epochs, num_updates(run))


def federated_update_rounds(run: RunConfig, fed: FederationConfig) -> dict[int, int]:
    """Under the gmp schedule: {0-based pruning round that opens an interval: 1-based update}."""
    lengths = split_evenly(run.phases * fed.rounds_per_phase, num_updates(run))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return {start: update for update, start in enumerate(starts, 1)}


def federated_prune_step(run: RunConfig, fed: FederationConfig, phase: int, round_in_phase: int) -> tuple[int, float] | None:
    """The prune that opens round ``round_in_phase`` of ``phase``, as (step, target sparsity),
    or None when the round keeps the mask. The step numbers the prune (phase for imp,
    update for gmp) and seeds random pruning as the local driver does."""
    if phase < 1:
        return None
    if fed.pruning_schedule == "imp":
        return (phase, sparsity_after_phase(run.target_sparsity, run.phases, phase)) if round_in_phase == 1 else None
    update = federated_update_rounds(run, fed).get((phase - 1) * fed.rounds_per_phase + round_in_phase - 1)
    return None if update is None else (update, update_targets(run)[update - 1])


def run_gmp(run: LocalRun, method: str, dense: State, mask: Mask) -> list[dict]:
    """GMP (one candidate) or GMP with a soup at every update, from the dense state."""
    config, rows, state = run.config, [], dense
    targets, epochs = update_targets(config), interval_epochs(config)
    candidates = run.candidate_configs if method == "gmp-soup" else run.candidate_configs[:1]
    for update, (target, length) in enumerate(zip(targets, epochs), 1):
        started = time.perf_counter()
        state, mask = prune_state(state, mask, target, method=config.pruning, seed=config.seed * 1000 + update)
        configs = [replace(for_phase(c, update), epochs=length) for c in candidates]
        label = f"[{method}] update {update}/{len(targets)} sparsity {sparsity(mask):.2%}"
        trained = run.trainer.train(state, mask, configs, label)
        extra: dict = {"candidates": len(trained), "epochs": length,
                       "train_loss": sum(m["train_loss"] for _, m in trained) / len(trained)}
        if len(trained) == 1:
            state = trained[0][0]
        else:
            state, extra["chosen"] = run.merge([s for s, _ in trained], mask, update, [m["num_examples"] for _, m in trained],
                                               config.merge)
        rows.append(run.record(method, update, state, mask, extra, started))
    return rows
