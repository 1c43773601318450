"""PNG plots: test accuracy against sparsity per method, in-distribution against OOD, and the
soup diagnostics' interpolation lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
from matplotlib import transforms
from matplotlib.figure import Figure

from fedsms.report import grouped, mean_std, methods_in

# One colour and marker per method in every plot (and in every run, whichever methods it
# shows): a reader who learnt that SMS is the green diamond keeps reading it so.
STYLES = {
    "dense": ("tab:gray", "o"),
    "fed-dense": ("black", "s"),
    "imp": ("tab:blue", "o"),
    "imp-long": ("tab:cyan", "v"),
    "imp-best": ("tab:orange", "s"),
    "imp-avg": ("tab:brown", "P"),
    "sms": ("tab:green", "D"),
    "sms-greedy": ("tab:olive", "X"),
    "ensemble": ("tab:pink", "*"),
    "fed-hyperparameter": ("tab:red", "^"),
    "fed-data": ("tab:purple", "v"),
    "gmp": ("tab:blue", "<"),
    "gmp-soup": ("tab:green", ">"),
    "fed-hyperparameter-gmp": ("tab:red", "h"),
    "fed-data-gmp": ("tab:purple", "p"),
}
MARKERS = "o^sDv<>PXh*p"
# Where a point's label may go, in points from the point, tried in this order.
LABEL_OFFSETS = ((4, 4), (4, -11), (-11, 4), (-11, -11), (7, -3), (-14, -3), (-3, 7), (-3, -15))
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


def method_style(method: str) -> dict:
    """Colour and marker of ``method``, the same in every plot.

    Parameters
    ----------
    method : str
        A method name; names outside ``STYLES`` get a look derived from the name itself.

    Returns
    -------
    dict
        ``color`` and ``marker`` keyword arguments for matplotlib.
    """
    if method in STYLES:
        color, marker = STYLES[method]
    else:  # a stable choice (not hash(), which changes per process)
        code = sum(ord(c) * (i + 1) for i, c in enumerate(method))
        color, marker = f"C{code % 10}", MARKERS[code % len(MARKERS)]
    return {"color": color, "marker": marker}


def write_plots(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Every plot of a run's rows: ``plot_results`` and ``plot_diagnostics``.

    Parameters
    ----------
    rows : list of dict
        Result rows of one run (any methods, seeds and phases).
    out_dir : str or Path
        Folder for the PNG files (created if missing).

    Returns
    -------
    list of Path
        The files written.
    """
    return plot_results(rows, out_dir) + plot_diagnostics(rows, out_dir)


