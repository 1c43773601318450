"""The run configuration shared by ``fedsms local``, ``fedsms simulate`` and the Flower apps.

Keys may be written with ``-`` (Flower's run-config style) or ``_``. Every value is
checked for type and range, and a bad one is named in a one-sentence error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from fedsms import FedSMSError
from fedsms.masks import PRUNING_METHODS
from fedsms.recipe import LR_SCHEDULES, CandidateConfig, expand_recipe, parse_grid
from fedsms.soup import MERGE_RULES

METHODS = ("imp", "imp-best", "imp-avg", "sms", "sms-greedy", "gmp", "gmp-soup")


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "digits"
    data_dir: str = ""
    model: str = "cnn"
    target_sparsity: float = 0.9
    phases: int = 3
    candidates: int = 4  # m: candidates retrained per phase
    gmp_updates: int = 0  # GMP mask updates sharing the IMP epoch budget; 0: one per phase
    gmp_initial_sparsity: float = 0.0  # s_i: where GMP's cubic schedule starts (the dense model's step)
    pruning: str = "global"
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    pretrain_epochs: int = 10
    pretrain_lr: float = 0.05
    retrain_epochs: int = 5
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 64
    label_smoothing: float = 0.0
    lr_schedule: str = "linear"
    warmup_fraction: float = 0.1
    augment: bool = True
    recipe: str = ""  # e.g. "weight_decay=1e-4,5e-4"; empty: candidates differ by seed only
    merge: str = "uniform"
    recalibration_fraction: float = 0.2
    heldout_fraction: float = 0.1
    methods: str = "imp,imp-best,imp-avg,sms"
    ood: bool = True
    ood_examples: int = 1000
    seed: int = 0
    device: str = "auto"
    workers: int = 1
    out_dir: str = "runs/local"
    init_checkpoint: str = ""

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "RunConfig | None" = None) -> "RunConfig":
        """A config from ``values`` (unknown keys refused) on top of ``base`` or the defaults."""
        types = {f.name: f.type for f in fields(cls)}
        updates = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in types:
                raise FedSMSError(f"unknown config key {raw_key!r}; known keys: {', '.join(k.replace('_', '-') for k in types)}")
            updates[key] = _cast(raw_key, value, types[key])
        return replace(base or cls(), **updates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def base_candidate(self) -> CandidateConfig:
        return CandidateConfig(
            seed=self.seed, lr=self.lr, weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
            epochs=self.retrain_epochs, augment=self.augment, batch_size=self.batch_size,
            lr_schedule=self.lr_schedule, warmup_fraction=self.warmup_fraction,
        )

    def pretrain_candidate(self) -> CandidateConfig:
        return replace(self.base_candidate(), lr=self.pretrain_lr, epochs=self.pretrain_epochs)

    def candidate_configs(self) -> list[CandidateConfig]:
        return expand_recipe(self.recipe, self.candidates, self.base_candidate())


def _cast(key: str, value: Any, kind: str) -> Any:
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text in ("true", "1", "yes")
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        article = "an" if kind == "int" else "a"
        raise FedSMSError(f"config key {key!r} must be {article} {kind}, got {value!r}") from None


def _check(config: RunConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise FedSMSError(f"config key {key.replace('_', '-')!r} {what}, got {getattr(config, key)!r}")

    need(0.0 <= config.target_sparsity < 1.0, "target_sparsity", "must be in [0, 1)")
    need(config.phases >= 1, "phases", "must be at least 1")
    need(config.candidates >= 1, "candidates", "must be at least 1")
    need(0 <= config.gmp_updates <= config.phases * config.retrain_epochs, "gmp_updates",
         "must be in [0, phases × retrain-epochs] (each update trains at least one epoch)")
    need(0.0 <= config.gmp_initial_sparsity <= config.target_sparsity, "gmp_initial_sparsity",
         "must be in [0, target-sparsity]")
    need(config.pruning in PRUNING_METHODS, "pruning", f"must be one of {', '.join(PRUNING_METHODS)}")
    need(config.pretrain_epochs >= 0, "pretrain_epochs", "must be at least 0")
    need(config.retrain_epochs >= 1, "retrain_epochs", "must be at least 1")
    need(config.lr > 0, "lr", "must be positive")
    need(config.pretrain_lr > 0, "pretrain_lr", "must be positive")
    need(config.weight_decay >= 0, "weight_decay", "must be at least 0")
    need(config.batch_size >= 1, "batch_size", "must be at least 1")
    need(0.0 <= config.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
    need(config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
    need(0.0 <= config.warmup_fraction < 1.0, "warmup_fraction", "must be in [0, 1)")
    need(config.merge in MERGE_RULES, "merge", f"must be one of {', '.join(MERGE_RULES)}")
    need(0.0 < config.recalibration_fraction <= 1.0, "recalibration_fraction", "must be in (0, 1]")
    need(0.0 < config.heldout_fraction < 1.0, "heldout_fraction", "must be in (0, 1)")
    need(config.ood_examples >= 1, "ood_examples", "must be at least 1")
    need(config.workers >= 1, "workers", "must be at least 1")
    unknown = [m for m in config.method_list() if m not in METHODS]
    need(not unknown and bool(config.method_list()), "methods", f"must list some of {', '.join(METHODS)}")
    if config.recipe:
        parse_grid(config.recipe)


FEDERATED_MODES = ("hyperparameter", "data")
PARTITIONINGS = ("iid", "dirichlet", "shards")
VALUE_DTYPES = ("fp32", "fp16", "bf16")
RECALIBRATIONS = ("server", "federated")
PRUNING_SCHEDULES = ("imp", "gmp")


@dataclass(frozen=True)
class FederationConfig:
    """Settings only a federated run has; its keys share the run config's namespace."""

    mode: str = "hyperparameter"  # clients differ by hyperparameters, or by data shard
    pretrain_rounds: int = 1  # dense federated rounds before phase 1 (0 with init-checkpoint)
    rounds_per_phase: int = 1
    pruning_schedule: str = "imp"  # imp: prune at each phase start; gmp: cubic schedule at round boundaries
    partitioning: str = "iid"  # data mode only
    dirichlet_alpha: float = 0.3
    min_train_clients: int = 2
    min_available_clients: int = 2
    fraction_evaluate: float = 1.0  # clients asked for federated evaluation each round
    value_dtype: str = "fp32"  # dtype of the values on the wire
    recalibration: str = "server"  # server-held data, or a federated norm-statistics round
    server_data: bool = True  # the server holds the data set: central evaluation, recalibration, greedy soup
    round_timeout: float = 600.0
    round_retries: int = 1  # times a round is sent again when too few valid replies came back
    resume: bool = False  # continue from the last round checkpoint in out-dir

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise FedSMSError(f"config key {key.replace('_', '-')!r} {what}, got {getattr(self, key)!r}")

        need(self.mode in FEDERATED_MODES, "mode", f"must be one of {', '.join(FEDERATED_MODES)}")
        need(self.pretrain_rounds >= 0, "pretrain_rounds", "must be at least 0")
        need(self.rounds_per_phase >= 1, "rounds_per_phase", "must be at least 1")
        need(self.pruning_schedule in PRUNING_SCHEDULES, "pruning_schedule",
             f"must be one of {', '.join(PRUNING_SCHEDULES)}")
        need(self.partitioning in PARTITIONINGS, "partitioning", f"must be one of {', '.join(PARTITIONINGS)}")
        need(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be positive")
        need(self.min_train_clients >= 1, "min_train_clients", "must be at least 1")
        need(self.min_available_clients >= 1, "min_available_clients", "must be at least 1")
        need(0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate", "must be in [0, 1]")
        need(self.value_dtype in VALUE_DTYPES, "value_dtype", f"must be one of {', '.join(VALUE_DTYPES)}")
        need(self.recalibration in RECALIBRATIONS, "recalibration", f"must be one of {', '.join(RECALIBRATIONS)}")
        need(self.round_timeout > 0, "round_timeout", "must be positive")
        need(self.round_retries >= 0, "round_retries", "must be at least 0")


def split_config(values: Mapping[str, Any]) -> tuple[RunConfig, FederationConfig]:
    """Parse one flat mapping (a Flower run config) into its run and federation parts."""
    run_keys = {f.name for f in fields(RunConfig)}
    fed_keys = {f.name for f in fields(FederationConfig)}
    run_values, fed_values = {}, {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in run_keys:
            run_values[key] = value
        elif name in fed_keys:
            fed_values[name] = (key, value)
        else:
            known = sorted(k.replace("_", "-") for k in run_keys | fed_keys)
            raise FedSMSError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
    fed_types = {f.name: f.type for f in fields(FederationConfig)}
    fed = FederationConfig(**{name: _cast(key, v, fed_types[name]) for name, (key, v) in fed_values.items()})
    return RunConfig.from_mapping(run_values), fed
