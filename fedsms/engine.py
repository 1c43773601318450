"""The SMS engine: the state of one job and the rules that move it from step to step.

The local driver (``fedsms local``), the offline ``fedsms soup`` and the Flower strategy all
drive one ``SoupEngine``, so every rule below is written once:

1. ``prune(step)``: the state is pruned to the step's sparsity (global/uniform magnitude or
   random, the new mask a subset of the old) and the digest of the new mask is kept.
2. Candidates retrain elsewhere under that mask (in this process, in worker processes, or
   on Flower clients) and flow into a ``Merge`` one at a time: one running sum of the values
   under the mask, never m models (the greedy and best-of-m rules keep the candidates,
   which they must score one by one).
3. ``end_round(merge)``: the state becomes the (weighted) mean of the merge.
4. ``end_phase(step, merge)``: the greedy soup or the best candidate is chosen on the
   task's held-out score, and the norm statistics of an average of several candidates are recalibrated.
   With a ``SoupGuard``, a uniform or weighted soup that scores below its best candidate on
   the held-out split by more than the guard's tolerance is replaced by the guard's fallback.

Data-dependent parts (recalibration, held-out scores) come in as ``PhaseHooks``, so the
engine runs the same with data in this process (``data_hooks``), with a federated
recalibration round, or with no data at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.data import DatasetSplits
from fedsms.evaluate import evaluate
from fedsms.masks import Mask, mask_digest, prune_state, sparsity
from fedsms.merge import RULES, Merge, Soup, State, capped_shares, state_from_values, values_under_mask
from fedsms.norms import norm_layers, recalibrate_norms
from fedsms.schedule import PruneStep, prune_seed
from fedsms.soup import greedy_soup
from fedsms.task import CLASSIFICATION, Task

# Moved to fedsms.merge; importable from here as before.
__all__ = [
    "RULES",
    "Merge",
    "PhaseHooks",
    "SoupGuard",
    "SoupEngine",
    "State",
    "capped_shares",
    "cpu_state",
    "data_hooks",
    "values_under_mask",
]


@dataclass
class PhaseHooks:
    """What finishing a phase needs from data.

    Parameters
    ----------
    recalibrate : callable or None
        ``recalibrate(state, step_index) -> state``: the state with its norm statistics
        re-estimated. None: the model has no norm layers, or there is no data to do it.
    heldout_score : callable or None
        ``heldout_score(state) -> float``: the task's score on the held-out split (never the
        test set), signed so that larger is better. None: greedy and best-of-m merges cannot
        run and are refused.
    """

    recalibrate: Callable[[State, int], State] | None = None
    heldout_score: Callable[[State], float] | None = None


@dataclass(frozen=True)
class SoupGuard:
    """What a phase does when its averaged soup loses to one of its own candidates.

    A soup of candidates that left one another's basin can score far below each of them
    (a high-sparsity phase after a large learning rate); IMP would have kept one model. The
    guard compares the recalibrated soup with the best candidate on the held-out split and
    falls back when the soup is worse by more than ``tolerance``.

    Parameters
    ----------
    fallback : str
        ``greedy`` (the greedy soup of the phase's candidates: never below the best one on
        the held-out split) or ``best`` (the best candidate).
    tolerance : float
        How far below the best candidate, in the task's score units (0.01: one point of
        accuracy), the soup may score before the phase falls back.
    """

    fallback: str = "greedy"
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.fallback not in ("greedy", "best"):
            raise FedSMSError(f"unknown soup-guard fallback {self.fallback!r}; use greedy, best or off")

    @classmethod
    def of(cls, setting: str, tolerance: float) -> SoupGuard | None:
        """The guard of the ``soup-guard`` and ``soup-guard-tolerance`` settings (None for ``off``).

        Parameters
        ----------
        setting : str
            ``greedy``, ``best`` or ``off``.
        tolerance : float
            The tolerance, in the task's score units.

        Returns
        -------
        SoupGuard or None
            The guard, or None when the setting is ``off``.
        """
        return None if setting == "off" else cls(setting, tolerance)


def cpu_state(model: nn.Module) -> State:
    """A detached CPU copy of ``model``'s state dict.

    Parameters
    ----------
    model : nn.Module
        The model to copy.

    Returns
    -------
    dict of str to Tensor
        New CPU tensors, in state-dict order.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def data_hooks(
    model: nn.Module,
    splits: DatasetSplits,
    *,
    fraction: float,
    seed: int,
    device: torch.device | str = "cpu",
    task: Task = CLASSIFICATION,
) -> PhaseHooks:
    """Hooks that recalibrate on a seeded ``fraction`` of ``splits.train`` and score on
    ``splits.heldout``, using ``model`` as scratch space.

    Parameters
    ----------
    model : nn.Module
        A model of the job's architecture; its weights are overwritten.
    splits : DatasetSplits
        Train (for recalibration) and held-out (for scores) data.
    fraction : float
        Fraction of the training data forwarded to re-estimate norm statistics.
    seed : int
        Base seed; step p recalibrates on the subset drawn with ``seed + p``.
    device : torch.device or str
        Where the forward passes run.
    task : Task, default CLASSIFICATION
        Whose score ``heldout_score`` is.

    Returns
    -------
    PhaseHooks
        ``recalibrate`` (None when ``model`` has no norm layers to recalibrate) and
        ``heldout_score`` (the task's held-out score, signed so that larger is better).
    """

    def recalibrate(state: State, step: int) -> State:
        model.load_state_dict(state)
        recalibrate_norms(model, splits.train, fraction=fraction, device=device, seed=seed + step)
        return cpu_state(model)

    def heldout_score(state: State) -> float:
        model.load_state_dict(state)
        return task.better(evaluate(model, splits.heldout, device=device, task=task)[task.score])

    return PhaseHooks(recalibrate if norm_layers(model) else None, heldout_score)


