"""Tables from result rows: per-phase accuracy by method, and the final-sparsity summary,
each as mean ± std over seeds.

A row is one JSON object per (method, phase, seed), as the drivers append to their
results file: ``method``, ``phase``, ``seed``, ``sparsity``, ``accuracy``, ``ece``, ``loss``
and, with OOD evaluation, ``ood_accuracy``. A row of a step with soup diagnostics also
carries a ``diagnostics`` dict (``fedsms.diagnostics``); the tables here ignore it and
``fedsms.plots.plot_diagnostics`` draws it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from fedsms.local import METHOD_SPECS

# Column order of the tables: methods listed here come first, in this order; others follow sorted.
METHOD_ORDER = (
    "dense",
    "fed-dense",
    "imp",
    "imp-long",
    "imp-best",
    "imp-avg",
    "sms",
    "sms-greedy",
    "ensemble",
    "fed-hyperparameter",
    "fed-data",
    "gmp",
    "gmp-soup",
    "fed-hyperparameter-gmp",
    "fed-data-gmp",
)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines results file, blank lines skipped.

    Parameters
    ----------
    path : str or pathlib.Path
        The results file (one JSON object per line).

    Returns
    -------
    list of dict
        The rows, in file order.

    Raises
    ------
    OSError
        If the file cannot be read.
    json.JSONDecodeError
        If a line is not valid JSON.
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value).

    Parameters
    ----------
    values : list of float
        At least one value.

    Returns
    -------
    tuple of (float, float)
        ``(mean, std)``.

    Raises
    ------
    statistics.StatisticsError
        If ``values`` is empty.
    """
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:6.2f} ± {std:4.2f}"


def methods_in(rows: list[dict]) -> list[str]:
    """The methods present in ``rows``, in table order.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.

    Returns
    -------
    list of str
        Methods of ``METHOD_ORDER`` in that order, then any others sorted by name.
    """
    present = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def grouped(rows: list[dict], key: str) -> dict[tuple[str, int], list[float]]:
    """The values of ``key`` grouped by (method, phase); rows without ``key`` are skipped.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.
    key : str
        The metric to collect, e.g. ``"accuracy"``.

    Returns
    -------
    dict of (str, int) to list of float
        One list of values (one per seed) per (method, phase) that has the key.
    """
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if key in row:
            groups[(row["method"], row["phase"])].append(row[key])
    return groups


def by_schedule(rows: list[dict]) -> list[list[dict]]:
    """Rows pruned on the IMP phase schedule, then rows on the GMP schedule, each with the
    dense rows: a per-phase table shows one sparsity per line, so each schedule gets its own.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.

    Returns
    -------
    list of list of dict
        One or two groups of rows (a schedule with no rows is left out); just the dense rows
        when no method pruned.
    """

    def is_gmp(row: dict) -> bool:
        spec = METHOD_SPECS.get(row["method"])
        return (spec is not None and spec.schedule == "gmp") or row["method"].endswith("-gmp")

    dense = [r for r in rows if r["phase"] == 0]
    parts = [[r for r in rows if r["phase"] and not is_gmp(r)], [r for r in rows if r["phase"] and is_gmp(r)]]
    return [dense + part for part in parts if part] or [dense]


def phase_table(rows: list[dict], key: str = "accuracy") -> str:
    """One line per phase, one column per method: ``key`` in % as mean ± std over seeds.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.
    key : str, default "accuracy"
        The metric shown (a fraction, shown in %).

    Returns
    -------
    str
        A title line, a header, a rule and one line per phase with its mean sparsity.
    """
    methods = methods_in(rows)
    values = grouped(rows, key)
    sparsities = grouped(rows, "sparsity")
    phases = sorted({r["phase"] for r in rows})
    header = f"{'phase':>5}  {'sparsity':>8}  " + "  ".join(f"{m:>15}" for m in methods)
    lines = [f"test {key} (%), mean ± std over {len({r['seed'] for r in rows})} seed(s)", header, "-" * len(header)]
    for phase in phases:
        spars = next(v for (m, p), v in sparsities.items() if p == phase)
        cells = [_fmt(values[(m, phase)]) if (m, phase) in values else f"{'':>15}" for m in methods]
        lines.append(f"{phase:>5}  {100 * statistics.fmean(spars):7.2f}%  " + "  ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def final_table(rows: list[dict]) -> str:
    """Each method at its own last phase (GMP counts mask updates, not phases): sparsity,
    test accuracy, OOD accuracy, ECE.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.

    Returns
    -------
    str
        A header and one line per method, values in % as mean ± std over seeds, and the
        number of seeds; ``-`` where there is no OOD accuracy or ECE.
    """
    width = max(len(m) for m in methods_in(rows))
    lines = [f"{'method':>{width}}  {'sparsity':>8}  {'test acc %':>15}  {'OOD acc %':>15}  {'ECE %':>15}  seeds"]
    for method in methods_in(rows):
        last = max(r["phase"] for r in rows if r["method"] == method)
        mine = [r for r in rows if r["method"] == method and r["phase"] == last]
        ood = [r["ood_accuracy"] for r in mine if "ood_accuracy" in r]
        ece = [r["ece"] for r in mine if "ece" in r]  # a user's federated evaluation may not report it
        lines.append(
            f"{method:>{width}}  {100 * statistics.fmean(r['sparsity'] for r in mine):7.2f}%  "
            f"{_fmt([r['accuracy'] for r in mine]):>15}  {_fmt(ood) if ood else '-':>15}  "
            f"{_fmt(ece) if ece else '-':>15}  {len(mine)}"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Mean and std of every metric per (method, phase), for summary.json.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.

    Returns
    -------
    dict
        ``{method: {str(phase): {metric: {"mean", "std", "n"}}}}`` for the metrics
        ``accuracy``, ``ood_accuracy``, ``ece``, ``loss`` and ``sparsity`` the rows have.
    """
    out: dict = defaultdict(dict)
    for key in ("accuracy", "ood_accuracy", "ece", "loss", "sparsity"):
        for (method, phase), values in grouped(rows, key).items():
            mean, std = mean_std(values)
            out[method].setdefault(str(phase), {})[key] = {"mean": mean, "std": std, "n": len(values)}
    return dict(out)
