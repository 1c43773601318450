"""When a job prunes, to what sparsity, and how long candidates retrain in between.

A job is a list of *prune steps*. Each step prunes the current state to its sparsity, then
candidates retrain under that mask and their merge starts the next step.

- IMP: step p (1..P) is phase p, reaching ``1 - (1 - q)^p`` with ``q = 1 - (1 - s)^(1/P)``;
  candidates retrain ``retrain-epochs`` each.
- GMP: the cubic schedule of Zhu & Gupta, ``s_t = s_f + (s_i - s_f)(1 - t/N)^3`` at the N
  mask updates t = 1..N (``gmp-updates``, 0 meaning one per phase), t = 0 being the dense
  model at ``gmp-initial-sparsity`` s_i. The IMP epoch budget (P × retrain-epochs) is split
  as evenly as whole epochs allow over the N intervals.

A federated job groups its server rounds into phases (phase 0: dense pretraining rounds).
Under ``pruning-schedule = imp`` the first round of each phase prunes; under ``gmp`` the
P × rounds-per-phase pruning rounds are split evenly over the N updates and the first round
of each interval prunes, after the previous round's aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedsms import FedSMSError
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import sparsity_after_phase
from fedsms.recipe import CandidateConfig


@dataclass(frozen=True)
class PruneStep:
    """One prune of a job.

    Parameters
    ----------
    index : int
        1-based number of the step: the phase (IMP) or the mask update (GMP). It seeds
        random pruning and the candidates' batch order, so it is part of the result.
    sparsity : float
        Fraction of prunable weights that are zero after this prune.
    epochs : int
        Epochs each candidate retrains after this prune (the local driver's budget).
    """

    index: int
    sparsity: float
    epochs: int


@dataclass(frozen=True)
class Round:
    """One server round of a federated job.

    Parameters
    ----------
    number : int
        1-based server round (continues across a resume).
    phase : int
        Phase the round belongs to; 0 for dense pretraining rounds.
    round_in_phase : int
        1-based position of the round in its phase.
    prune : PruneStep or None
        The prune that opens this round, or None when the round keeps the mask.
    ends_phase : bool
        True for the last round of a phase: the phase's soup is finished after it.
    """

    number: int
    phase: int
    round_in_phase: int
    prune: PruneStep | None
    ends_phase: bool


def prune_seed(seed: int, step: int) -> int:
    """The seed of random pruning at ``step``: derived, so a resumed job needs no RNG state.

    Parameters
    ----------
    seed : int
        The job's seed.
    step : int
        The prune step's index (``PruneStep.index``).

    Returns
    -------
    int
        ``seed * 1000 + step`` for steps below 1000 (as always), ``seed + step * 2**32``
        from step 1000 on: distinct for every (seed, step) with ``0 <= seed < 2**32``
        (the schema's range), and above every value of the first form.

    Raises
    ------
    FedSMSError
        If a step of 1000 or more comes with a seed outside ``[0, 2**32)``.
    """
    if step < 1000:
        return seed * 1000 + step
    if not 0 <= seed < 2**32:
        raise FedSMSError(f"seed {seed} is outside 0..2**32-1; prune steps from 1000 on need a seed in that range")
    return seed + step * 2**32


def for_phase(config: CandidateConfig, phase: int) -> CandidateConfig:
    """The same candidate in another phase draws another batch order.

    Parameters
    ----------
    config : CandidateConfig
        The candidate.
    phase : int
        The phase (or prune step index).

    Returns
    -------
    CandidateConfig
        ``config`` with seed ``config.seed + 10007 * phase``.
    """
    return replace(config, seed=config.seed + 10_007 * phase)


def round_candidate(run: RunConfig, mode: str, index: int, phase: int, server_round: int) -> CandidateConfig:
    """The hyperparameters of the ``index``-th client of a federated ``server_round``.

    In phase 0 every client pretrains (``run.pretrain_candidate()``) with seed
    ``seed + index``. Later, a hyperparameter soup gives client i the recipe's candidate
    i mod m; a data soup gives every client the base candidate with seed ``seed + index``.
    The seed is then shifted per phase (``for_phase``) and by ``101 * server_round``, so
    every round of a phase draws another batch order.

    Parameters
    ----------
    run : RunConfig
        The run: its recipe, base candidate, pretraining settings and seed.
    mode : str
        ``hyperparameter`` or ``data`` (the federation's soup mode).
    index : int
        The client's position among the round's clients (its candidate index).
    phase : int
        The round's phase.
    server_round : int
        The round, from 1.

    Returns
    -------
    CandidateConfig
        What the client trains with.
    """
    if phase == 0:
        base = replace(run.pretrain_candidate(), seed=run.seed + index)
    elif mode == "hyperparameter":
        candidates = run.candidate_configs()
        base = candidates[index % len(candidates)]
    else:
        base = replace(run.base_candidate(), seed=run.seed + index)
    base = for_phase(base, phase)
    return replace(base, seed=base.seed + 101 * server_round)


def sample_seed(seed: int, server_round: int) -> int:
    """The seed of the client draw of ``server_round``: derived, so a resumed job draws
    the same clients as the job it continues.

    Parameters
    ----------
    seed : int
        The job's seed.
    server_round : int
        The round, from 1.

    Returns
    -------
    int
        ``seed * 100003 + server_round``.
    """
    return seed * 100_003 + server_round


def step_candidate(config: CandidateConfig, step: PruneStep) -> CandidateConfig:
    """How a candidate of the recipe retrains after ``step``: the step's own batch order
    (``for_phase``) and its epochs. The local driver and ``fedsms retrain`` both use this.

    Parameters
    ----------
    config : CandidateConfig
        A candidate of the recipe.
    step : PruneStep
        The prune step after which the candidate retrains.

    Returns
    -------
    CandidateConfig
        ``config`` with the step's batch order (``for_phase(config, step.index)``) and its ``epochs``.
    """
    return replace(for_phase(config, step.index), epochs=step.epochs)


def cubic_sparsity(step: float, start: float, end: float, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` up to ``start``, ``final`` from ``end`` on.

    In between, ``final + (initial - final) * (1 - (step - start) / (end - start))^3``.

    Parameters
    ----------
    step : float
        Where in the schedule (a mask update, round or step count).
    start : float
        Where the sparsity starts to rise.
    end : float
        Where it reaches ``final``; greater than ``start``.
    initial : float
        Sparsity up to ``start``, in [0, 1).
    final : float
        Sparsity from ``end`` on, in [0, 1).

    Returns
    -------
    float
        The sparsity at ``step``.
    """
    if step >= end:
        return final
    if step <= start:
        return initial
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` whole units over ``parts`` intervals, as evenly as possible (earlier ones shorter).

    Parameters
    ----------
    total : int
        Units to split (epochs or rounds).
    parts : int
        Number of intervals, 1 to ``total``.

    Returns
    -------
    list of int
        ``parts`` lengths, each at least 1, summing to ``total``.

    Raises
    ------
    FedSMSError
        If ``parts`` is not in [1, ``total``].
    """
    if not 1 <= parts <= total:
        raise FedSMSError(
            f"cannot split {total} epochs or rounds into {parts} mask-update intervals; set gmp-updates to at most {total}"
        )
    return [(i + 1) * total // parts - i * total // parts for i in range(parts)]


def num_updates(run: RunConfig) -> int:
    """N, the mask updates of the GMP schedule.

    Parameters
    ----------
    run : RunConfig
        The run; its ``gmp_updates`` (0 meaning one per phase) and ``phases`` are read.

    Returns
    -------
    int
        ``run.gmp_updates``, or ``run.phases`` when it is 0.
    """
    return run.gmp_updates or run.phases


def imp_steps(run: RunConfig) -> list[PruneStep]:
    """The P phases of IMP.

    Parameters
    ----------
    run : RunConfig
        The run; its ``phases``, ``target_sparsity`` and ``retrain_epochs`` are read.

    Returns
    -------
    list of PruneStep
        Steps 1..P at ``sparsity_after_phase(target_sparsity, P, p)``, each of
        ``retrain_epochs`` epochs.
    """
    return [
        PruneStep(p, sparsity_after_phase(run.target_sparsity, run.phases, p), run.retrain_epochs)
        for p in range(1, run.phases + 1)
    ]


def gmp_steps(run: RunConfig) -> list[PruneStep]:
    """The N mask updates of GMP, sharing IMP's epoch budget.

    Parameters
    ----------
    run : RunConfig
        The run; its ``phases``, ``retrain_epochs``, ``gmp_updates``,
        ``gmp_initial_sparsity`` and ``target_sparsity`` are read.

    Returns
    -------
    list of PruneStep
        Steps t = 1..N on the cubic schedule (the last at ``target_sparsity``), whose epochs
        sum to ``phases * retrain_epochs``.

    Raises
    ------
    FedSMSError
        If N exceeds the epoch budget (``RunConfig`` already refuses such a run).
    """
    n = num_updates(run)
    epochs = split_evenly(run.phases * run.retrain_epochs, n)
    return [
        PruneStep(t, cubic_sparsity(t, 0, n, run.gmp_initial_sparsity, run.target_sparsity), epochs[t - 1])
        for t in range(1, n + 1)
    ]


def prune_steps(run: RunConfig, schedule: str) -> list[PruneStep]:
    """The prune steps of ``schedule`` (``"imp"`` or ``"gmp"``).

    Parameters
    ----------
    run : RunConfig
        The run.
    schedule : str
        ``"gmp"`` for ``gmp_steps``; anything else gives ``imp_steps``.

    Returns
    -------
    list of PruneStep
        The job's prune steps, in order.

    Raises
    ------
    FedSMSError
        As :func:`gmp_steps`.
    """
    return gmp_steps(run) if schedule == "gmp" else imp_steps(run)


def federated_rounds(run: RunConfig, fed: FederationConfig) -> list[Round]:
    """Every server round of a federated job, in order.

    ``fed.pretrain_rounds`` dense rounds (phase 0) come first, then ``rounds_per_phase``
    rounds for each of the P phases.

    Parameters
    ----------
    run : RunConfig
        The run; its ``phases`` and the prune steps' settings are read.
    fed : FederationConfig
        The federation; its ``pretrain_rounds``, ``rounds_per_phase`` and
        ``pruning_schedule`` are read.

    Returns
    -------
    list of Round
        Numbered from 1. Under ``imp`` the first round of each phase prunes; under ``gmp``
        the first round of each of the N intervals does.

    Raises
    ------
    FedSMSError
        If the N GMP updates do not fit the epoch budget or the P × rounds-per-phase rounds.
    """
    rounds = [Round(r, 0, r, None, r == fed.pretrain_rounds) for r in range(1, fed.pretrain_rounds + 1)]
    steps = prune_steps(run, fed.pruning_schedule)
    if fed.pruning_schedule == "gmp":
        lengths = split_evenly(run.phases * fed.rounds_per_phase, len(steps))
        opening = {sum(lengths[:i]): step for i, step in enumerate(steps)}  # pruning round (0-based) -> step
    else:
        opening = {(step.index - 1) * fed.rounds_per_phase: step for step in steps}
    for i in range(run.phases * fed.rounds_per_phase):
        phase, r = i // fed.rounds_per_phase + 1, i % fed.rounds_per_phase + 1
        rounds.append(Round(len(rounds) + 1, phase, r, opening.get(i), r == fed.rounds_per_phase))
    return rounds
