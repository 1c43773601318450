"""How the m candidates of a phase differ: the recipe of retraining hyperparameters.

A recipe is a small grid, written ``"seed=0,1,2,3"`` or ``"weight_decay=1e-4,5e-4;lr=0.05,0.1"``
(keys joined by ``;``, values by ``,``), or an explicit list of per-candidate overrides.
Candidate i takes the i-th point of the grid (cycling when the grid is smaller than m), and
always its own seed, so two candidates never see the same batch order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, field, make_dataclass, replace
from typing import Any

from fedsms import FedSMSError
from fedsms.schema import LR_SCHEDULES, RunKeys, declared, parse_value

__all__ = ["LR_SCHEDULES", "CandidateConfig", "expand_recipe", "parse_grid"]


def _candidate_post_init(self) -> None:
    # Natural ranges only: a candidate is built from checked input, and derived seeds may pass the input cap.
    for f, spec in declared(self):
        value = parse_value("recipe value", f.name, getattr(self, f.name), f.type, spec, caps=False)
        object.__setattr__(self, f.name, value)


def _candidate_to_dict(self) -> dict[str, Any]:
    """Every field and its value.

    Returns
    -------
    dict
        Field name to value, in declaration order (JSON-serialisable).
    """
    return asdict(self)


def _candidate_from_dict(cls, values: Mapping[str, Any]) -> CandidateConfig:
    """A candidate from field values (text accepted); unknown keys and bad values refused.

    Parameters
    ----------
    values : mapping of str to Any
        Field names (``-`` or ``_`` spelling) to values; fields left out take their defaults.

    Returns
    -------
    CandidateConfig
        The checked candidate.

    Raises
    ------
    FedSMSError
        If a key is not a field or a value is of the wrong type or out of range.
    """
    return cls(**_coerce(values, caps=False))


# One field per run key declared with ``candidate=`` (fedsms.schema.RunKeys): same type,
# default and range; the field is named by ``candidate`` (``retrain_epochs`` -> ``epochs``).
CandidateConfig = make_dataclass(
    "CandidateConfig",
    [
        (spec.candidate, f.type, field(default=f.default, metadata={"key": spec, "run_key": f.name}))
        for f, spec in declared(RunKeys)
        if spec.candidate
    ],
    frozen=True,
    namespace={
        "__doc__": "Everything that defines how one candidate is retrained in one phase.\n\n"
        "Its fields are the per-candidate keys of the run config (see ``fedsms.schema.RunKeys``).\n"
        "Values are typed and checked against the keys' natural ranges on creation (text\n"
        "accepted); the input caps are not applied, since derived seeds may pass them.\n\n"
        "Parameters\n"
        "----------\n"
        "epochs, lr, momentum, weight_decay, batch_size, label_smoothing, lr_schedule, "
        "warmup_fraction, augment, seed\n"
        "    One keyword per field; each has the type, default, range and help of the run\n"
        "    key that declares it with ``candidate=`` (``epochs`` is ``retrain_epochs``).\n\n"
        "Raises\n"
        "------\n"
        "FedSMSError\n"
        "    If a value is of the wrong type or out of range.\n",
        "__post_init__": _candidate_post_init,
        "to_dict": _candidate_to_dict,
        "from_dict": classmethod(_candidate_from_dict),
    },
)
CandidateConfig.__module__ = __name__
for _method, _name in ((_candidate_to_dict, "to_dict"), (_candidate_from_dict, "from_dict")):
    _method.__name__, _method.__qualname__ = _name, f"CandidateConfig.{_name}"

_SPECS = {f.name: (f.type, spec) for f, spec in declared(CandidateConfig)}


def _coerce(values: Mapping[str, Any], caps: bool = True) -> dict[str, Any]:
    """Recipe values typed and checked; the error names the recipe key."""
    out = {}
    for raw_key, value in values.items():
        name = raw_key.replace("-", "_")
        if name not in _SPECS:
            raise FedSMSError(f"unknown recipe key {raw_key!r}; use one of {', '.join(_SPECS)}")
        kind, spec = _SPECS[name]
        out[name] = parse_value("recipe value", name, value, kind, spec, caps)
    return out


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"seed=0,1;lr=0.1,0.05"`` -> ``{"seed": ["0", "1"], "lr": ["0.1", "0.05"]}``.

    Every value is checked (type and range of its candidate field, with the input caps)
    before the grid is returned.

    Parameters
    ----------
    text : str
        Parts ``KEY=V1,V2,...`` joined by ``;``; empty parts are skipped, so ``""`` is the
        empty grid.

    Returns
    -------
    dict of str to list of str
        Each key (as written) to its values as text, in the order written.

    Raises
    ------
    FedSMSError
        If a part is not ``KEY=V1,...``, a key is not a candidate field or a value is bad.
    """
    grid: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values.strip():
            raise FedSMSError(f"recipe part {part!r} is not KEY=V1,V2,...; write e.g. 'weight_decay=1e-4,5e-4'")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    for key, values in grid.items():  # every value checked now, before any work
        for value in values:
            _coerce({key: value})
    return grid


def expand_recipe(
    recipe: str | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    m: int,
    base: CandidateConfig,
) -> list[CandidateConfig]:
    """The m candidate configs. Seeds are ``base.seed + i`` unless the recipe sets them.

    Candidate i takes point ``i % count`` of the grid (in ``itertools.product`` order, the
    last key varying fastest) or of the explicit list, on top of ``base``.

    Parameters
    ----------
    recipe : str, mapping of str to sequence, or sequence of mapping
        A grid as text (see :func:`parse_grid`), a grid as a mapping of key to values, or an
        explicit list of per-candidate overrides. An empty recipe varies only the seeds.
    m : int
        Number of candidates, >= 1.
    base : CandidateConfig
        The values every candidate starts from.

    Returns
    -------
    list of CandidateConfig
        ``m`` configs.

    Raises
    ------
    FedSMSError
        If ``m`` < 1, or the recipe has an unknown key or a bad value.
    """
    if m < 1:
        raise FedSMSError(f"the number of candidates m must be at least 1, got {m}")
    if isinstance(recipe, str):
        recipe = parse_grid(recipe)
    if isinstance(recipe, Mapping):
        grid = {k: list(v) for k, v in recipe.items()}
        count = math.prod(len(v) for v in grid.values()) if grid else 0  # never listed: it may be huge

        def point(i: int) -> dict[str, Any]:
            return _grid_point(grid, i)
    else:
        points = [dict(p) for p in recipe]
        count, point = len(points), points.__getitem__
    configs = []
    for i in range(m):
        overrides = {"seed": base.seed + i, **_coerce(point(i % count) if count else {})}
        configs.append(replace(base, **overrides))
    return configs


def _grid_point(grid: Mapping[str, Sequence[Any]], index: int) -> dict[str, Any]:
    """The ``index``-th point of the grid in ``itertools.product`` order (last key fastest)."""
    point = {}
    for key in reversed(list(grid)):
        index, j = divmod(index, len(grid[key]))
        point[key] = grid[key][j]
    return {key: point[key] for key in grid}


def __getattr__(name: str):
    # ``for_phase`` moved to fedsms.schedule, beside every other seed rule.
    if name == "for_phase":
        from fedsms.schedule import for_phase

        return for_phase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
