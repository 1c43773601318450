"""Every configuration key, declared once.

A key is a field of :class:`RunKeys` (the run: data, model, pruning, retraining, merging)
or :class:`FederationKeys` (what only a federated run has). Its declaration holds the
name, type and default (the dataclass field) and, in the field's metadata, a :class:`Key`:
help text, allowed range or choices, whether it shapes the soup and whether it is a
per-candidate hyperparameter. For example::

    momentum: float = key(0.9, "SGD momentum of retraining", at_least=0, below=1, candidate="momentum")

Everything else derives from these declarations: parsing and validation
(:func:`parse_value`), :class:`fedsms.recipe.CandidateConfig`, the ``--key`` options of
the CLI, the ``[tool.flwr.app.config]`` table in ``pyproject.toml`` and the rule of what a
resumed job may change (:func:`fedsms.config.soup_shaping_changes`).

This module imports nothing but the standard library, so every other module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

from fedsms import FedSMSError

# The choices of the enumerated keys. Modules that act on a choice import these names.
METHODS = ("imp", "imp-long", "imp-best", "imp-avg", "sms", "sms-greedy", "gmp", "gmp-soup")
PRUNING_METHODS = ("global", "uniform", "random")
LR_SCHEDULES = ("linear", "cosine", "constant")
MERGE_RULES = ("uniform", "weighted", "greedy", "trimmed-mean", "median", "multi-krum")
FEDERATED_MODES = ("hyperparameter", "data")
PARTITIONINGS = ("iid", "dirichlet", "shards")
VALUE_DTYPES = ("fp32", "fp16", "bf16")
CLIENT_PROTOCOLS = ("compact", "flower")
RECALIBRATIONS = ("server", "federated")
PRUNING_SCHEDULES = ("imp", "gmp")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: mixed precision on CUDA, fp32 elsewhere
# Differential privacy of a data soup: where each update is clipped (Flower's server-side /
# client-side wrappers) and whether its bound is fixed or adapts (Andrew et al.).
DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
DP_SAMPLINGS = ("without-replacement", "no-amplification")  # Flower's SamplingMethod names

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Key:
    """What a configuration key allows and means, besides its name, type and default.

    Parameters
    ----------
    help : str
        One line for ``--help``; the allowed range is appended to it automatically.
    at_least, above : float, optional
        Inclusive or exclusive lower bound.
    at_most, below : float, optional
        Inclusive or exclusive upper bound of the key's natural range (e.g. a fraction).
    cap : float, optional
        Inclusive sanity bound on what a user may ask for (e.g. 100 phases): larger values
        are surely mistakes and are refused before any work starts. Caps guard input (the
        config and recipe strings); values derived from checked input are not re-capped.
    choices : tuple of str
        The allowed values of a string key.
    many : bool
        The value is a comma list of ``choices`` (at least one).
    shapes_soup : bool
        Whether the key changes the soup a job computes. A resumed job (``--resume``) must
        keep every soup-shaping key; the others (where files live, patience) may change.
    candidate : str, optional
        The :class:`fedsms.recipe.CandidateConfig` field this key sets: a per-candidate
        hyperparameter that a recipe may vary.
    """

    help: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    cap: float | None = None
    choices: tuple[str, ...] = ()
    many: bool = False
    shapes_soup: bool = True
    candidate: str | None = None

    def rule(self, caps: bool = True) -> str:
        """The allowed values in words: ``"at least 1 and at most 100"``, ``"in [0, 1)"``, ``"one of a, b"``.

        Parameters
        ----------
        caps : bool, default True
            Whether to mention the sanity cap.

        Returns
        -------
        str
            The rule; empty for a key without bounds or choices.
        """
        if self.choices:
            return f"{'some' if self.many else 'one'} of {', '.join(self.choices)}"
        upper = self.at_most if self.at_most is not None else self.below
        lower = self.at_least if self.at_least is not None else self.above
        if upper is not None and lower is not None:
            return (
                f"in {'[' if self.at_least is not None else '('}{_num(lower)}, "
                f"{_num(upper)}{']' if self.at_most is not None else ')'}"
            )
        if self.above == 0:
            words = ["positive"]
        elif lower is not None:
            words = [f"{'at least' if self.at_least is not None else 'greater than'} {_num(lower)}"]
        else:
            words = []
        if caps and self.cap is not None:
            words.append(f"at most {_num(self.cap)}")
        return " and ".join(words)

    def allows(self, value: Any, caps: bool = True) -> bool:
        """Whether an already-typed ``value`` is in range (or among the choices).

        Parameters
        ----------
        value : Any
            The typed value: a str for a key with choices (a comma list when ``many``),
            else a number; bools and other strings are always allowed.
        caps : bool, default True
            Whether the sanity cap applies.

        Returns
        -------
        bool
            True when allowed.
        """
        if self.choices:
            items = [v.strip() for v in value.split(",") if v.strip()] if self.many else [value]
            return bool(items) and all(v in self.choices for v in items)
        if isinstance(value, (bool, str)):
            return True
        return (
            (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below)
            and (not caps or self.cap is None or value <= self.cap)
        )


def _num(x: float) -> str:
    """A bound as people write it: 1, 0.5, 1048576."""
    return str(int(x)) if float(x).is_integer() else repr(x)


def key(default: Any, help: str, **rules: Any) -> Any:
    """Declare a configuration key: a dataclass field with its :class:`Key` as metadata.

    Parameters
    ----------
    default : Any
        The key's default value.
    help : str
        One line of help text (see :class:`Key`).
    **rules
        The other fields of :class:`Key`: ``at_least``, ``above``, ``at_most``, ``below``,
        ``cap``, ``choices``, ``many``, ``shapes_soup``, ``candidate``.

    Returns
    -------
    dataclasses.Field
        The field, to assign in a settings dataclass.
    """
    return field(default=default, metadata={"key": Key(help, **rules)})


def declared(cls_or_instance: Any) -> Iterator[tuple[Field, Key]]:
    """The ``(field, Key)`` pairs of a settings class, in declaration order.

    Parameters
    ----------
    cls_or_instance : dataclass or dataclass instance
        A settings class (or instance) whose fields were declared with :func:`key`;
        fields without a ``Key`` are skipped.

    Yields
    ------
    tuple of (dataclasses.Field, Key)
        Each declared field and its rules.
    """
    for f in fields(cls_or_instance):
        if "key" in f.metadata:
            yield f, f.metadata["key"]


def parse_bool(value: Any) -> bool:
    """The one boolean parser: a bool, or true/false, 1/0, yes/no, on/off in any case.

    Parameters
    ----------
    value : Any
        A bool, or anything whose ``str`` (stripped) is one of those words.

    Returns
    -------
    bool
        The value.

    Raises
    ------
    ValueError
        For anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(value)


