"""The run configuration shared by ``fedsms local``, ``fedsms simulate`` and the Flower apps.

Every key is declared once, in :mod:`fedsms.schema` (type, default, range, help, whether it
shapes the soup, whether it is per candidate). This module adds what spans several keys:
the rules across keys, the candidates of a run, routing a flat Flower run config into its
run and federation parts, the resume rule and the ``[tool.flwr.app.config]`` table.

Keys may be written with ``-`` (Flower's run-config style) or ``_``. Every value is
checked for type and range, and a bad one is named in a one-sentence error.

``python -m fedsms.config --pyproject [PATH]`` rewrites the ``[tool.flwr.app.config]``
table of ``PATH`` (default ``pyproject.toml``) from the declarations.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsms import FedSMSError
from fedsms.recipe import CandidateConfig, expand_recipe, parse_grid
from fedsms.schema import (  # noqa: F401 -- the choice lists, importable from here as before
    FEDERATED_MODES,
    LR_SCHEDULES,
    MERGE_RULES,
    METHODS,
    PARTITIONINGS,
    PRUNING_METHODS,
    PRUNING_SCHEDULES,
    RECALIBRATIONS,
    VALUE_DTYPES,
    FederationKeys,
    RunKeys,
    declared,
)

FLOWER_OUT_DIR = "runs/flwr-run"  # out-dir of ``flwr run .`` jobs, where the library's default is runs/local


@dataclass(frozen=True)
class RunConfig(RunKeys):
    """The settings of one run, local or federated; its keys are declared in :class:`fedsms.schema.RunKeys`.

    Every value is parsed and checked on creation (text is accepted, as from a command
    line); a bad value raises :class:`fedsms.FedSMSError` naming its key. Besides each
    key's own range, ``gmp_updates`` must be at most ``phases * retrain_epochs``,
    ``gmp_initial_sparsity`` at most ``target_sparsity``, and ``recipe`` must parse.

    Parameters
    ----------
    **keys
        One keyword per key of :class:`fedsms.schema.RunKeys` (``_`` spelling), typed or
        as text; a key left out takes its declared default. Each key's type, default,
        range and help text sit in its declaration (``fedsms local --help`` lists them).
        :meth:`from_mapping` also accepts the ``-`` spelling.

    Raises
    ------
    FedSMSError
        For a bad value or a violated rule across keys, naming the key.

    Examples
    --------
    >>> RunConfig.from_mapping({"phases": "2", "momentum": 0.8}).candidate_configs()[0].momentum
    0.8
    """

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise FedSMSError(f"config key {key.replace('_', '-')!r} {what}, got {getattr(self, key)!r}")

        need(
            self.gmp_updates <= self.phases * self.retrain_epochs,
            "gmp_updates",
            "must be in [0, phases × retrain-epochs] (each update trains at least one epoch)",
        )
        need(
            self.gmp_initial_sparsity <= self.target_sparsity, "gmp_initial_sparsity", "must be in [0, target-sparsity]"
        )
        if self.recipe:
            parse_grid(self.recipe)

    def method_list(self) -> list[str]:
        """The ``methods`` key as a list.

        Returns
        -------
        list of str
            The method names in the order written, blanks dropped.
        """
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def base_candidate(self) -> CandidateConfig:
        """The candidate the run's own per-candidate keys describe (before the recipe varies them).

        Returns
        -------
        CandidateConfig
            One field per key declared with ``candidate=``.
        """
        values = {spec.candidate: getattr(self, f.name) for f, spec in declared(self) if spec.candidate}
        return CandidateConfig(**values)

    def pretrain_candidate(self) -> CandidateConfig:
        """How the dense model is pretrained: the base candidate with the pretraining lr and epochs.

        Returns
        -------
        CandidateConfig
            ``base_candidate()`` with ``lr = pretrain_lr`` and ``epochs = pretrain_epochs``.

        Raises
        ------
        FedSMSError
            If ``pretrain_epochs`` is 0 (a candidate trains at least one epoch).
        """
        return replace(self.base_candidate(), lr=self.pretrain_lr, epochs=self.pretrain_epochs)

    def prune_options(self) -> dict:
        """The keyword arguments of ``fedsms.masks.prunable_names`` and ``prune_plan`` this
        run sets: which tensors it prunes.

        Returns
        -------
        dict
            ``keep_first_dense``, ``keep_last_dense``, ``include``, ``exclude``.
        """
        return {
            "keep_first_dense": self.keep_first_dense,
            "keep_last_dense": self.keep_last_dense,
            "include": self.prune_include,
            "exclude": self.prune_exclude,
        }

    def merge_options(self) -> dict:
        """The robust keyword arguments of ``fedsms.merge.Merge`` this run sets.

        Returns
        -------
        dict
            ``trim_fraction``, ``max_weight``, ``norm_bound``, ``krum_malicious``.
        """
        return {
            "trim_fraction": self.trim_fraction,
            "max_weight": self.max_client_weight,
            "norm_bound": self.update_norm_bound,
            "krum_malicious": self.krum_malicious,
        }

    def candidate_configs(self) -> list[CandidateConfig]:
        """The m candidates of every phase: the base candidate varied by the recipe.

        Returns
        -------
        list of CandidateConfig
            ``candidates`` configs (see :func:`fedsms.recipe.expand_recipe`); seed i is
            ``seed + i`` unless the recipe sets seeds.
        """
        return expand_recipe(self.recipe, self.candidates, self.base_candidate())


@dataclass(frozen=True)
class FederationConfig(FederationKeys):
    """Settings only a federated run has; its keys are declared in :class:`fedsms.schema.FederationKeys`.

    Parameters
    ----------
    **keys
        One keyword per key of :class:`fedsms.schema.FederationKeys` (``_`` spelling), typed
        or as text; a key left out takes its declared default.

    Raises
    ------
    FedSMSError
        For a bad value, naming the key.
    """


GROUPS = (RunConfig, FederationConfig)


def split_config(values: Mapping[str, Any], *, strict: bool = True) -> tuple[RunConfig, FederationConfig]:
    """Parse one flat mapping (a Flower run config) into its run and federation parts.

    Parameters
    ----------
    values : mapping of str to Any
        Keys of both groups (``-`` or ``_`` spelling) and their values (text accepted);
        keys left out take their defaults.
    strict : bool, default True
        Refuse every key that is not fedsms's. False (an app's run config, which holds the
        app's own keys too): other keys are left to the app, unless one is so close to a
        fedsms key that it is likely a typo of it.

    Returns
    -------
    tuple of (RunConfig, FederationConfig)
        The checked run and federation settings.

    Raises
    ------
    FedSMSError
        For an unknown key (with ``strict``), a likely typo of a fedsms key, or a bad
        value, naming it.
    """
    parts: list[dict[str, Any]] = [{} for _ in GROUPS]
    names = [{f.name for f, _ in declared(cls)} for cls in GROUPS]
    every = sorted(n.replace("_", "-") for known in names for n in known)
    for key, value in flower_names(values).items():
        name = key.replace("-", "_")
        for part, known in zip(parts, names):
            if name in known:
                part[key] = value
                break
        else:
            close = difflib.get_close_matches(key.replace("_", "-"), every, n=1, cutoff=0.85)
            if strict:
                raise FedSMSError(f"unknown config key {key!r}; known keys: {', '.join(every)}")
            if close:
                raise FedSMSError(
                    f"config key {key!r} is not fedsms's; did you mean {close[0]!r}? (rename it, or give your "
                    "app's own key a name further from fedsms's keys)"
                )
    run, fed = (cls.from_mapping(part) for cls, part in zip(GROUPS, parts))
    return run, fed


FLOWER_NAMES = {"local_epochs": ("pretrain_epochs", "retrain_epochs")}  # Flower's quickstart key: every round's epochs


def flower_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with Flower's quickstart keys turned into fedsms's: ``local-epochs`` (what
    a quickstart ClientApp reads from the run config and trains every round) sets both
    ``pretrain-epochs`` and ``retrain-epochs``, so the server means what such clients do.

    Parameters
    ----------
    values : mapping of str to Any
        Run-config values.

    Returns
    -------
    dict
        The same values, Flower's names replaced.

    Raises
    ------
    FedSMSError
        If a Flower name is given beside a fedsms key it sets.
    """
    out = dict(values)
    for key in list(out):
        targets = FLOWER_NAMES.get(key.replace("-", "_"))
        if targets is None:
            continue
        value = out.pop(key)
        for target in targets:
            if any(k.replace("-", "_") == target for k in out):
                raise FedSMSError(f"{key!r} sets {target.replace('_', '-')!r} too; give one of them, not both")
            out[target] = value
    return out


