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
import math
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


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    # One value has no spread: "± 0.00" would claim a precision a single run cannot give.
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def spread_note(rows: list[dict]) -> str:
    """What the ``±`` of a table over ``rows`` means: the std over seeds, or none for one seed.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``seed``.

    Returns
    -------
    str
        ``"mean ± std over 3 seeds"`` or ``"n = 1 (one seed: no spread to show)"``.
    """
    seeds = len({r["seed"] for r in rows})
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "n = 1 (one seed: no spread to show)"


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


def phase_table(rows: list[dict], key: str = "accuracy", width: int = 100, percent: bool = True) -> str:
    """One line per method, one column per phase: ``key`` (mean ± std over seeds).

    Columns that would make a line wider than ``width`` go to a further block below, which
    repeats the method names, so the table never wraps on a terminal that wide.

    Parameters
    ----------
    rows : list of dict
        Result rows as ``read_rows`` returns them; each has ``method`` and ``phase``.
    key : str, default "accuracy"
        The metric shown.
    width : int, default 100
        The widest line allowed (at least one phase column is always shown).
    percent : bool, default True
        Show the metric (a fraction) in %; False: as it is, to four decimals.

    Returns
    -------
    str
        A title line, then per block a header of phases, a line of their mean sparsity, a
        rule and one line per method.
    """
    methods, phases = methods_in(rows), sorted({r["phase"] for r in rows})
    cells = {k: _fmt(v) if percent else _fmt(v, 1.0, 4) for k, v in grouped(rows, key).items()}
    spars = grouped(rows, "sparsity")
    mean_sparsity = {p: statistics.fmean(v for (_, q), vs in spars.items() if q == p for v in vs) for p in phases}
    columns = {p: (f"phase {p}", f"{100 * mean_sparsity[p]:.2f}%") for p in phases}
    name_width = max(len(m) for m in [*methods, "sparsity"])
    cell_width = max(len(c) for c in [*cells.values(), *(h for pair in columns.values() for h in pair)])
    per_block = max(1, (width - name_width) // (cell_width + 2))
    blocks = [phases[i : i + per_block] for i in range(0, len(phases), per_block)]

    def line(name: str, texts: list[str]) -> str:
        return (f"{name:<{name_width}}" + "".join(f"  {t:>{cell_width}}" for t in texts)).rstrip()

    lines = [f"test {key}{' (%)' if percent else ''}, {spread_note(rows)}"]
    for i, block in enumerate(blocks):
        header = line("method", [columns[p][0] for p in block])
        lines += [""] * (i > 0) + [header, line("sparsity", [columns[p][1] for p in block]), "-" * len(header)]
        lines += [line(m, [cells.get((m, p), "") for p in block]) for m in methods]
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
        A header and one line per method, values in % as mean ± std over seeds (the mean
        alone for one seed), and the number of seeds; ``-`` where there is no OOD accuracy or ECE.
    """
    width = max(len(m) for m in methods_in(rows))
    lines = [f"{'method':<{width}}  {'sparsity':>8}  {'test acc %':>13}  {'OOD acc %':>13}  {'ECE %':>13}  seeds"]
    for method in methods_in(rows):
        last = max(r["phase"] for r in rows if r["method"] == method)
        mine = [r for r in rows if r["method"] == method and r["phase"] == last]
        ood = [r["ood_accuracy"] for r in mine if "ood_accuracy" in r]
        ece = [r["ece"] for r in mine if "ece" in r]  # a user's federated evaluation may not report it
        lines.append(
            f"{method:<{width}}  {100 * statistics.fmean(r['sparsity'] for r in mine):7.2f}%  "
            f"{_fmt([r['accuracy'] for r in mine]):>13}  {_fmt(ood) if ood else '-':>13}  "
            f"{_fmt(ece) if ece else '-':>13}  {len(mine):>5}"
        )
    return "\n".join(lines)


def comparison_note(rows: list[dict]) -> str:
    """What a table of one run's methods shows and what it does not, in a few sentences.

    Parameters
    ----------
    rows : list of dict
        Result rows of methods that all started from the ``dense`` row's model; the dense
        row carries ``test_examples`` (the size of the test set).

    Returns
    -------
    str
        The note: the shared start, the sparsity reached, how many seeds and test examples
        stand behind each number, and the smallest difference they can resolve.
    """
    dense = [r for r in rows if r["method"] == "dense"]
    accuracy = statistics.fmean(r["accuracy"] for r in dense)
    final = max(r["sparsity"] for r in rows)
    n = dense[0]["test_examples"]
    # The binomial standard error of one accuracy measured on n test examples.
    error = 100 * math.sqrt(accuracy * (1 - accuracy) / n)
    seeds = len({r["seed"] for r in rows})
    runs = "one seed" if seeds == 1 else f"{seeds} seeds"
    return (
        f"Every method started from the same dense model ({100 * accuracy:.2f} %) and was pruned to "
        f"{100 * final:.2f} % sparsity. Each number is {runs} on {n} test examples: one example is "
        f"{100 / n:.2f} points and the test set alone makes each accuracy uncertain by about ±{error:.1f} "
        f"points, so a gap under about {2 * error:.1f} points between two methods is not evidence that one is "
        "better. "
        + (
            "The table does not show how much a method varies from seed to seed; "
            "`fedsms local --seeds 0,1,2` measures that for the local methods."
            if seeds == 1
            else "± is the standard deviation over seeds."
        )
    )


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