def _cast(value: Any, kind: str) -> Any:
    if kind == "bool":
        return parse_bool(value)
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    return str(value)


def parse_value(subject: str, name: str, value: Any, kind: str, spec: Key | None, caps: bool = True) -> Any:
    """``value`` as a ``kind`` (bool, int, float or str), checked against ``spec``.

    Parameters
    ----------
    subject, name : str
        How the error names the value, e.g. ``"config key"`` and ``"phases"``.
    value : Any
        The raw value: typed already, or text from a command line or run config.
    kind : str
        ``"bool"``, ``"int"``, ``"float"`` or ``"str"`` (the dataclass field's type).
    spec : Key or None
        The rules; None checks the type only.
    caps : bool
        Whether the key's sanity cap applies (it guards input, see :class:`Key`).

    Returns
    -------
    bool, int, float or str
        The typed value (a float is always finite).

    Raises
    ------
    FedSMSError
        One sentence naming the key, what it must be and what it got.
    """
    try:
        typed = _cast(value, kind)
    except (TypeError, ValueError, OverflowError):
        what = {"bool": "a bool (true/false, yes/no, on/off, 1/0)", "int": "an int"}.get(kind, f"a {kind}")
        raise FedSMSError(f"{subject} {name!r} must be {what}, got {value!r}") from None
    if kind == "float" and not math.isfinite(typed):
        raise FedSMSError(f"{subject} {name!r} must be a finite float, got {value!r}")
    if spec is not None and not spec.allows(typed, caps):
        raise FedSMSError(f"{subject} {name!r} must {'list' if spec.many else 'be'} {spec.rule(caps)}, got {typed!r}")
    return typed


