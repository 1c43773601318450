"""Merging under the mask: every rule that turns candidates into one state, in one place.

A candidate reaches a merge in its compact form, the values under the mask (each masked
tensor's kept entries, in mask order) and its other tensors whole (``values_under_mask``),
or read in place from a reply (``fedsms.codec.FlatReply``). ``Merge`` streams the
candidates into one running sum (``RunningAverage``, ``FlatSum``), never m models, except
where a rule must see each one (greedy, best-of-m, the robust rules). A streamed mean stays
compact between the rounds of a phase (``Soup``: the values under the mask, made dense only
when a tensor is read); ``state_from_values`` and ``flat_state`` rebuild the full state
dict, zero outside the mask, from merged values.
The local driver, the offline ``fedsms soup`` and the Flower strategy all merge here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from fedsms import FedSMSError
from fedsms.codec import FlatLayout, FlatReply, PayloadError, in_range
from fedsms.masks import Mask, mask_digest
from fedsms.schema import MERGE_RULES

State = dict[str, torch.Tensor]

# How a merge turns its candidates into one state: the configurable soups, and "best"
# (IMP best-of-m: the best candidate on the held-out split, no averaging).
RULES = (*MERGE_RULES, "best")
ROBUST_RULES = ("trimmed-mean", "median", "multi-krum")


class SoupError(FedSMSError):
    """Candidates that cannot be averaged without breaking the sparsity."""


class RunningAverage:
    """Streaming (weighted) mean of same-named tensors.

    Floating tensors are averaged in float32 (float64 for float64 inputs); integer tensors
    such as BatchNorm's ``num_batches_tracked`` cannot be averaged and keep their maximum.
    Every candidate must name the same tensors, of the same shapes, as the first one (in
    any order: tensors are matched by name, the mean keeps the first candidate's order).

    Attributes
    ----------
    total_weight : float
        Sum of the weights added so far.
    count : int
        Number of candidates added so far.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Add one candidate to the running sum (nothing is kept of it but the sum).

        Parameters
        ----------
        tensors : mapping of str to torch.Tensor
            The candidate's tensors (a whole state dict or the values under a mask). The
            sums stay on the device of the first candidate's tensors.
        weight : float, default 1.0
            The candidate's weight in the mean (for example its number of examples); > 0.

        Raises
        ------
        ValueError
            If ``weight`` is not positive.
        SoupError
            If the tensors' names or shapes differ from the first candidate's; nothing is
            added then.
        """
        if not 0 < weight < float("inf"):  # NaN fails too
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        if self._sums:
            self._check_like(tensors)
        for name, value in tensors.items():
            value = value.detach()
            if name not in self._sums:
                self._sums[name] = (
                    value.to(torch.promote_types(value.dtype, torch.float32), copy=True).mul_(weight)
                    if value.is_floating_point()
                    else value.clone()
                )
            elif value.is_floating_point():
                self._sums[name].add_(value.to(self._sums[name].device), alpha=weight)
            else:
                torch.maximum(self._sums[name], value.to(self._sums[name].device), out=self._sums[name])
        self.total_weight += weight
        self.count += 1

    def absorb(self, flat: FlatSum) -> None:
        """Fold a ``FlatSum``'s candidates into this average (same tensors, any order)."""
        if not flat.count:
            return
        for name, total in flat.sums().items():
            if name not in self._sums:
                self._sums[name] = total.clone()
            elif total.is_floating_point():
                self._sums[name].add_(total)
            else:
                torch.maximum(self._sums[name], total, out=self._sums[name])
        self.total_weight += flat.total_weight
        self.count += flat.count

    def _check_like(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if len(tensors) != len(self._sums) or any(name not in self._sums for name in tensors):
            missing = sorted(set(self._sums) - set(tensors))
            extra = sorted(set(tensors) - set(self._sums))
            raise SoupError(
                f"candidate tensors differ (missing {missing}, extra {extra}); average only candidates of the same model"
            )
        for name, value in tensors.items():
            if value.shape != self._sums[name].shape:
                raise SoupError(
                    f"tensor {name!r} has shape {tuple(value.shape)} but earlier candidates had "
                    f"{tuple(self._sums[name].shape)}; average only candidates of the same model"
                )

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean of the candidates added so far.

        Returns
        -------
        dict of str to torch.Tensor
            New tensors, in the first candidate's order: floating tensors in float32 (float64
            for float64 inputs), integer tensors the maximum over the candidates.

        Raises
        ------
        SoupError
            If no candidate was added.
        """
        if not self.count:
            raise SoupError("nothing to average: no candidate was added")
        return {
            name: (total / self.total_weight) if total.is_floating_point() else total.clone()
            for name, total in self._sums.items()
        }


class FlatSum:
    """Streaming (weighted) sum of replies read in place (``codec.FlatReply``): one running
    sum for all masked values and one per run of dense extras, so adding a reply is a few
    whole-block ``add_`` calls (floats, weighted) or ``maximum`` (integers), whatever the
    number of tensors. The reply was fully checked when it was read, so nothing here can
    fail halfway: a rejected reply never reaches the sum.

    Attributes
    ----------
    total_weight : float
        Sum of the weights added so far.
    count : int
        Replies added so far.
    """

    def __init__(self) -> None:
        self.layout = None
        self._values: torch.Tensor | None = None
        self._dense: list[torch.Tensor] = []
        self.total_weight = 0.0
        self.count = 0

    def add(self, reply, weight: float = 1.0) -> None:
        """Add one ``codec.FlatReply`` with ``weight`` (> 0, finite)."""
        if not 0 < weight < float("inf"):
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        if self.layout is None:
            self.layout = reply.layout
            # Widened before the weight is applied (a float16 value times an example count
            # would round, or overflow, in float16), as RunningAverage does.
            self._values = _weighted(reply.values.to(torch.float32, copy=True), weight)
            self._dense = [
                _weighted(run.to(torch.promote_types(run.dtype, torch.float32), copy=True), weight)
                if run.is_floating_point()
                else run.clone()
                for run in reply.dense
            ]
        else:
            if reply.layout is not self.layout:
                raise SoupError("replies of another layout (another reader) cannot join this sum")
            _add(self._values, reply.values, weight)
            for total, run in zip(self._dense, reply.dense):
                if run.is_floating_point():
                    _add(total, run, weight)
                else:
                    torch.maximum(total, run, out=total)
        self.total_weight += weight
        self.count += 1

    @property
    def values_sum(self) -> torch.Tensor:
        """The running weighted sum of every masked value (float32, 1-D; read-only)."""
        return self._values

    def dense_means(self) -> list[torch.Tensor]:
        """Per dense run its weighted mean (floating runs) or maximum (integer runs); new tensors.

        Raises
        ------
        SoupError
            If nothing was added.
        """
        if not self.count:
            raise SoupError("nothing to average: no candidate was added")
        return [
            torch.div(total, self.total_weight) if total.is_floating_point() else total.clone() for total in self._dense
        ]

    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums per tensor (views): masked values 1-D, dense extras in their shape."""
        return {
            **dict(zip(self.layout.masked, self._values.split(self.layout.counts))),
            **self.layout.extras(self._dense),
        }


class Soup(Mapping[str, torch.Tensor]):
    """A merged state held as its values under the mask: what a round's streamed mean is
    between the rounds of a phase, while the mask does not change.

    Sending the soup to the clients reads only its blocks (``fedsms.codec.encode`` writes
    them as they are), and so does checking it (``out_of_range``); evaluation, pruning,
    recalibration and checkpoints read it as the full state dict it stands for, which is
    built (``flat_state``: zero outside the mask, the template's dtypes) the first time a
    tensor is read, then kept. Names, order and ``in`` need no tensor. Read-only, as every
    state the engine holds: it is replaced, never written to. Pickled (or deep-copied) as the
    plain dict of its full state.

    Parameters
    ----------
    layout : fedsms.codec.FlatLayout
        Where each tensor lies in the blocks; its mask and template.
    values : torch.Tensor
        Every masked value, 1-D float32, in mask order.
    dense : list of torch.Tensor
        One 1-D tensor per run of ``layout.runs``: the run's mean (floating) or maximum
        (integer).

    Attributes
    ----------
    layout : fedsms.codec.FlatLayout
        As given.
    values : torch.Tensor
        As given.
    dense : list of torch.Tensor
        As given.
    """

    def __init__(self, layout: FlatLayout, values: torch.Tensor, dense: list[torch.Tensor]) -> None:
        self.layout, self.values, self.dense = layout, values, dense
        self._dtypes = {name: dtype for name, _, dtype in layout.template}
        self._full: State | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.full()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)

    def __contains__(self, name: object) -> bool:
        return name in self._dtypes

    def __reduce__(self):
        return dict, (dict(self.full()),)

    def full(self) -> State:
        """The full state dict (template order and dtypes, zero outside the mask); built once."""
        if self._full is None:
            self._full = flat_state(self.layout, self.values, self.dense)
        return self._full

    def blocks_under(self, mask: Mask) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The blocks as they are, when they hold this state exactly under ``mask`` (the
        soup's own mask; every masked tensor float32 and every dense run in its own dtype,
        so no cast stands between the blocks and the full state); else None.

        Parameters
        ----------
        mask : Mask
            The mask the caller reads under (the engine's: compared by identity, then by
            digest).

        Returns
        -------
        tuple of (torch.Tensor, list of torch.Tensor) or None
            ``values`` and ``dense``, read-only.
        """
        if self.layout.mask is not mask and self.layout.digest != mask_digest(mask):
            return None
        exact = all(self._dtypes[name] == torch.float32 for name in self.layout.masked) and all(
            run.dtype == dtype for run, (_, _, dtype) in zip(self.dense, self.layout.runs)
        )
        return (self.values, self.dense) if exact and self.values.dtype == torch.float32 else None


# A weight of 1 (every uniform merge) is no multiply: torch's add_ with an alpha is a
# slower kernel than without one (0.75 against 0.47 ms for 1.1 M float32 values).
def _weighted(total: torch.Tensor, weight: float) -> torch.Tensor:
    return total if weight == 1.0 else total.mul_(weight)


def _add(total: torch.Tensor, value: torch.Tensor, weight: float) -> None:
    if weight == 1.0:
        total.add_(value)
    else:
        total.add_(value, alpha=weight)


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
    blocks = state.blocks_under(mask) if isinstance(state, Soup) else None
    if blocks is not None:  # the values are already under the mask: views of the blocks, no gather
        parts = {
            **dict(zip(state.layout.masked, blocks[0].split(state.layout.counts))),
            **state.layout.extras(blocks[1]),
        }
        return {name: parts[name] for name in state}
    return {k: (v.detach().cpu()[mask[k].cpu()] if k in mask else v.detach().cpu()) for k, v in state.items()}


class Merge:
    """Candidates of one round flowing into their merge.

    Parameters
    ----------
    rule : str
        ``uniform`` or ``weighted`` (by example counts) average, ``greedy`` soup, ``best``,
        or the robust ``trimmed-mean`` / ``median`` (coordinate-wise, as Flower's
        ``FedTrimmedAvg`` / ``FedMedian``) and ``multi-krum`` (whole updates under the mask,
        as Flower's ``MultiKrum``).
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
    krum_malicious : int, default 1
        ``multi-krum``: the f candidates assumed malicious; each candidate is scored by the
        squared distances of its values to its n − f − 2 nearest others, and the n − f best
        scored are averaged (Blanchard et al., 2017).
    reference : mapping of str to Tensor, optional
        The soup the candidates started from, in the compact form (needed by ``norm_bound``).
    log : callable, optional
        Receives a line per dropped candidate.
    warn : callable, optional
        Receives a line when a setting cannot act in this merge (a trim that cuts nothing,
        a norm bound over fewer than 3 candidates, a weight cap outside ``weighted``);
        default: ``log``.

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
        krum_malicious: int = 1,
        reference: Mapping[str, torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
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
        self.krum_malicious = krum_malicious
        self.max_weight = max_weight if rule == "weighted" else 1.0
        self.log = log or (lambda _: None)
        self.warn = warn or self.log
        if max_weight < 1 and rule != "weighted":
            self.warn(f"max-client-weight {max_weight:g} acts only under merge 'weighted', not {rule!r}")
        self._robust = rule in ROBUST_RULES or self.max_weight < 1 or norm_bound > 0
        self._keep = keep_candidates or self._robust
        self._screened = False
        self._flat = FlatSum()

    @property
    def count(self) -> int:
        """Candidates added so far (less those the norm bound dropped)."""
        return self.average.count + self._flat.count - len(self.dropped)

    def add_reply(self, reply: FlatReply, num_examples: int) -> None:
        """Add one candidate read in place (``fedsms.codec.UpdateReader``): straight into a flat
        running sum when the rule streams; merges that keep candidates take a copy.

        Parameters
        ----------
        reply : fedsms.codec.FlatReply
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

    def flat_state(self, mask_digest: str) -> Soup | None:
        """The merged state straight from the flat running sum, kept compact (a ``Soup``:
        the mean's values under the mask, one division of the sum; dense when first read),
        when every candidate was read in place under the mask of ``mask_digest`` and the rule
        is a plain running mean; else None (``result`` then merges tensor by tensor). Checked
        finite, as ``result`` is.

        Raises
        ------
        SoupError
            If the merge is not finite.
        """
        flat = self._flat
        if self._robust or self.average.count or not flat.count or flat.layout.digest != mask_digest:
            return None
        dense = flat.dense_means()
        # The masked means are finite when the sum is and its largest magnitude over the
        # total weight stays within float32.
        low, high = torch.aminmax(flat.values_sum) if flat.values_sum.numel() else (torch.zeros(()),) * 2
        largest = max(abs(float(low)), abs(float(high)))
        finite = math.isfinite(largest) and largest / flat.total_weight < _FLOAT32_MAX
        if not (finite and all(_finite(run) for run in dense if run.is_floating_point())):
            self.result()  # raises, naming the tensor
            raise SoupError("the merge is not finite; a candidate has absurd values")
        return Soup(flat.layout, torch.div(flat.values_sum, flat.total_weight), dense)

    def _screen(self) -> None:
        """Drop (once) candidates farther from the soup than norm_bound × the median distance."""
        if self._screened or not self.norm_bound or len(self.distances) < 3:
            if not self._screened and self.norm_bound:
                self.warn(
                    f"update-norm-bound is off in a merge of {len(self.distances)} candidates: a median of fewer "
                    "than 3 cannot tell an outlier"
                )
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
        if self.rule == "multi-krum" and self.candidates:
            chosen = krum_choice(self.candidates, self.krum_malicious, self.warn)
            left_out = [i for i in range(len(self.candidates)) if i not in chosen]
            if left_out:
                self.log(f"merge: multi-krum left out candidates {left_out}, the farthest from their neighbours")
            self.candidates = [self.candidates[i] for i in chosen]
            self.examples = [self.examples[i] for i in chosen]
        n = len(self.candidates)
        if not n:
            raise SoupError("nothing to merge: every candidate was dropped")
        if self.rule == "weighted":
            shares = capped_shares([float(e) for e in self.examples], self.max_weight)
        else:
            shares = [1.0 / n] * n
        cut = min(int(self.trim_fraction * n), (n - 1) // 2)  # trimmed-mean: cut at each end, per value
        if self.rule == "trimmed-mean" and not cut:
            self.warn(
                f"trimmed-mean trims nothing from {n} candidates at trim-fraction {self.trim_fraction:g} "
                "(it needs trim-fraction x candidates >= 1 and at least 3 candidates): the merge is their mean"
            )
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
                value = stacked.sort(0).values[cut : n - cut].mean(0)
            else:
                weights = torch.tensor(shares, dtype=torch.float64).view(-1, *[1] * first.dim())
                value = (stacked * weights).sum(0)
            out[name] = value.to(torch.promote_types(first.dtype, torch.float32))
        return out


def krum_choice(candidates: list[State], malicious: int, warn: Callable[[str], None]) -> list[int]:
    """Multi-Krum's choice among candidates (their values under the mask): the n − f whose
    squared distances to their n − f − 2 nearest others sum lowest.

    Parameters
    ----------
    candidates : list of dict of str to Tensor
        The candidates' values under the mask, all of the same tensors.
    malicious : int
        f, the candidates assumed malicious.
    warn : callable
        Receives a line when n ≤ 2f + 2, where Krum's guarantee does not hold (then the
        nearest-neighbour count is clipped to at least 1).

    Returns
    -------
    list of int
        The chosen candidates' indices, ascending.
    """
    n = len(candidates)
    if n <= 2 * malicious + 2:
        warn(
            f"multi-krum with krum-malicious {malicious} needs more than {2 * malicious + 2} candidates for its "
            f"guarantee, this merge has {n}"
        )
    names = [k for k, v in candidates[0].items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([c[k].double().reshape(-1) for k in names]) for c in candidates])
    squared = torch.cdist(flat, flat).square()
    neighbours = max(1, min(n - 1, n - malicious - 2))
    scores = [float(row[torch.arange(n) != i].sort().values[:neighbours].sum()) for i, row in enumerate(squared)]
    keep = max(1, n - malicious)
    return sorted(sorted(range(n), key=lambda i: scores[i])[:keep])


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


def out_of_range(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor of ``state`` that breaks the numeric contract
    (``fedsms.codec.in_range``: NaN, Inf or beyond ±MAX_MAGNITUDE), or None. A ``Soup`` is
    checked on its blocks, one pass each; its tensors are read (made dense) only to name
    the one that fails.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A full state dict or a ``Soup``.

    Returns
    -------
    str or None
        The tensor's name, or None when every floating tensor is in range.
    """
    blocks = state.blocks_under(state.layout.mask) if isinstance(state, Soup) else None
    if blocks is not None and in_range(blocks[0]) and all(in_range(r) for r in blocks[1] if r.is_floating_point()):
        return None
    return next((name for name, value in state.items() if value.is_floating_point() and not in_range(value)), None)


def _distance(values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 distance over the floating tensors, accumulated in float64."""
    total = 0.0
    for name, value in values.items():
        if value.is_floating_point() and name in reference:
            total += float(torch.sum((value.double() - reference[name].double()) ** 2))
    return math.sqrt(total)


def state_from_values(
    entries: Mapping[str, torch.Tensor], mask: Mask, template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A full state dict in ``template`` order (CPU, the template's dtypes) from masked
    values (``entries[name]``: the nnz values of a masked tensor, in mask order) and dense
    entries (``entries[name]`` of the template's shape, e.g. a running average of them).

    Entries the template does not name are ignored. A floating entry for an integer
    template tensor (an averaged ``num_batches_tracked``) is rounded.

    Parameters
    ----------
    entries : mapping of str to torch.Tensor
        For each masked tensor its kept values (any shape with exactly nnz elements, in
        mask order); for every other tensor a tensor of the template's shape.
    mask : Mask
        The mask the values were taken under.
    template : mapping of str to torch.Tensor
        Names, order, shapes and dtypes of the result (e.g. ``model.state_dict()``).

    Returns
    -------
    dict of str to torch.Tensor
        New CPU tensors; masked tensors are exactly zero outside the mask.

    Raises
    ------
    PayloadError
        If an entry is missing, a mask or dense entry has another shape than the template's,
        or a masked tensor has another number of values than its mask keeps.
    """
    return {
        name: _filled(torch.empty(like.shape, dtype=like.dtype), _checked(name, entries, mask, like), mask.get(name))
        for name, like in template.items()
    }


def load_values(entries: Mapping[str, torch.Tensor], mask: Mask, state: Mapping[str, torch.Tensor]) -> None:
    """``state_from_values`` written into the tensors of ``state`` in place: with
    ``model.state_dict()`` the model's own parameters and buffers take the values, no full
    state dict is built and copied (what ``load_state_dict`` would do).

    Parameters
    ----------
    entries : mapping of str to torch.Tensor
        As for ``state_from_values``.
    mask : Mask
        The mask the values were taken under.
    state : mapping of str to torch.Tensor
        The tensors to write (any device), e.g. ``model.state_dict()``.

    Raises
    ------
    PayloadError
        As ``state_from_values``; checked before anything is written.
    """
    values = {name: _checked(name, entries, mask, like) for name, like in state.items()}
    with torch.no_grad():
        for name, like in state.items():
            if like.device.type == "cpu":  # a strided one too: numpy's place writes it back in order
                _filled(like.detach(), values[name], mask.get(name))
            else:
                like.copy_(_filled(torch.empty(like.shape, dtype=like.dtype), values[name], mask.get(name)))


def _checked(name: str, entries: Mapping[str, torch.Tensor], mask: Mask, like: torch.Tensor) -> torch.Tensor:
    """``entries[name]`` on the CPU, checked to fit ``like`` under ``mask`` (see ``state_from_values``)."""
    if name not in entries:
        raise PayloadError(f"tensor {name!r} of the model is missing from the values")
    value = entries[name].detach().to("cpu")
    if name in mask:
        keep = mask[name]
        if tuple(keep.shape) != tuple(like.shape):
            raise PayloadError(
                f"the mask of {name!r} has shape {tuple(keep.shape)} but the model's is {tuple(like.shape)}"
            )
        nnz = int(np.count_nonzero(keep.to("cpu", torch.bool).numpy()))
        if value.numel() != nnz:
            raise PayloadError(f"tensor {name!r} has {value.numel()} values but its mask keeps {nnz}")
    elif tuple(value.shape) != tuple(like.shape):
        raise PayloadError(f"tensor {name!r} has shape {tuple(value.shape)} but the model's is {tuple(like.shape)}")
    return value


def _filled(out: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``out`` (a CPU tensor of the template's shape and dtype) holding a checked
    entry: zero outside ``keep`` and the values under it in mask order, or (no ``keep``) the
    dense entry."""
    if keep is None:
        if value.dtype != out.dtype and not out.is_floating_point() and value.is_floating_point():
            value = value.round()  # e.g. an averaged num_batches_tracked
        return out.copy_(value)
    keep = keep.to("cpu", torch.bool)
    value = value.reshape(-1).to(out.dtype)
    out.zero_()
    if out.dtype in _NUMPY_DTYPES:  # numpy's place: one pass, no prefix sum (2x masked_scatter_)
        np.place(out.numpy(), keep.numpy(), value.numpy())
    else:
        out.masked_scatter_(keep, value)
    return out


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool)


def flat_state(layout: FlatLayout, values: torch.Tensor, dense: list[torch.Tensor], *, divisor: float = 1.0) -> State:
    """A full state dict (``layout``'s template order and dtypes, zero outside the mask)
    from flat blocks, as a ``FlatSum`` holds them.

    Per masked tensor one zeroed tensor and one ``index_copy_`` of its values at the kept
    positions (``layout.positions()``, computed once per mask), per dense tensor one copy.
    New tensors, one allocation each: the allocator reuses the memory of the soup two rounds
    back (one flat buffer would be a fresh mapping, its pages faulted in anew, every round).

    Parameters
    ----------
    layout : fedsms.codec.FlatLayout
        Where each tensor lies in the blocks (and the mask and template they come from).
    values : torch.Tensor
        Every masked value, 1-D, in mask order.
    dense : list of torch.Tensor
        One 1-D tensor per run of ``layout.runs``.
    divisor : float, default 1.0
        Each value is divided by it (e.g. a sum's total weight).

    Returns
    -------
    dict of str to torch.Tensor
        New CPU tensors in template order.
    """
    dtypes = {name: dtype for name, _, dtype in layout.template}
    out: State = {}
    for name, part, at in zip(layout.masked, values.split(layout.counts), layout.positions().split(layout.counts)):
        keep = layout.mask[name]  # a CPU bool tensor (the engine's mask)
        full = torch.zeros(keep.numel(), dtype=dtypes[name])
        part = torch.div(part, divisor) if divisor != 1.0 else part
        out[name] = full.index_copy_(0, at.long(), part.to(dtypes[name])).view(keep.shape)
    out.update({name: part.to(dtypes[name], copy=True) for name, part in layout.extras(dense).items()})
    return {name: out[name] for name, _, _ in layout.template}
