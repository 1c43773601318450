"""Soups: averages of candidates that share a mask, so the average keeps the sparsity.

``RunningAverage`` is the streaming core used both here and by the Flower server: one
running sum per tensor, never m models. It averages whatever tensors it is given: whole
state dicts on one machine, or just the values under the mask on the server.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from fedsms import FedSMSError
from fedsms.masks import Mask, outside_mask_nonzeros
from fedsms.schema import MERGE_RULES


class SoupError(FedSMSError):
    """Candidates that cannot be averaged without breaking the sparsity."""


class RunningAverage:
    """Streaming (weighted) mean of same-named tensors.

    Floating tensors are averaged in float32 (float64 for float64 inputs); integer tensors
    such as BatchNorm's ``num_batches_tracked`` cannot be averaged and keep their maximum.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sums:
            self._check_like(tensors)
        for name, value in tensors.items():
            value = value.detach()
            if name not in self._sums:
                self._sums[name] = (
                    value.to(torch.promote_types(value.dtype, torch.float32), copy=True).mul_(weight)
                    if value.is_floating_point() else value.clone()
                )
            elif value.is_floating_point():
                self._sums[name].add_(value.to(self._sums[name].device), alpha=weight)
            else:
                torch.maximum(self._sums[name], value.to(self._sums[name].device), out=self._sums[name])
        self.total_weight += weight
        self.count += 1

    def _check_like(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if list(tensors) != list(self._sums):
            missing = sorted(set(self._sums) - set(tensors))
            extra = sorted(set(tensors) - set(self._sums))
            raise SoupError(f"candidate tensors differ (missing {missing}, extra {extra}); average only candidates of the same model")
        for name, value in tensors.items():
            if value.shape != self._sums[name].shape:
                raise SoupError(
                    f"tensor {name!r} has shape {tuple(value.shape)} but earlier candidates had "
                    f"{tuple(self._sums[name].shape)}; average only candidates of the same model"
                )

    def mean(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise SoupError("nothing to average: no candidate was added")
        return {
            name: (total / self.total_weight) if total.is_floating_point() else total.clone()
            for name, total in self._sums.items()
        }


def check_shares_mask(state: Mapping[str, torch.Tensor], mask: Mask, label: str = "candidate") -> None:
    """Refuse a candidate with nonzeros outside ``mask``: averaging it would break sparsity."""
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
    """(Weighted) average of candidate state dicts that share ``mask``."""
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
    only if the soup's score does not drop. Returns (soup, chosen indices, candidate scores)."""
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