class Settings:
    """Behaviour shared by the settings classes: parse and check every key on creation."""

    def __post_init__(self) -> None:
        for f, spec in declared(self):
            value = parse_value("config key", f.name.replace("_", "-"), getattr(self, f.name), f.type, spec)
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Any = None) -> Any:
        """Settings from ``values`` on top of ``base`` (or the defaults).

        Keys may be spelt with ``-`` (Flower's run-config style) or ``_``; values may be
        text. An unknown key or a bad value raises :class:`fedsms.FedSMSError` naming it.

        Parameters
        ----------
        values : mapping of str to Any
            Keys of this class and their values; keys left out keep ``base``'s values.
        base : Settings, optional
            The settings to start from; None: the declared defaults.

        Returns
        -------
        Settings
            A new instance of ``cls`` (every value checked).

        Raises
        ------
        FedSMSError
            For an unknown key or a bad value.
        """
        names = [f.name for f, _ in declared(cls)]
        updates = {}
        for raw_key, value in values.items():
            name = raw_key.replace("-", "_")
            if name not in names:
                known = ", ".join(n.replace("_", "-") for n in names)
                raise FedSMSError(f"unknown config key {raw_key!r}; known keys: {known}")
            updates[name] = value
        return replace(base or cls(), **updates)

    def to_dict(self) -> dict[str, Any]:
        """Every key (``_`` spelling) and its value.

        Returns
        -------
        dict of str to Any
            Key to typed value, in declaration order (JSON-serialisable).
        """
        return asdict(self)


