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
4. ``end_phase(step, merge)``: the greedy soup or the best candidate is chosen on held-out
   accuracy, and the norm statistics of an average of several candidates are recalibrated.

Data-dependent parts (recalibration, held-out scores) come in as ``PhaseHooks``, so the
engine runs the same with data in this process (``data_hooks``), with a federated
recalibration round, or with no data at all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsms import FedSMSError, codec
from fedsms.codec import state_from_values
from fedsms.data import DatasetSplits
from fedsms.evaluate import evaluate
from fedsms.masks import Mask, mask_digest, prune_state, sparsity
from fedsms.norms import norm_layers, recalibrate_norms
from fedsms.schedule import PruneStep, prune_seed
from fedsms.schema import MERGE_RULES
from fedsms.soup import FlatSum, RunningAverage, SoupError, greedy_soup

State = dict[str, torch.Tensor]

# How a merge turns its candidates into one state: the configurable soups, and "best"
# (IMP best-of-m: the best candidate on the held-out split, no averaging).
RULES = (*MERGE_RULES, "best")


@dataclass
class PhaseHooks:
    """What finishing a phase needs from data.

    Parameters
    ----------
    recalibrate : callable or None
        ``recalibrate(state, step_index) -> state``: the state with its norm statistics
        re-estimated. None: the model has no norm layers, or there is no data to do it.
    heldout_score : callable or None
        ``heldout_score(state) -> float``: accuracy on the held-out split (never the test
        set). None: greedy and best-of-m merges cannot run and are refused.
    """

    recalibrate: Callable[[State, int], State] | None = None
    heldout_score: Callable[[State], float] | None = None


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

    Returns
    -------
    PhaseHooks
        ``recalibrate`` (None when ``model`` has no norm layers to recalibrate) and
        ``heldout_score`` (the held-out accuracy).
    """

    def recalibrate(state: State, step: int) -> State:
        model.load_state_dict(state)
        recalibrate_norms(model, splits.train, fraction=fraction, device=device, seed=seed + step)
        return cpu_state(model)

    def heldout_score(state: State) -> float:
        model.load_state_dict(state)
        return evaluate(model, splits.heldout, device=device)["accuracy"]

    return PhaseHooks(recalibrate if norm_layers(model) else None, heldout_score)


def values_under_mask(state: Mapping[str, torch.Tensor], mask: Mask) -> State:
    """The compact form a merge holds: each masked tensor's kept values in mask order, the
    other tensors (biases, norm layers) whole. The wire payload carries the same values.

    Parameters
    ----------
    state : mapping of str to Tensor
        A full state dict (any device).
    mask : Mask
        The mask whose kept entries are taken.

    Returns
    -------
    dict of str to Tensor
        CPU tensors in ``state``'s order: 1-D kept values for masked tensors, the others
        unchanged in shape.
    """
    return {k: (v.detach().cpu()[mask[k].cpu()] if k in mask else v.detach().cpu()) for k, v in state.items()}


class Merge:
    """Candidates of one round flowing into their merge.

    Parameters
    ----------
    rule : str
        ``uniform`` or ``weighted`` (by example counts) average, ``greedy`` soup, ``best``,
        or the robust ``trimmed-mean`` / ``median`` (coordinate-wise, as Flower's
        ``FedTrimmedAvg`` / ``FedMedian``).
    keep_candidates : bool
        Keep every candidate's values besides the running sum (needed by ``greedy`` and
        ``best``, which score candidates one by one). The robust rules and options keep
        them too.
    trim_fraction : float, default 0.2
        ``trimmed-mean``: fraction of the candidates cut at each end, per value.
    max_weight : float, default 1.0
        ``weighted``: the largest share one candidate may have (1: no cap); the excess is
        shared among the others in proportion to their examples.
    norm_bound : float, default 0.0
        Drop candidates whose L2 distance from ``reference`` exceeds ``norm_bound`` times
        the round's median distance (0: off).
    reference : mapping of str to Tensor, optional
        The soup the candidates started from, in the compact form (needed by ``norm_bound``).
    log : callable, optional
        Receives a line per dropped candidate.

    Attributes
    ----------
    rule : str
        The merge rule.
    average : RunningAverage
        The running (weighted) sum of the candidates' values.
    candidates : list of dict of str to Tensor
        The candidates' values, when kept.
    examples : list of int
        Each candidate's example count, in the order added.
    dropped : list of int
        Indices of candidates the norm bound dropped (after ``result``).

    Raises
    ------
    FedSMSError
        If ``rule`` is not one of ``RULES``.
    """

    def __init__(
        self,
        rule: str,
        keep_candidates: bool,
        *,
        trim_fraction: float = 0.2,
        max_weight: float = 1.0,
        norm_bound: float = 0.0,
        reference: Mapping[str, torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if rule not in RULES:
            raise FedSMSError(f"unknown merge rule {rule!r}; use one of {', '.join(RULES)}")
        if norm_bound and reference is None:
            raise FedSMSError("an update-norm bound needs the soup the candidates started from")
        self.rule = rule
        self.average = RunningAverage()
        self.candidates: list[State] = []
        self.examples: list[int] = []
        self.distances: list[float] = []
        self.dropped: list[int] = []
        self.trim_fraction, self.norm_bound, self.reference = trim_fraction, norm_bound, reference
        self.max_weight = max_weight if rule == "weighted" else 1.0
        self.log = log or (lambda _: None)
        self._robust = rule in ROBUST_RULES or self.max_weight < 1 or norm_bound > 0
        self._keep = keep_candidates or self._robust
        self._screened = False
        self._flat = FlatSum()

    @property
    def count(self) -> int:
        """Candidates added so far (less those the norm bound dropped)."""
        return self.average.count + self._flat.count - len(self.dropped)

    def add_reply(self, reply: codec.FlatReply, num_examples: int) -> None:
        """Add one candidate read in place (``codec.UpdateReader``): straight into a flat
        running sum when the rule streams; merges that keep candidates take a copy.

        Parameters
        ----------
        reply : codec.FlatReply
            The validated reply.
        num_examples : int
            Examples it trained on (the weight under ``weighted``).
        """
        if self._keep:
            self.add(reply.to_values(), num_examples)
            return
        self._flat.add(reply, float(num_examples) if self.rule == "weighted" else 1.0)
        self.examples.append(num_examples)

    def add(self, values: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """Add one candidate, in the compact form of ``values_under_mask``.

        Parameters
        ----------
        values : mapping of str to Tensor
            The candidate's values under the mask and its other tensors.
        num_examples : int
            Examples it trained on: its weight under ``weighted``, recorded for every rule.

        Raises
        ------
        SoupError
            If the values' names or shapes differ from the earlier candidates'.
        ValueError
            If the weight is not a positive finite number (``weighted``).
        """
        self.average.add(values, float(num_examples) if self.rule == "weighted" else 1.0)
        self.examples.append(num_examples)
        if self._keep:
            self.candidates.append(dict(values))
        if self.norm_bound:
            self.distances.append(_distance(values, self.reference))

    def result(self) -> State:
        """The merged values (compact form): the running mean, or for the robust rules and
        options a merge of the kept candidates. The result is checked to be finite.

        Raises
        ------
        SoupError
            If no candidate is left, or the merge is not finite.
        """
        self._screen()
        self.average.absorb(self._flat)  # replies read in place join the average once, here
        self._flat = FlatSum()
        if not self._robust or (
            self.rule in ("uniform", "weighted", "greedy", "best") and self.max_weight >= 1 and not self.dropped
        ):
            merged = self.average.mean()
        else:
            merged = self._robust_merge()
        for name, value in merged.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise SoupError(f"the merge of tensor {name!r} is not finite; a candidate has absurd values")
        return merged

    def flat_state(self, mask_digest: str) -> State | None:
        """The merged full state straight from the flat running sum (``codec.FlatLayout.state``:
        one scatter, views of one buffer per dtype), when every candidate was read in place
        under the mask of ``mask_digest`` and the rule is a plain running mean; else None
        (``result`` then merges tensor by tensor). Checked finite, as ``result`` is.

        Raises
        ------
        SoupError
            If the merge is not finite.
        """
        flat = self._flat
        if self._robust or self.average.count or not flat.count or flat.layout.digest != mask_digest:
            return None
        dense = flat.dense_means()
        # The masked means are made tensor by tensor as the soup is rebuilt (no block-sized
        # temporary); they are finite when the sum is and its largest magnitude over the
        # total weight stays within float32.
        low, high = torch.aminmax(flat.values_sum) if flat.values_sum.numel() else (torch.zeros(()),) * 2
        largest = max(abs(float(low)), abs(float(high)))
        finite = math.isfinite(largest) and largest / flat.total_weight < _FLOAT32_MAX
        if not (finite and all(_finite(run) for run in dense if run.is_floating_point())):
            self.result()  # raises, naming the tensor
            raise SoupError("the merge is not finite; a candidate has absurd values")
        return flat.layout.state(flat.values_sum, dense, divisor=flat.total_weight)

    def _screen(self) -> None:
        """Drop (once) candidates farther from the soup than norm_bound × the median distance."""
        if self._screened or not self.norm_bound or len(self.distances) < 3:
            self._screened = True
            return
        self._screened = True
        median = statistics.median(self.distances)
        limit = self.norm_bound * median
        self.dropped = [i for i, d in enumerate(self.distances) if d > limit]
        for i in self.dropped:
            self.log(
                f"merge: dropped candidate {i}: its distance from the soup {self.distances[i]:.4g} exceeds "
                f"update-norm-bound {self.norm_bound:g} x the round's median {median:.4g}"
            )
        if self.dropped:
            keep = [i for i in range(len(self.candidates)) if i not in set(self.dropped)]
            self.candidates = [self.candidates[i] for i in keep]
            self.examples = [self.examples[i] for i in keep]

    def _robust_merge(self) -> State:
        n = len(self.candidates)
        if not n:
            raise SoupError("nothing to merge: every candidate was dropped")
        if self.rule == "weighted":
            shares = capped_shares([float(e) for e in self.examples], self.max_weight)
        else:
            shares = [1.0 / n] * n
        out = {}
        for name, first in self.candidates[0].items():
            if not first.is_floating_point():
                out[name] = torch.stack([c[name] for c in self.candidates]).max(0).values
                continue
            stacked = torch.stack([c[name].double() for c in self.candidates])
            if self.rule == "median":
                ordered = stacked.sort(0).values
                value = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            elif self.rule == "trimmed-mean":
                cut = min(int(self.trim_fraction * n), (n - 1) // 2)
                value = stacked.sort(0).values[cut : n - cut].mean(0)
            else:
                weights = torch.tensor(shares, dtype=torch.float64).view(-1, *[1] * first.dim())
                value = (stacked * weights).sum(0)
            out[name] = value.to(torch.promote_types(first.dtype, torch.float32))
        return out


ROBUST_RULES = ("trimmed-mean", "median")


def capped_shares(weights: list[float], cap: float) -> list[float]:
    """Shares proportional to ``weights``, none above ``cap``; the excess of capped ones
    is shared among the others in proportion (equal shares when ``cap`` × n ≤ 1).

    Parameters
    ----------
    weights : list of float
        Positive weights (e.g. example counts), at least one.
    cap : float
        The largest share any weight may get.

    Returns
    -------
    list of float
        One share per weight, summing to 1.
    """
    n = len(weights)
    if cap * n <= 1:
        return [1.0 / n] * n
    shares: list[float] = [0.0] * n
    free, left = set(range(n)), 1.0
    while True:
        total = sum(weights[i] for i in free)
        over = [i for i in free if weights[i] / total * left > cap]
        if not over:
            for i in free:
                shares[i] = weights[i] / total * left
            return shares
        for i in over:
            shares[i] = cap
            free.discard(i)
            left -= cap


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _finite(block: torch.Tensor) -> bool:
    """No NaN or Inf in a floating block: one aminmax pass (NaN propagates into both)."""
    if not block.numel():
        return True
    low, high = torch.aminmax(block)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _distance(values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 distance over the floating tensors, accumulated in float64."""
    total = 0.0
    for name, value in values.items():
        if value.is_floating_point() and name in reference:
            total += float(torch.sum((value.double() - reference[name].double()) ** 2))
    return math.sqrt(total)


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

    Attributes
    ----------
    state : dict of str to Tensor
        The current state (CPU): the soup so far.
    mask : Mask
        The current mask (CPU).
    digest : str
        ``mask_digest(mask)``, kept up to date.
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
    ) -> None:
        self.state: State = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.mask: Mask = {k: v.to("cpu", copy=True) for k, v in mask.items()}
        self.digest = mask_digest(self.mask)
        self.pruning, self.seed = pruning, seed
        self.hooks = hooks or PhaseHooks()
        self.log = log or (lambda _: None)

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
        if set(state) != set(self.state):
            raise FedSMSError(
                "the saved state names other tensors than this job's model; restore a checkpoint of the same model"
            )
        self.state = {k: state[k].clone() for k in self.state}  # the model's order, in which payloads list tensors
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
            ``trim_fraction``, ``max_weight``, ``norm_bound`` of ``Merge``.

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
            keep_candidates=keep or (ends_phase and rule in ("greedy", "best")),
            log=self.log,
            reference=values_under_mask(self.state, self.mask) if robust.get("norm_bound") else None,
            **robust,
        )

    def end_round(self, merge: Merge) -> None:
        """The state becomes the mean of the merge's candidates (values outside the mask stay zero).

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
            them for ``uniform`` and ``weighted``, the greedy soup's or the best one's.

        Raises
        ------
        FedSMSError
            If ``greedy`` or ``best`` must score candidates and the hooks have no held-out score.
        """
        chosen = list(range(merge.count))
        if merge.rule == "best":
            scores = [self._score(self._full(c)) for c in merge.candidates]
            best = max(range(len(scores)), key=scores.__getitem__)
            self.state, chosen = self._full(merge.candidates[best]), [best]
        elif merge.rule == "greedy" and merge.count > 1:
            states = [self._full(c) for c in merge.candidates]
            self.state, chosen, _ = greedy_soup(
                states, self.mask, lambda s: self._score(self.recalibrated(s, step_index))
            )
            self.log(f"phase {step_index}: greedy soup kept candidates {chosen}")
        if recalibrate and merge.rule != "best" and merge.count > 1:  # one candidate's own statistics already fit it
            self.state = self.recalibrated(self.state, step_index)
        return chosen

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

    def _score(self, state: State) -> float:
        if self.hooks.heldout_score is None:
            raise FedSMSError(
                "greedy and best-of-m merges need held-out data; use merge uniform or give the server data"
            )
        return self.hooks.heldout_score(state)

    def _full(self, values: Mapping[str, torch.Tensor]) -> State:
        return state_from_values(values, self.mask, self.state)