class SoupEngine:
    """The state and mask of one SMS job.

    Parameters
    ----------
    state : mapping of str to Tensor
        The starting state dict (a dense model, a checkpoint's soup).
    mask : Mask
        The starting mask (all ones for a dense model).
    pruning : str
        ``global`` or ``uniform`` magnitude pruning, or ``random``.
    seed : int
        The job's seed; random pruning at step p uses ``prune_seed(seed, p)``.
    hooks : PhaseHooks, optional
        Recalibration and held-out scores; without them phases end without either.
    log : callable, optional
        Receives one line per prune and per greedy choice.
    guard : SoupGuard, optional
        Fall back when a phase's uniform or weighted soup loses to its best candidate on the
        held-out split (needs ``hooks.heldout_score``); None keeps every soup as averaged.

    Attributes
    ----------
    state : dict of str to Tensor
        The current state (CPU), the soup so far, as a full state dict; replaced, never
        written to (assigning a full state dict or a ``merge.Soup`` sets it).
    soup : mapping of str to Tensor
        The current state as the engine holds it: after a streamed round a compact
        ``merge.Soup`` (the values under the mask, made dense when ``state`` or a tensor is
        first read), else the full state dict. What sending, checking and merging read.
    mask : Mask
        The current mask (CPU).
    digest : str
        ``mask_digest(mask)``, kept up to date.
    fallback : dict or None
        What the guard did at the last ``end_phase``: ``rule`` (the fallback), ``soup`` and
        ``best`` (held-out scores, signed so that larger is better), ``kept`` (candidate
        indices); None when the soup was kept.
    """

    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        mask: Mask,
        *,
        pruning: str = "global",
        seed: int = 0,
        hooks: PhaseHooks | None = None,
        log: Callable[[str], None] | None = None,
        guard: SoupGuard | None = None,
    ) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.mask: Mask = {k: v.to("cpu", copy=True) for k, v in mask.items()}
        self.digest = mask_digest(self.mask)
        self.pruning, self.seed = pruning, seed
        self.hooks = hooks or PhaseHooks()
        self.log = log or (lambda _: None)
        self._warned: set[str] = set()
        self.guard = guard
        self.fallback: dict | None = None

    @property
    def state(self) -> State:
        """The current state as a full state dict (a compact soup is made dense once, here)."""
        return self._soup.full() if isinstance(self._soup, Soup) else self._soup

    @state.setter
    def state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._soup = state

    @property
    def soup(self) -> Mapping[str, torch.Tensor]:
        """The current state as held: a compact ``merge.Soup`` after a streamed round, else ``state``."""
        return self._soup

    @property
    def sparsity(self) -> float:
        """Fraction of prunable weights that are zero under the current mask."""
        return sparsity(self.mask)

    def restore(self, state: Mapping[str, torch.Tensor], mask: Mask) -> None:
        """Continue from a saved state and mask (a checkpoint).

        Parameters
        ----------
        state : mapping of str to Tensor
            The saved state (copied).
        mask : Mask
            The saved mask (copied); the digest is recomputed.

        Raises
        ------
        FedSMSError
            If the saved state names other tensors than the current one.
        """
        if set(state) != set(self.soup):
            raise FedSMSError(
                "the saved state names other tensors than this job's model; restore a checkpoint of the same model"
            )
        self.state = {k: state[k].clone() for k in self.soup}  # the model's order, in which payloads list tensors
        self.mask = {k: v.clone() for k, v in mask.items()}
        self.digest = mask_digest(self.mask)

    def prune(self, step: PruneStep) -> None:
        """Prune the state to ``step.sparsity``; the new mask never regrows.

        Parameters
        ----------
        step : PruneStep
            The step: its ``sparsity`` is the target, its ``index`` seeds random pruning.

        Raises
        ------
        FedSMSError
            If the engine's pruning method is unknown.
        """
        self.state, self.mask = prune_state(
            self.state, self.mask, step.sparsity, method=self.pruning, seed=prune_seed(self.seed, step.index)
        )
        self.digest = mask_digest(self.mask)
        self.log(f"step {step.index}: pruned to {self.sparsity:.4%} sparsity (mask {self.digest[:12]})")

    def merge(self, rule: str, *, ends_phase: bool = True, keep: bool = False, **robust: float) -> Merge:
        """A new merge for the current mask; candidates are kept only when ``rule`` will
        choose among them at the end of the phase, or when ``keep`` asks for them.

        Parameters
        ----------
        rule : str
            ``uniform``, ``weighted``, ``greedy`` or ``best``.
        ends_phase : bool, default True
            Whether this round's merge ends the phase (only then do greedy and best choose).
        keep : bool, default False
            Keep every candidate whatever the rule (e.g. for soup diagnostics): m times the
            memory of the running sum.
        **robust : float
            ``trim_fraction``, ``max_weight``, ``norm_bound``, ``krum_malicious`` of ``Merge``
            (``RunConfig.merge_options()``).

        Returns
        -------
        Merge
            An empty merge.

        Raises
        ------
        FedSMSError
            If ``rule`` is unknown.
        """
        return Merge(
            rule,
            keep_candidates=keep or (ends_phase and (rule in ("greedy", "best") or self._guards(rule))),
            log=self.log,
            warn=self._warn_once,
            reference=values_under_mask(self.soup, self.mask) if robust.get("norm_bound") else None,
            **robust,
        )

    def _guards(self, rule: str) -> bool:
        """Whether the guard watches soups of ``rule`` (it needs held-out scores)."""
        return self.guard is not None and rule in ("uniform", "weighted") and self.hooks.heldout_score is not None

    def _warn_once(self, line: str) -> None:
        """Log ``line`` the first time only (a setting that cannot act says so once a job)."""
        if line not in self._warned:
            self._warned.add(line)
            self.log(f"warning: {line}")

    def end_round(self, merge: Merge) -> None:
        """The state becomes the mean of the merge's candidates (values outside the mask stay
        zero): a compact ``merge.Soup`` when the merge streamed replies read in place.

        Parameters
        ----------
        merge : Merge
            The round's merge, with at least one candidate.

        Raises
        ------
        SoupError
            If the merge has no candidate.
        PayloadError
            If the merge's values do not fit the current mask and state.
        """
        state = merge.flat_state(self.digest)
        self.state = state if state is not None else state_from_values(merge.result(), self.mask, self.state)

    def end_phase(self, step_index: int, merge: Merge, *, recalibrate: bool = True) -> list[int]:
        """Finish a phase after its last ``end_round``: choose (greedy, best) and, unless
        ``recalibrate`` is False (the caller recalibrates some other way), recalibrate an
        average of several candidates. Returns the indices of the candidates in the state.

        Parameters
        ----------
        step_index : int
            The phase's prune step index (passed to the recalibration hook).
        merge : Merge
            The merge of the phase's last round, already applied by ``end_round``.
        recalibrate : bool, default True
            Recalibrate through the hooks; False when the caller recalibrates another way.

        Returns
        -------
        list of int
            Indices (in the order added) of the candidates the state is made of: all of
            them for ``uniform`` and ``weighted`` (unless the guard fell back), the greedy
            soup's or the best one's.

        Raises
        ------
        FedSMSError
            If ``greedy`` or ``best`` must score candidates and the hooks have no held-out score.
        """
        chosen = list(range(merge.count))
        self.fallback = None
        if merge.rule == "best":
            self.state, chosen = self._best(merge, self._candidate_scores(merge))
        elif merge.rule == "greedy" and merge.count > 1:
            self.state, chosen = self._greedy(merge, step_index)
            self.log(f"phase {step_index}: greedy soup kept candidates {chosen}")
        if recalibrate and merge.rule != "best" and merge.count > 1:  # one candidate's own statistics already fit it
            self.state = self.recalibrated(self.state, step_index)
            if self._guards(merge.rule):
                chosen = self._guarded(step_index, merge, chosen)
        return chosen

    def _guarded(self, step_index: int, merge: Merge, chosen: list[int]) -> list[int]:
        """Apply the guard to the phase's recalibrated soup; returns the candidates kept."""
        soup = self._score(self.state)
        scores = self._candidate_scores(merge)
        best = max(scores)
        if best - soup <= self.guard.tolerance:
            return chosen
        if self.guard.fallback == "best":
            self.state, kept = self._best(merge, scores)
        else:
            state, kept = self._greedy(merge, step_index)
            self.state = self.recalibrated(state, step_index) if len(kept) > 1 else state
        self.fallback = {"rule": self.guard.fallback, "soup": soup, "best": best, "kept": kept}
        self.log(
            f"phase {step_index}: the {merge.rule} soup scored {soup:.4f} on the held-out split, "
            f"{best - soup:.4f} below its best candidate ({best:.4f}); "
            f"falling back to the {self.guard.fallback} soup of candidates {kept} (soup-guard = off keeps the soup)"
        )
        return kept

    def recalibrated(self, state: State, step_index: int) -> State:
        """``state`` with its norm statistics re-estimated, when the hooks can do it.

        Parameters
        ----------
        state : dict of str to Tensor
            The state to recalibrate.
        step_index : int
            The prune step index (seeds the recalibration subset).

        Returns
        -------
        dict of str to Tensor
            The recalibrated state, or ``state`` itself when there is no recalibration hook.
        """
        return self.hooks.recalibrate(state, step_index) if self.hooks.recalibrate else state

    def _candidate_scores(self, merge: Merge) -> list[float]:
        """Each kept candidate's held-out score, in the order they were added."""
        return [self._score(self._full(c)) for c in merge.candidates]

    def _best(self, merge: Merge, scores: list[float]) -> tuple[State, list[int]]:
        """The best-scoring candidate's state and its index (the first of equals)."""
        best = max(range(len(scores)), key=scores.__getitem__)
        return self._full(merge.candidates[best]), [best]

    def _greedy(self, merge: Merge, step_index: int) -> tuple[State, list[int]]:
        """The greedy soup of the kept candidates (each trial recalibrated before it is
        scored) and the indices it holds, best first."""
        states = [self._full(c) for c in merge.candidates]
        state, chosen, _ = greedy_soup(states, self.mask, lambda s: self._score(self.recalibrated(s, step_index)))
        return state, chosen

    def _score(self, state: State) -> float:
        if self.hooks.heldout_score is None:
            raise FedSMSError(
                "greedy and best-of-m merges need held-out data; use merge uniform or give the server data"
            )
        return self.hooks.heldout_score(state)

    def _full(self, values: Mapping[str, torch.Tensor]) -> State:
        return state_from_values(values, self.mask, self.state)