@dataclass(frozen=True)
class RunKeys(Settings):
    """The run's keys: shared by ``fedsms local``, ``fedsms simulate`` and the Flower apps.

    Declarations only; :class:`fedsms.config.RunConfig` adds the rules across keys and the
    candidates. Per-candidate hyperparameters carry ``candidate=``.

    Each field is one key; its type and default are the field's, and its help text, range
    and whether it shapes the soup sit next to it in its ``key(...)`` declaration below.
    """

    dataset: str = key(
        "digits", "digits (embedded), mnist1d or mnist1d-N (generated), cifar10, cifar100, mnist or fashion-mnist"
    )
    data_dir: str = key("", "folder holding the torchvision data sets' files", shapes_soup=False)
    model: str = key(
        "cnn", "mlp, mlp-WIDTH, cnn, resnet20, resnet56, wrn-D-K, cnn1d, cnn1d-WIDTH, resnet1d-D or tv:TORCHVISION_NAME"
    )
    target_sparsity: float = key(0.9, "final fraction of prunable weights that are zero", at_least=0, below=1)
    phases: int = key(3, "prune-retrain phases P", at_least=1, cap=100)
    candidates: int = key(4, "candidates m retrained per phase", at_least=1, cap=1024)
    gmp_updates: int = key(
        0, "mask updates of gmp/gmp-soup within the phases × retrain-epochs budget (0: one per phase)", at_least=0
    )
    gmp_initial_sparsity: float = key(
        0.0, "sparsity where the cubic GMP schedule starts (the dense model's step)", at_least=0, below=1
    )
    pruning: str = key(
        "global", "global (magnitude over all layers), uniform (per layer) or random", choices=PRUNING_METHODS
    )
    keep_first_dense: bool = key(False, "never prune the first prunable layer")
    keep_last_dense: bool = key(False, "never prune the last prunable layer")
    prune_include: str = key(
        "", "more tensors to prune besides every weight matrix: comma-separated name patterns, e.g. 'embed*'"
    )
    prune_exclude: str = key("", "tensors never pruned: comma-separated name patterns, e.g. 'embed*,head.*'")
    pretrain_epochs: int = key(10, "dense pretraining epochs (0 with --init-checkpoint)", at_least=0, cap=10_000)
    pretrain_lr: float = key(0.05, "peak learning rate of dense pretraining", above=0)
    retrain_epochs: int = key(5, "epochs each candidate retrains per phase", at_least=1, cap=10_000, candidate="epochs")
    lr: float = key(0.05, "peak retraining learning rate", above=0, candidate="lr")
    momentum: float = key(0.9, "SGD momentum of retraining", at_least=0, below=1, candidate="momentum")
    weight_decay: float = key(
        5e-4, "retraining weight decay (Nesterov momentum when > 0)", at_least=0, candidate="weight_decay"
    )
    batch_size: int = key(64, "training batch size", at_least=1, cap=2**20, candidate="batch_size")
    label_smoothing: float = key(
        0.0, "label smoothing of the training loss", at_least=0, below=1, candidate="label_smoothing"
    )
    lr_schedule: str = key(
        "linear", "linear (warm-up then decay to 0), cosine or constant", choices=LR_SCHEDULES, candidate="lr_schedule"
    )
    warmup_fraction: float = key(
        0.1, "fraction of the steps spent warming up", at_least=0, below=1, candidate="warmup_fraction"
    )
    augment: bool = key(True, "random translation (and flips where they fit) during training", candidate="augment")
    recipe: str = key("", "how candidates differ, e.g. 'weight_decay=1e-4,5e-4;lr=0.05,0.1' (seeds always differ)")
    merge: str = key(
        "uniform",
        "uniform, weighted (by examples) or greedy (held-out score) soup; "
        "trimmed-mean or median (coordinate-wise), multi-krum (whole updates): robust to bad candidates",
        choices=MERGE_RULES,
    )
    trim_fraction: float = key(
        0.2, "fraction of the candidates cut at each end, per value, by merge trimmed-mean", at_least=0, below=0.5
    )
    krum_malicious: int = key(
        1,
        "candidates merge multi-krum assumes malicious (f): it averages the n - f closest to their neighbours",
        at_least=0,
        cap=1000,
    )
    max_client_weight: float = key(
        1.0,
        "largest share one candidate may have in a weighted merge (1: no cap); it bounds a candidate's "
        "weight, not the size of its values (update-norm-bound does)",
        above=0,
        at_most=1,
    )
    update_norm_bound: float = key(
        0.0,
        "reject candidates farther from the soup than this many times the round's median distance (0: off)",
        at_least=0,
        cap=1e6,
    )
    soup_guard: str = key(
        "greedy",
        "when a phase's uniform or weighted soup scores below its best candidate on the held-out split by more "
        "than soup-guard-tolerance: greedy (fall back to the greedy soup), best (the best candidate) or off (keep "
        "the soup); needs held-out data where the soup is made (a federated server without data keeps the soup) "
        "and keeps the phase's last m candidates in memory",
        choices=("greedy", "best", "off"),
    )
    soup_guard_tolerance: float = key(
        0.01,
        "how far below its best candidate a soup may score on the held-out split, in the task's score units "
        "(0.01: one point of accuracy), before soup-guard falls back",
        at_least=0,
        cap=1e6,
    )
    recalibration_fraction: float = key(
        0.2, "fraction of training data for norm-statistics recalibration", above=0, at_most=1
    )
    heldout_fraction: float = key(
        0.1, "fraction of the training data held out (seeded) for greedy/best-of-m", above=0, below=1
    )
    methods: str = key(
        "imp,imp-best,imp-avg,sms", "comma list of methods to run (dense always runs)", choices=METHODS, many=True
    )
    diagnostics: bool = key(
        True,
        "per phase with several averaged candidates: candidates' and soup's accuracy, ensemble, interpolation "
        "barriers and update spread (evaluations only; a federated server with data keeps the phase's m "
        "candidates in memory for them)",
        shapes_soup=False,
    )
    ood: bool = key(True, "evaluate under corruptions at severities 1-5")
    ood_examples: int = key(1000, "test examples used for the OOD evaluation", at_least=1, cap=10**7)
    seed: int = key(0, "base seed: candidate i retrains with seed + i", at_least=0, cap=2**32 - 1, candidate="seed")
    device: str = key("auto", "auto, cpu or cuda[:N]", shapes_soup=False)
    precision: str = key(
        "auto",
        "auto (bf16/fp16 mixed precision on CUDA, fp32 elsewhere), fp32, or bf16 (autocast on any device)",
        choices=PRECISIONS,
        shapes_soup=False,
    )
    channels_last: bool = key(
        False,
        "train models with 2-D convolutions in the channels-last layout (faster on recent GPUs)",
        shapes_soup=False,
    )
    workers: int = key(1, "candidates trained in parallel worker processes", at_least=1, cap=1024, shapes_soup=False)
    out_dir: str = key("runs/local", "where results, checkpoints and plots go", shapes_soup=False)
    init_checkpoint: str = key("", "start from this dense checkpoint instead of pretraining")


