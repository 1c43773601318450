"""Soup diagnostics: why a soup of one phase helped or did not.

For the m candidates of one phase (all retrained from the same start under the same mask)
and the soup made of them, :func:`soup_diagnostics` reports in one JSON-able dict:

Every score below is the task's score (``fedsms.task``; accuracy for classification, R² for
regression), under the keys ``heldout_<score>`` and ``test_<score>``:

- each candidate's held-out and test score, their mean, and the best candidate (chosen
  on the held-out score, reported on the test score, as a user without test labels would);
- the soup's score and its **gain**: soup test score − best candidate's, in points (× 100);
- the prediction **ensemble** of the candidates (classification: mean of softmax
  probabilities): what averaging predictions instead of weights would give, a reference;
- the score and loss along two straight lines, candidate 0 → candidate 1 and candidate 0 →
  soup, at ``points`` evenly spaced points including the ends. Norm statistics are
  re-estimated at every point of a line, the ends included, all on the same data subset
  (averaged weights with interpolated statistics would show a barrier that is only a
  calibration artefact, and ends with their own training statistics would not compare
  like with like). The **barrier** of a line is
  the largest drop of the test score below the straight line between its two end
  scores, in points (clipped at 0); the **loss barrier** is the largest rise of test
  loss above the straight line between its end losses. A barrier near 0 between
  candidates means they sit in one linearly connected basin, where weight averaging
  works; a large one means their average falls off the ridge;
- the **spread** of the candidates: mean pairwise L2 distance of their retraining updates
  (candidate − start) divided by the mean update norm. 0: identical candidates; about
  √2 ≈ 1.41 for updates of equal norm in orthogonal directions; near 2: updates that
  cancel.

Nothing here imports Flower; the local driver and the server strategy both call it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.data.arrays import DataSource
from fedsms.evaluate import ensemble_metrics, evaluate
from fedsms.norms import norm_layers, recalibrate_norms
from fedsms.task import CLASSIFICATION, Task

State = Mapping[str, torch.Tensor]
Recalibrate = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def norm_recalibrator(
    model: nn.Module,
    data: DataSource,
    *,
    fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Recalibrate:
    """A ``recalibrate`` argument for :func:`soup_diagnostics`: the state with its
    BatchNorm statistics re-estimated on a seeded ``fraction`` of ``data``
    (:func:`fedsms.norms.recalibrate_norms`).

    Parameters
    ----------
    model : torch.nn.Module
        A model of the candidates' architecture, used as scratch space (its weights are
        overwritten).
    data : DataSource
        Training data to forward (never the test set).
    fraction : float, default 0.2
        Fraction of ``data``'s examples forwarded per recalibration.
    seed : int, default 0
        Seed of the subset; every call forwards the same examples.
    device : torch.device or str, default "cpu"
        Where the forward passes run.

    Returns
    -------
    callable
        ``recalibrate(state) -> state``: a new CPU state dict.
    """

    def recalibrate(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model.load_state_dict(state)
        recalibrate_norms(model, data, fraction=fraction, device=device, seed=seed)
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    return recalibrate


def interpolate(a: State, b: State, t: float) -> dict[str, torch.Tensor]:
    """The point ``(1 − t)·a + t·b`` of the straight line from ``a`` to ``b``.

    Floating tensors are interpolated (in float64, returned in ``a``'s dtype); integer
    tensors (BatchNorm's ``num_batches_tracked``) are ``a``'s.

    Parameters
    ----------
    a, b : mapping of str to Tensor
        State dicts of the same model.
    t : float
        Position on the line: 0 is ``a``, 1 is ``b``.

    Returns
    -------
    dict of str to Tensor
        New tensors on ``a``'s devices.
    """
    out = {}
    for name, value in a.items():
        if value.is_floating_point():
            mixed = (1 - t) * value.double() + t * b[name].to(value.device).double()
            out[name] = mixed.to(value.dtype)
        else:
            out[name] = value.clone()
    return out


def update_spread(start: State, candidates: Sequence[State], names: Sequence[str]) -> dict[str, float]:
    """Mean pairwise distance of the candidates' updates over their mean update norm.

    The update of candidate i is ``u_i = candidate_i − start`` over the tensors ``names``
    (accumulated in float64).

    Parameters
    ----------
    start : mapping of str to Tensor
        The state every candidate retrained from.
    candidates : sequence of mapping of str to Tensor
        At least two candidates.
    names : sequence of str
        The tensors that count.

    Returns
    -------
    dict of str to float
        ``spread`` (mean ‖u_i − u_j‖ over pairs i < j divided by mean ‖u_i‖; 0 when every
        update is 0), ``mean_distance`` and ``mean_update_norm``.
    """
    updates = [torch.cat([(c[n].double() - start[n].double()).flatten() for n in names]) for c in candidates]
    norms = [float(u.norm()) for u in updates]
    pairs = [float((a - b).norm()) for a, b in itertools.combinations(updates, 2)]
    mean_norm, mean_distance = sum(norms) / len(norms), sum(pairs) / len(pairs)
    return {
        "spread": mean_distance / mean_norm if mean_norm > 0 else 0.0,
        "mean_distance": mean_distance,
        "mean_update_norm": mean_norm,
    }


def soup_diagnostics(
    model: nn.Module,
    start: State,
    candidates: Sequence[State],
    soup: State,
    *,
    heldout: DataSource,
    test: DataSource,
    recalibrate: Recalibrate | bool | None = None,
    points: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    task: Task = CLASSIFICATION,
) -> dict:
    """Diagnostics of one phase's soup: candidates, soup, ensemble, barriers, spread.

    See the module docstring for what each number means. Scores are the task's (accuracy:
    a fraction in [0, 1]); ``gain`` and the barriers are in points of the score (× 100),
    signed so that a positive gain is better for a score that is minimised too.

    The spread counts the model's parameters (``model.named_parameters()``: masked weights,
    biases, norm-layer scales and shifts), not its buffers (BatchNorm running statistics).
    Pruned entries are zero in the start and in every candidate, so they add nothing: the
    spread is over the parameters under the mask.

    Cost (no training): the candidates are evaluated once each on ``heldout`` and
    ``test`` as given, the soup once on each, the ensemble makes m more passes over
    ``test``; the two lines share candidate 0's end and evaluate 2·points − 1 further
    points on both splits, each after one recalibration (with norm layers; without them
    the line ends reuse the scores above and 2·(points − 2) points remain). In all, at most
    m + 2·points passes over ``heldout``, 2m + 2·points over ``test`` and 2·points − 1
    recalibrations (each a forward pass over its fraction of the training data). Memory:
    the candidates as given plus one interpolated state at a time; ``model`` is the only
    model instance.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the candidates' architecture, used as scratch space: its weights are
        overwritten.
    start : mapping of str to Tensor
        The state the candidates retrained from (the phase's pruned start).
    candidates : sequence of mapping of str to Tensor
        The phase's retrained candidates, full state dicts, at least two; candidate 0 and
        candidate 1 span the candidate line.
    soup : mapping of str to Tensor
        The phase's soup, as the method made it (its norm statistics already recalibrated).
    heldout : DataSource
        Held-out data: chooses the best candidate.
    test : DataSource
        Test data: every reported accuracy besides the held-out ones.
    recalibrate : callable or bool, optional
        ``recalibrate(state) -> state`` re-estimates the norm statistics of a point of a
        line (see :func:`norm_recalibrator`); it should be deterministic (a fixed subset). Required when ``model`` has BatchNorm layers
        with running statistics; ``False`` interpolates the statistics with the weights
        instead (barriers then include the statistics' mismatch). Ignored without norm layers.
    points : int, default 5
        Points per line, the two ends included; at least 3.
    device : torch.device or str, default "cpu"
        Where evaluation runs.
    batch_size : int, default 512
        Evaluation batch size.
    task : Task, default CLASSIFICATION
        What is scored (``task.score``) and how the ensemble combines outputs.

    Returns
    -------
    dict
        Plain JSON-able values, with ``S`` the task's score (``accuracy`` for
        classification): ``score`` (its name), ``candidates`` (list of ``{"heldout_S",
        "test_S", "test_loss"}``), ``mean_candidate`` and ``best_candidate`` (test score;
        ``best_index`` is the held-out choice), ``soup`` (``heldout_S``, ``test_S``,
        ``test_loss``), ``gain`` (points), ``ensemble`` (the task's test metrics),
        ``lines`` with ``candidates`` (0 → 1) and ``soup`` (0 → soup), each ``{"t",
        "heldout_S", "heldout_loss", "test_S", "test_loss", "barrier", "loss_barrier"}``,
        ``spread``, ``mean_distance``, ``mean_update_norm`` and ``points``.

    Raises
    ------
    FedSMSError
        Fewer than two candidates, fewer than 3 points, a candidate, the start or the soup
        naming other tensors or shapes than ``model``, or a model with norm layers and no
        ``recalibrate``.
    """
    _check(model, start, candidates, soup, points, recalibrate)
    if recalibrate is False or not norm_layers(model):
        recalibrate = None
    model.to(device)

    held_key, test_key = f"heldout_{task.score}", f"test_{task.score}"

    def scores(state: State) -> dict[str, float]:
        model.load_state_dict(state)
        held = evaluate(model, heldout, batch_size, device, task=task)
        tested = evaluate(model, test, batch_size, device, task=task)
        return {
            held_key: held[task.score],
            "heldout_loss": held["loss"],
            test_key: tested[task.score],
            "test_loss": tested["loss"],
        }

    own = [scores(c) for c in candidates]
    soup_scores = scores(soup)
    best = max(range(len(own)), key=lambda i: task.better(own[i][held_key]))
    ensemble = ensemble_metrics(_Loaded(model, candidates), test, batch_size, device, task=task)

    def point(state: State) -> dict[str, float]:
        return scores(recalibrate(dict(state)) if recalibrate else state)

    ts = [i / (points - 1) for i in range(points)]
    # Every point of a line, ends included, gets statistics re-estimated the same way, so a
    # line compares like with like (a candidate's own running statistics are an EMA of its
    # last training batches; the soup's were usually recalibrated already).
    first = point(candidates[0]) if recalibrate else own[0]

    def line(b: State, b_scores: dict[str, float]) -> dict:
        rows = [first, *(point(interpolate(candidates[0], b, t)) for t in ts[1:-1])]
        rows.append(point(b) if recalibrate else b_scores)
        out: dict = {"t": ts, **{k: [r[k] for r in rows] for k in rows[0]}}
        score = [task.better(v) for v in out[test_key]]
        loss = out["test_loss"]
        out["barrier"] = 100 * max(
            0.0, *((1 - t) * score[0] + t * score[-1] - a for t, a in zip(ts[1:-1], score[1:-1]))
        )
        out["loss_barrier"] = max(0.0, *(v - (1 - t) * loss[0] - t * loss[-1] for t, v in zip(ts[1:-1], loss[1:-1])))
        return out

    spread = update_spread(start, candidates, [name for name, _ in model.named_parameters()])
    kept = (held_key, test_key, "test_loss")
    return {
        "score": task.score,
        "candidates": [{k: s[k] for k in kept} for s in own],
        "mean_candidate": sum(s[test_key] for s in own) / len(own),
        "best_index": best,
        "best_candidate": own[best][test_key],
        "soup": {k: soup_scores[k] for k in kept},
        "gain": 100 * task.better(soup_scores[test_key] - own[best][test_key]),
        "ensemble": {k: float(v) for k, v in ensemble.items()},
        "lines": {"candidates": line(candidates[1], own[1]), "soup": line(soup, soup_scores)},
        **spread,
        "points": points,
    }


def describe(diagnostics: Mapping, label: str) -> str:
    """One console line of a phase's diagnostics.

    Parameters
    ----------
    diagnostics : mapping
        What :func:`soup_diagnostics` returned.
    label : str
        What the line is about, e.g. ``"[sms] phase 2"``.

    Returns
    -------
    str
        E.g. ``[sms] phase 2 diagnostics: soup 94.1 %, best candidate 93.6 %, gain +0.5,
        ensemble 94.5 %, barrier 0.1 (cand-cand 1.2), spread 0.83``; the first barrier is
        candidate 0 → soup, the one in brackets candidate 0 → candidate 1.
    """
    d = diagnostics
    score = d.get("score", "accuracy")

    def shown(value: float) -> str:
        return f"{100 * value:.1f} %" if score == "accuracy" else f"{score} {value:.3f}"

    return (
        f"{label} diagnostics: soup {shown(d['soup'][f'test_{score}'])}, "
        f"best candidate {shown(d['best_candidate'])}, gain {d['gain']:+.1f}, "
        f"ensemble {shown(d['ensemble'][score])}, barrier {d['lines']['soup']['barrier']:.1f} "
        f"(cand-cand {d['lines']['candidates']['barrier']:.1f}), spread {d['spread']:.2f}"
    )


class _Loaded(Sequence):
    """The candidates as ensemble members, loaded one at a time into one scratch model."""

    def __init__(self, model: nn.Module, states: Sequence[State]) -> None:
        self.model, self.states = model, states

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i):  # only to be a Sequence; iteration is what the ensemble uses
        self.model.load_state_dict(self.states[i])
        return self.model

    def __iter__(self) -> Iterator[nn.Module]:
        for state in self.states:
            self.model.load_state_dict(state)
            yield self.model


def _check(
    model: nn.Module,
    start: State,
    candidates: Sequence[State],
    soup: State,
    points: int,
    recalibrate: Recalibrate | bool | None,
) -> None:
    if len(candidates) < 2:
        raise FedSMSError(
            f"soup diagnostics need at least 2 candidates (got {len(candidates)}); pass every candidate of the phase"
        )
    if isinstance(points, bool) or not isinstance(points, int) or points < 3:
        raise FedSMSError(f"points must be an int of at least 3 (the two ends and one interior point), got {points!r}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for label, state in [("start", start), ("soup", soup), *((f"candidate {i}", c) for i, c in enumerate(candidates))]:
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise FedSMSError(
                f"the {label} names other tensors than the model (missing {missing[:3]}, extra {extra[:3]}); "
                "pass full state dicts of the same architecture"
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise FedSMSError(
                    f"the {label}'s {name!r} has shape {tuple(state[name].shape)}, the model's {shape}; "
                    "pass full state dicts of the same architecture"
                )
    if recalibrate is None and norm_layers(model):
        raise FedSMSError(
            "the model has BatchNorm layers: pass recalibrate=norm_recalibrator(model, train_data) to re-estimate "
            "their statistics at interpolated points, or recalibrate=False to interpolate them too"
        )
    if recalibrate is True:
        raise FedSMSError("recalibrate takes a callable (e.g. norm_recalibrator(model, train_data)) or False")