PATH_KEYS = ("out_dir", "data_dir", "init_checkpoint")


def absolute_paths(overrides: Mapping[str, Any], default_out_dir: str) -> dict[str, Any]:
    """``overrides`` with every path key made absolute against this process's folder.

    A launcher's ServerApp runs in the SuperLink's own folder, where a relative path the user
    typed would name another file (or none).

    Parameters
    ----------
    overrides : mapping of str to Any
        Settings by field name (``out_dir``, ``data_dir``, ``init_checkpoint``, ...).
    default_out_dir : str
        The output folder when ``out_dir`` is not set.

    Returns
    -------
    dict of str to Any
        A copy with ``out_dir`` always set and every non-empty path key absolute.
    """
    out = {**overrides, "out_dir": overrides.get("out_dir") or default_out_dir}
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = str(Path(out[key]).resolve())
    return out


def soup_shaping_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The soup-shaping keys whose value differs between a checkpoint's config and this job's.

    Parameters
    ----------
    saved : Mapping
        The config a checkpoint was written under (``-`` or ``_`` spelling). A key it lacks
        (one added to fedsms later) counts as its default, the behaviour before it existed.
    current : Mapping
        This job's config; keys fedsms does not declare are ignored.

    Returns
    -------
    list of str
        The changed keys (``_`` spelling), sorted. Keys declared with ``shapes_soup=False``
        (where files live, devices, patience) never appear: a resumed job may change them.
    """
    saved = {str(k).replace("-", "_"): v for k, v in saved.items()} if isinstance(saved, Mapping) else {}
    specs = {f.name: (f, spec) for cls in GROUPS for f, spec in declared(cls)}
    changed = []
    for raw_key, value in current.items():
        name = raw_key.replace("-", "_")
        if name in specs and specs[name][1].shapes_soup and saved.get(name, specs[name][0].default) != value:
            changed.append(name)
    return sorted(changed)


def flower_app_config(out_dir: str = FLOWER_OUT_DIR) -> dict[str, Any]:
    """Every key (``-`` spelling) with its default, as ``[tool.flwr.app.config]`` lists them.

    Parameters
    ----------
    out_dir : str, default FLOWER_OUT_DIR
        The ``out-dir`` value to list instead of the library's default.

    Returns
    -------
    dict of str to Any
        Run keys then federation keys, in declaration order.
    """
    values = {f.name.replace("_", "-"): f.default for cls in GROUPS for f, _ in declared(cls)}
    return {**values, "out-dir": out_dir}


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value (bool, number or string).

    Parameters
    ----------
    value : Any
        A bool, int or float (written as ``repr``), or anything else (written as a quoted
        string of its ``str``, with backslashes and quotes escaped).

    Returns
    -------
    str
        The TOML text.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_config_table(out_dir: str = FLOWER_OUT_DIR) -> str:
    """The ``[tool.flwr.app.config]`` table, generated from the declarations.

    Parameters
    ----------
    out_dir : str, default FLOWER_OUT_DIR
        The ``out-dir`` value written in the table.

    Returns
    -------
    str
        The header and one ``key = value`` line per key, ending with a newline.
    """
    lines = [f"{name} = {toml_value(value)}" for name, value in flower_app_config(out_dir).items()]
    return "[tool.flwr.app.config]\n" + "\n".join(lines) + "\n"


_TABLE = re.compile(r"^\[tool\.flwr\.app\.config\]\n(?:(?!\[).*\n?)*", re.MULTILINE)


def write_app_config_table(path: Path) -> bool:
    """Replace the ``[tool.flwr.app.config]`` table of a pyproject file; True if it changed.

    The table runs from its header to the next line starting with ``[``; the rest of the
    file is kept. The file is rewritten even when nothing changed.

    Parameters
    ----------
    path : pathlib.Path
        The ``pyproject.toml`` to update.

    Returns
    -------
    bool
        Whether the table's text changed.

    Raises
    ------
    FedSMSError
        If the file has no ``[tool.flwr.app.config]`` header.
    """
    text = path.read_text()
    if not _TABLE.search(text):
        raise FedSMSError(f"{path} has no [tool.flwr.app.config] table; add the header and run this again")
    new = _TABLE.sub(lambda _: app_config_table(), text, count=1)
    path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsms.config``: print the app config table, or write it with ``--pyproject``.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    int
        The exit status, 0.

    Raises
    ------
    FedSMSError
        If the pyproject file has no ``[tool.flwr.app.config]`` table.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedsms.config", description="Print or write the Flower app config generated from fedsms.schema."
    )
    parser.add_argument(
        "--pyproject",
        nargs="?",
        const="pyproject.toml",
        metavar="PATH",
        help="rewrite the [tool.flwr.app.config] table of PATH (default: pyproject.toml)",
    )
    args = parser.parse_args(argv)
    if args.pyproject is None:
        print(app_config_table(), end="")
        return 0
    changed = write_app_config_table(Path(args.pyproject))
    print(f"{args.pyproject}: [tool.flwr.app.config] {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