@dataclass(frozen=True)
class FederationKeys(Settings):
    """The keys only a federated run has; they share the run keys' namespace.

    Declarations only; :class:`fedsms.config.FederationConfig` is the class to use.

    Each field is one key; its type and default are the field's, and its help text, range
    and whether it shapes the soup sit next to it in its ``key(...)`` declaration below.
    """

    mode: str = key(
        "hyperparameter",
        "hyperparameter (clients differ by recipe) or data (clients differ by shard)",
        choices=FEDERATED_MODES,
    )
    pretrain_rounds: int = key(
        1, "dense federated rounds before phase 1 (0 with init-checkpoint)", at_least=0, cap=10_000
    )
    rounds_per_phase: int = key(1, "federated rounds in each prune-retrain phase", at_least=1, cap=10_000)
    pruning_schedule: str = key(
        "imp",
        "imp (prune at each phase start) or gmp (cubic schedule, mask updated at round boundaries)",
        choices=PRUNING_SCHEDULES,
    )
    partitioning: str = key("iid", "iid, dirichlet or shards (data mode)", choices=PARTITIONINGS)
    dirichlet_alpha: float = key(0.3, "label-skew concentration of the dirichlet partitioning", above=0)
    min_train_clients: int = key(
        2, "valid replies a round needs to update the soup", at_least=1, cap=10**6, shapes_soup=False
    )
    min_available_clients: int = key(
        2, "clients to wait for before a round starts", at_least=1, cap=10**6, shapes_soup=False
    )
    clients_per_round: int = key(
        0,
        "clients sampled (seeded) for each training round; 0: the m candidates' worth "
        "in a hyperparameter soup, every connected client in a data soup",
        at_least=0,
        cap=10**6,
    )
    client_wait: float = key(
        120.0,
        "seconds the server waits for min-available-clients before it stops the job",
        above=0,
        cap=7 * 24 * 3600,
        shapes_soup=False,
    )
    fraction_evaluate: float = key(
        1.0, "fraction of clients asked for federated evaluation", at_least=0, at_most=1, shapes_soup=False
    )
    value_dtype: str = key("fp32", "fp32, fp16 or bf16 values on the wire", choices=VALUE_DTYPES)
    client_protocol: str = key(
        "compact",
        "compact (fedsms clients: values under the mask) or flower (unchanged "
        "Flower ClientApps: the dense model in content['arrays'])",
        choices=CLIENT_PROTOCOLS,
    )
    recalibration: str = key(
        "server", "norm statistics re-estimated on the server's data or by the clients", choices=RECALIBRATIONS
    )
    server_data: bool = key(True, "the server holds the data set (central evaluation, recalibration, greedy)")
    round_timeout: float = key(
        600.0, "seconds to wait for the replies of a round", above=0, cap=7 * 24 * 3600, shapes_soup=False
    )
    round_retries: int = key(
        1, "times a round is sent again when too few valid replies came back", at_least=0, cap=100, shapes_soup=False
    )
    resume: bool = key(False, "continue from the last round checkpoint in --out-dir", shapes_soup=False)
    dp: str = key(
        "off",
        "differential privacy of a data soup: each client's update under the mask clipped (on the server or "
        "the client, to a fixed or an adaptive L2 bound) and Gaussian noise added only under the mask",
        choices=DP_MODES,
    )
    dp_noise_multiplier: float = key(
        1.0, "noise standard deviation over the clipping norm (dp; 0: clipping only, no privacy)", at_least=0, cap=1e3
    )
    dp_clipping_norm: float = key(
        1.0, "L2 bound of each client's update (dp; the starting bound of adaptive clipping)", above=0, cap=1e6
    )
    dp_delta: float = key(1e-5, "delta at which the spent epsilon is reported (dp)", above=0, below=1)
    dp_sampling: str = key(
        "without-replacement",
        "how epsilon is accounted (dp): the sampler's fixed-size draw of clients-per-round from the connected "
        "clients (replace-one), or no-amplification (add-or-remove-one, as Flower's DP wrappers)",
        choices=DP_SAMPLINGS,
    )
    dp_epsilon_budget: float = key(
        0.0,
        "stop the job, checkpointed, before a round that would spend more epsilon (dp; 0: no budget)",
        at_least=0,
        cap=1e6,
        shapes_soup=False,
    )
