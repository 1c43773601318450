"""Soups: averages of candidates that share a mask, so the average keeps the sparsity.

``RunningAverage`` is the streaming core used both here and by the Flower server: one
running sum per tensor, never m models. It averages whatever tensors it is given: whole
state dicts on one machine, or just the values under the mask on the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedsms import FedSMSError
from fedsms.masks import Mask, outside_mask_nonzeros


class SoupError(FedSMSError):
    """Candidates that cannot be averaged without breaking the sparsity."""


class RunningAverage:
    """Streaming (weighted) mean of same-named tensors.

    Floating tensors are averaged in float32 (float64 for float64 inputs); integer tensors
    such as BatchNorm's ``num_batches_tracked`` cannot be averaged and keep their maximum.
    Every candidate must name the same tensors, in the same order and of the same shapes,
    as the first one.

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
            If the tensors' names, order or shapes differ from the first candidate's;
            nothing is added then.
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
        if list(tensors) != list(self._sums):
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
            self._values = torch.mul(reply.values, weight).to(torch.float32)
            self._dense = [
                torch.mul(run, weight).to(torch.promote_types(run.dtype, torch.float32))
                if run.is_floating_point()
                else run.clone()
                for run in reply.dense
            ]
        else:
            if reply.layout is not self.layout:
                raise SoupError("replies of another layout (another reader) cannot join this sum")
            self._values.add_(reply.values, alpha=weight)
            for total, run in zip(self._dense, reply.dense):
                if run.is_floating_point():
                    total.add_(run, alpha=weight)
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
        out = dict(zip(self.layout.masked, self._values.split(self.layout.counts)))
        for (names, shapes, _), total in zip(self.layout.runs, self._dense):
            for name, shape, part in zip(names, shapes, total.split([math.prod(s) for s in shapes])):
                out[name] = part.view(shape)
        return out


def check_shares_mask(state: Mapping[str, torch.Tensor], mask: Mask, label: str = "candidate") -> None:
    """Refuse a candidate with nonzeros outside ``mask``: averaging it would break sparsity.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The candidate's state dict.
    mask : Mask
        The mask all candidates of the soup share.
    label : str, default "candidate"
        How the candidate is named in the error message.

    Raises
    ------
    SoupError
        If ``state`` lacks a masked tensor or has a nonzero entry the mask prunes.
    """
    missing = [name for name in mask if name not in state]
    if missing:
        raise SoupError(f"{label} lacks the masked tensors {missing[:3]}; average only candidates of the same model")
    bad = outside_mask_nonzeros(state, mask)
    if bad:
        name, count = next(iter(bad.items()))
        raise SoupError(
            f"{label} has {count} nonzero weights outside the shared mask in {name!r} "
            f"({sum(bad.values())} in all); retrain it under the same mask before averaging"
        )


def average(
    states: Sequence[Mapping[str, torch.Tensor]],
    mask: Mask,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """(Weighted) average of candidate state dicts that share ``mask``.

    Parameters
    ----------
    states : sequence of mapping of str to torch.Tensor
        The candidates' state dicts, all of the same model.
    mask : Mask
        The mask every candidate must respect (checked with ``check_shares_mask``).
    weights : sequence of float, optional
        One positive weight per candidate (for example example counts); None: uniform.

    Returns
    -------
    dict of str to torch.Tensor
        The soup, as ``RunningAverage.mean`` returns it; it respects ``mask``.

    Raises
    ------
    SoupError
        If a candidate breaks the mask, the candidates differ in tensors or shapes, or
        ``states`` is empty.
    ValueError
        If a weight is not positive.
    """
    soup = RunningAverage()
    for i, state in enumerate(states):
        check_shares_mask(state, mask, f"candidate {i}")
        soup.add(state, 1.0 if weights is None else float(weights[i]))
    return soup.mean()


def greedy_soup(
    states: Sequence[Mapping[str, torch.Tensor]],
    mask: Mask,
    score: Callable[[Mapping[str, torch.Tensor]], float],
) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """Greedy soup: rank candidates by ``score`` (held-out accuracy), then add each in turn
    only if the soup's score does not drop. Returns (soup, chosen indices, candidate scores).

    ``score`` is called once per candidate and once per trial soup (m + m - 1 calls for m
    candidates); each trial is a uniform average of the chosen candidates.

    Parameters
    ----------
    states : sequence of mapping of str to torch.Tensor
        The candidates' state dicts (at least one), all respecting ``mask``.
    mask : Mask
        The mask every candidate shares.
    score : callable
        ``score(state) -> float``, higher is better; never the test set.

    Returns
    -------
    tuple of (dict of str to torch.Tensor, list of int, list of float)
        The soup, the indices of the candidates in it (best first, in the order they were
        added) and each candidate's own score, in the order of ``states``.

    Raises
    ------
    SoupError
        If a candidate breaks the mask or the candidates differ in tensors or shapes.
    IndexError
        If ``states`` is empty.
    """
    for i, state in enumerate(states):
        check_shares_mask(state, mask, f"candidate {i}")
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen = [order[0]]
    soup, best = average([states[order[0]]], mask), scores[order[0]]
    for i in order[1:]:
        trial = average([states[j] for j in chosen + [i]], mask)
        trial_score = score(trial)
        if trial_score >= best:
            chosen.append(i)
            soup, best = trial, trial_score
    return soup, chosen, scores
