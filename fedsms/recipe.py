"""How the m candidates of a phase differ: the recipe of retraining hyperparameters.

A recipe is a small grid, written ``"seed=0,1,2,3"`` or ``"weight_decay=1e-4,5e-4;lr=0.05,0.1"``
(keys joined by ``;``, values by ``,``), or an explicit list of per-candidate overrides.
Candidate i takes the i-th point of the grid (cycling when the grid is smaller than m), and
always its own seed, so two candidates never see the same batch order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, field, make_dataclass, replace
from typing import Any, Mapping, Sequence

from fedsms import FedSMSError
from fedsms.schema import LR_SCHEDULES, RunKeys, declared, parse_value

__all__ = ["LR_SCHEDULES", "CandidateConfig", "expand_recipe", "for_phase", "parse_grid"]


def _candidate_post_init(self) -> None:
    # Natural ranges only: a candidate is built from checked input, and derived seeds may pass the input cap.
    for f, spec in declared(self):
        value = parse_value("recipe value", f.name, getattr(self, f.name), f.type, spec, caps=False)
        object.__setattr__(self, f.name, value)


def _candidate_to_dict(self) -> dict[str, Any]:
    """Every field and its value."""
    return asdict(self)


def _candidate_from_dict(cls, values: Mapping[str, Any]) -> "CandidateConfig":
    """A candidate from field values (text accepted); unknown keys and bad values refused."""
    return cls(**_coerce(values, caps=False))


# One field per run key declared with ``candidate=`` (fedsms.schema.RunKeys): same type,
# default and range; the field is named by ``candidate`` (``retrain_epochs`` -> ``epochs``).
CandidateConfig = make_dataclass(
    "CandidateConfig",
    [(spec.candidate, f.type, field(default=f.default, metadata={"key": spec, "run_key": f.name}))
     for f, spec in declared(RunKeys) if spec.candidate],
    frozen=True,
    namespace={
        "__doc__": "Everything that defines how one candidate is retrained in one phase.\n\n"
                   "Its fields are the per-candidate keys of the run config (see ``fedsms.schema.RunKeys``).",
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
    """``"seed=0,1;lr=0.1,0.05"`` -> ``{"seed": ["0", "1"], "lr": ["0.1", "0.05"]}``."""
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
    """The m candidate configs. Seeds are ``base.seed + i`` unless the recipe sets them."""
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


def for_phase(config: CandidateConfig, phase: int) -> CandidateConfig:
    """The same candidate in another phase draws another batch order."""
    return replace(config, seed=config.seed + 10_007 * phase)
