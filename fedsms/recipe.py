"""How the m candidates of a phase differ: the recipe of retraining hyperparameters.

A recipe is a small grid, written ``"seed=0,1,2,3"`` or ``"weight_decay=1e-4,5e-4;lr=0.05,0.1"``
(keys joined by ``;``, values by ``,``), or an explicit list of per-candidate overrides.
Candidate i takes the i-th point of the grid (cycling when the grid is smaller than m), and
always its own seed, so two candidates never see the same batch order.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from fedsms import FedSMSError

LR_SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class CandidateConfig:
    """Everything that defines how one candidate is retrained in one phase."""

    seed: int = 0
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    epochs: int = 5
    augment: bool = True
    batch_size: int = 64
    momentum: float = 0.9
    lr_schedule: str = "linear"  # linear warm-up then linear decay to zero
    warmup_fraction: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "momentum": 0 <= self.momentum < 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise FedSMSError(f"recipe value {key}={getattr(self, key)!r} is out of range; fix it in the recipe or config")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FedSMSError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CandidateConfig":
        return cls(**_coerce(values))


_FIELD_TYPES = {f.name: f.type for f in fields(CandidateConfig)}
_CASTS = {"int": int, "float": float, "bool": lambda v: _to_bool(v), "str": str}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            raise FedSMSError(f"unknown recipe key {key!r}; use one of {', '.join(_FIELD_TYPES)}")
        try:
            out[key] = _CASTS[_FIELD_TYPES[key]](value)
        except (TypeError, ValueError):
            raise FedSMSError(f"recipe value {key}={value!r} is not a valid {_FIELD_TYPES[key]}") from None
    return out


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"seed=0,1;lr=0.1,0.05"`` -> ``{"seed": ["0", "1"], "lr": ["0.1", "0.05"]}``."""
    grid: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values.strip():
            raise FedSMSError(f"recipe part {part!r} is not KEY=V1,V2,...; write e.g. 'weight_decay=1e-4,5e-4'")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    _coerce({k: v[0] for k, v in grid.items()})  # validate keys and value types early
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
        keys = list(recipe)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(recipe[k] for k in keys))] or [{}]
    else:
        points = [dict(p) for p in recipe] or [{}]
    configs = []
    for i in range(m):
        overrides = {"seed": base.seed + i, **points[i % len(points)]}
        configs.append(replace(base, **_coerce(overrides)))
    return configs


def for_phase(config: CandidateConfig, phase: int) -> CandidateConfig:
    """The same candidate in another phase draws another batch order."""
    return replace(config, seed=config.seed + 10_007 * phase)