def plot_results(rows: list[dict], out_dir: str | Path, point_label: str = "phase") -> list[Path]:
    """The two plots of ``rows``; on the ID-vs-OOD plot each point is numbered by its row's
    ``phase`` field, which ``point_label`` names (bench/quality.py puts a target index there).

    ``accuracy_vs_sparsity.png`` shows each method's mean test accuracy (with its standard
    deviation over seeds) against sparsity, a dense method as a horizontal line;
    ``id_vs_ood.png``, made only when rows have ``ood_accuracy``, shows OOD against test
    accuracy.

    Parameters
    ----------
    rows : list of dict
        Result rows with ``method``, ``phase``, ``sparsity`` and ``accuracy`` (and
        optionally ``ood_accuracy``).
    out_dir : str or Path
        Folder for the PNG files (created if missing).
    point_label : str, optional
        What the ``phase`` numbers on the ID-vs-OOD plot are, for its title (default
        ``"phase"``).

    Returns
    -------
    list of Path
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_save(accuracy_figure(rows), out_dir / "accuracy_vs_sparsity.png")]
    if any("ood_accuracy" in r for r in rows):
        paths.append(_save(ood_figure(rows, point_label), out_dir / "id_vs_ood.png"))
    return paths


def accuracy_figure(rows: list[dict]) -> Figure:
    """Mean test accuracy (± std over seeds) against sparsity, one line per method.

    A method that never prunes (``dense``, ``fed-dense``) is a horizontal line. Methods share
    the sparsities of their phases, so each method's markers are shifted sideways by a few
    points on the page (not in the data) to keep coinciding points visible.

    Parameters
    ----------
    rows : list of dict
        Result rows with ``method``, ``phase``, ``sparsity`` and ``accuracy``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, legend outside the axes.
    """
    acc, spars = grouped(rows, "accuracy"), grouped(rows, "sparsity")
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    pruned = [m for m in methods_in(rows) if not m.endswith("dense")]
    for method in methods_in(rows):
        keys = sorted(k for k in acc if k[0] == method)
        style = method_style(method)
        if method.endswith("dense"):
            ax.axhline(100 * mean_std(acc[keys[0]])[0], color=style["color"], ls="--", lw=1, label=method)
            continue
        shift = 3.0 * (pruned.index(method) - (len(pruned) - 1) / 2)
        xs = [100 * mean_std(spars[k])[0] for k in keys]
        means, stds = zip(*(mean_std([100 * v for v in acc[k]]) for k in keys))
        ax.errorbar(
            xs,
            means,
            yerr=stds,
            capsize=3,
            mfc="none",
            ms=7,
            label=method,
            transform=transforms.offset_copy(ax.transData, fig=fig, x=shift, units="points"),
            **style,
        )
        ax.update_datalim(list(zip(xs, means)))  # a shifted transform leaves the limits to us
    ax.autoscale_view()
    ax.set(xlabel="sparsity (% of prunable weights that are zero)", ylabel="test accuracy (%)")
    ax.set_title("Test accuracy vs sparsity")
    ax.legend(**LEGEND_OUTSIDE)
    ax.grid(alpha=0.3)
    return fig


def ood_figure(rows: list[dict], point_label: str = "phase") -> Figure:
    """Mean OOD accuracy against mean test accuracy, one dotted line per method, each point
    numbered by its row's ``phase`` field (which ``point_label`` names in the title).

    Labels are placed where they cover no other label and no point.

    Parameters
    ----------
    rows : list of dict
        Result rows with ``method``, ``phase``, ``accuracy`` and ``ood_accuracy``.
    point_label : str, optional
        What the numbers on the points are (default ``"phase"``).

    Returns
    -------
    matplotlib.figure.Figure
        The figure, legend outside the axes.
    """
    acc, ood = grouped(rows, "accuracy"), grouped(rows, "ood_accuracy")
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    labels = []
    for method in methods_in(rows):
        keys = sorted(k for k in ood if k[0] == method)
        if not keys:
            continue
        xs = [100 * mean_std(acc[k])[0] for k in keys]
        ys = [100 * mean_std(ood[k])[0] for k in keys]
        style = method_style(method)
        ax.plot(xs, ys, ls=":", mfc="none", ms=7, label=method, **style)
        labels += [(str(phase), x, y, style["color"]) for (_, phase), x, y in zip(keys, xs, ys)]
    ax.set(xlabel="test accuracy (%)", ylabel="OOD accuracy (%, corrupted test set)")
    ax.set_title(f"In-distribution vs OOD accuracy (numbers: {point_label})")
    ax.legend(**LEGEND_OUTSIDE)
    ax.grid(alpha=0.3)
    ax.margins(0.08)  # room for the labels of the outermost points
    _place_labels(fig, ax, labels)
    return fig


def _flat_range(ax) -> None:
    """A panel whose curves are (nearly) flat shows ±1 point around them, not matplotlib's
    default ±5 % of the value, which runs past 100 %."""
    lo, hi = ax.dataLim.intervaly
    if hi - lo < 1.0:
        ax.set_ylim(lo - 1.0, min(hi + 1.0, 100.5))


def _place_labels(fig: Figure, ax, labels: list[tuple[str, float, float, str]]) -> None:
    """Annotate each point at the first offset whose text overlaps no point and no earlier
    label (the first offset when none is free)."""
    fig.canvas.draw()  # positions need a renderer
    renderer = fig.canvas.get_renderer()
    radius = 5 * fig.dpi / 72  # a marker's half width, in pixels
    points = [ax.transData.transform((x, y)) for _, x, y, _ in labels]
    taken = [transforms.Bbox.from_extents(px - radius, py - radius, px + radius, py + radius) for px, py in points]
    for label in labels:
        for offset in LABEL_OFFSETS:
            note = _annotate(ax, label, offset)
            if not any(note.get_window_extent(renderer).overlaps(other) for other in taken):
                break
            note.remove()
        else:  # nowhere free: the first place, overlapping
            note = _annotate(ax, label, LABEL_OFFSETS[0])
        taken.append(note.get_window_extent(renderer))


def _annotate(ax, label: tuple[str, float, float, str], offset: tuple[int, int]):
    text, x, y, color = label
    return ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=7, color=color)


def plot_diagnostics(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """The interpolation lines of the rows' soup diagnostics, one PNG per method.

    ``diagnostics_<method>.png`` has one panel per phase: test accuracy along the line
    candidate 0 → candidate 1 and along candidate 0 → soup (one curve per seed), with each
    line's barrier in the legend. Rows without a ``diagnostics`` dict are skipped.

    Parameters
    ----------
    rows : list of dict
        Result rows; those of steps with diagnostics carry ``diagnostics`` as
        ``fedsms.diagnostics.soup_diagnostics`` returns it.
    out_dir : str or Path
        Folder for the PNG files (created if missing).

    Returns
    -------
    list of Path
        The files written (none when no row has diagnostics).
    """
    out_dir = Path(out_dir)
    with_lines = [r for r in rows if isinstance(r.get("diagnostics"), dict) and "lines" in r["diagnostics"]]
    paths = []
    for method in methods_in(with_lines):
        out_dir.mkdir(parents=True, exist_ok=True)
        figure = diagnostics_figure([r for r in with_lines if r["method"] == method], method)
        paths.append(_save(figure, out_dir / f"diagnostics_{method}.png"))
    return paths


def diagnostics_figure(rows: list[dict], method: str) -> Figure:
    """One panel per phase of ``method``'s rows: the test score (accuracy, or the task's
    score) along candidate 0 → candidate 1
    (grey) and candidate 0 → soup (the method's colour), one pair of curves per seed.

    Parameters
    ----------
    rows : list of dict
        ``method``'s result rows, each with a ``diagnostics`` dict that has ``lines``.
    method : str
        The method, for the titles and its colour.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, each panel's legend (with each line's barrier) below it.
    """
    phases = sorted({r["phase"] for r in rows})
    several_seeds = len({r["seed"] for r in rows}) > 1
    fig, axes = plt.subplots(1, len(phases), figsize=(3.8 * len(phases), 3.8), squeeze=False, layout="constrained")
    soup_style = method_style(method)
    looks = (
        ("candidates", "cand 0 → cand 1", {"color": "tab:gray", "marker": "o", "ls": "-"}),
        ("soup", "cand 0 → soup", {**soup_style, "ls": "--"}),
    )
    for ax, phase in zip(axes[0], phases):
        for row in (r for r in rows if r["phase"] == phase):
            seed = f" s{row['seed']}" if several_seeds else ""
            score = row["diagnostics"].get("score", "accuracy")
            for key, label, look in looks:
                line = row["diagnostics"]["lines"][key]
                ys = [100 * a for a in line[f"test_{score}"]]
                ax.plot(line["t"], ys, mfc="none", label=f"{label}{seed} (barrier {line['barrier']:.1f})", **look)
        ax.set(
            xlabel="t (0 = cand 0, 1 = end of the line)",
            ylabel=f"test {score} (× 100)" if score != "accuracy" else "test accuracy (%)",
        )
        _flat_range(ax)
        ax.set_title(f"{method} phase {phase}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
        ax.grid(alpha=0.3)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # "tight" grows the page to hold legends placed outside the axes.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
