"""Soups: averages of candidates that share a mask, so the average keeps the sparsity.

``average`` and ``greedy_soup`` take whole state dicts; their streaming core
(``RunningAverage``, ``FlatSum``) lives with every other merge rule in ``fedsms.merge`` and
is importable from here as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedsms.masks import Mask, outside_mask_nonzeros
from fedsms.merge import FlatSum, RunningAverage, SoupError

__all__ = ["FlatSum", "RunningAverage", "SoupError", "average", "check_shares_mask", "greedy_soup"]


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
