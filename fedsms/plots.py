"""PNG plots: test accuracy against sparsity per method, in-distribution against OOD, and the
soup diagnostics' interpolation lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from fedsms.report import grouped, mean_std, methods_in


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
    acc, ood, spars = grouped(rows, "accuracy"), grouped(rows, "ood_accuracy"), grouped(rows, "sparsity")
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods_in(rows):
        keys = sorted(k for k in acc if k[0] == method)
        if method.endswith("dense"):
            ax.axhline(100 * mean_std(acc[keys[0]])[0], color="gray", ls="--", label="dense")
            continue
        xs = [100 * mean_std(spars[k])[0] for k in keys]
        means, stds = zip(*(mean_std([100 * v for v in acc[k]]) for k in keys))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title="Accuracy vs sparsity")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "accuracy_vs_sparsity.png"))

    if ood:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in methods_in(rows):
            keys = sorted(k for k in ood if k[0] == method)
            if keys:
                xs = [100 * mean_std(acc[k])[0] for k in keys]
                ys = [100 * mean_std(ood[k])[0] for k in keys]
                ax.plot(xs, ys, marker="o", ls=":", label=method)
                for (_, phase), x, y in zip(keys, xs, ys):
                    ax.annotate(str(phase), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set(
            xlabel="test accuracy (%)",
            ylabel="OOD accuracy (%)",
            title=f"In-distribution vs OOD (numbers: {point_label})",
        )
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "id_vs_ood.png"))
    return paths


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
        mine = [r for r in with_lines if r["method"] == method]
        phases = sorted({r["phase"] for r in mine})
        fig, axes = plt.subplots(1, len(phases), figsize=(3.6 * len(phases), 3.4), squeeze=False)
        for ax, phase in zip(axes[0], phases):
            for row in (r for r in mine if r["phase"] == phase):
                seed = f" s{row['seed']}" if len({r["seed"] for r in mine}) > 1 else ""
                for key, label, style in (("candidates", "cand 0 → cand 1", "-"), ("soup", "cand 0 → soup", "--")):
                    line = row["diagnostics"]["lines"][key]
                    ys = [100 * a for a in line["test_accuracy"]]
                    ax.plot(line["t"], ys, style, marker="o", label=f"{label}{seed} (barrier {line['barrier']:.1f})")
            ax.set(xlabel="t", ylabel="test accuracy (%)", title=f"{method} phase {phase}")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths.append(_save(fig, out_dir / f"diagnostics_{method}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
