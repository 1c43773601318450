"""Every plot fedsms draws, rendered from the rows of a small run that has what made the old
plots unreadable: two dense methods, phase-1 points that coincide, points close together.

What a reader needs and a test can check: one label per line, a legend that covers no data
point, point labels that cover no other label, axes with units, and one colour and marker
per method across plots.
"""

import matplotlib.pyplot as plt
import pytest
from matplotlib.lines import Line2D

from fedsms.plots import STYLES, accuracy_figure, diagnostics_figure, method_style, ood_figure, write_plots
from fedsms.report import METHOD_ORDER

SPARSITY = {0: 0.0, 1: 0.5358, 2: 0.7846, 3: 0.9}
# (test accuracy, OOD accuracy) per method and phase: phase 1 coincides for imp, imp-best and
# sms; fed-dense's and fed-hyperparameter's phase-2 points sit on top of each other.
ACCURACY = {
    "dense": {0: (0.9749, 0.8198)},
    "fed-dense": {0: (0.9833, 0.8177)},
    "imp": {1: (0.9805, 0.8198), 2: (0.9749, 0.8340), 3: (0.9889, 0.7950)},
    "imp-best": {1: (0.9805, 0.8198), 2: (0.9777, 0.8158), 3: (0.9721, 0.7997)},
    "sms": {1: (0.9805, 0.8198), 2: (0.9777, 0.8241), 3: (0.9861, 0.8047)},
    "fed-hyperparameter": {1: (0.9805, 0.8080), 2: (0.9833, 0.8180), 3: (0.9833, 0.8389)},
}


def diagnostics(accuracy: float) -> dict:
    line = {"t": [0.0, 0.25, 0.5, 0.75, 1.0], "test_accuracy": [accuracy] * 5, "barrier": 0.0}
    return {"lines": {"candidates": line, "soup": line}}


def small_run() -> list[dict]:
    rows = []
    for method, phases in ACCURACY.items():
        for phase, (accuracy, ood) in phases.items():
            row = {"method": method, "seed": 0, "phase": phase, "sparsity": SPARSITY[phase]}
            row.update(accuracy=accuracy, ood_accuracy=ood)
            if method == "sms":
                row["diagnostics"] = diagnostics(accuracy)
            rows.append(row)
    return rows


def figures(rows):
    yield accuracy_figure(rows)
    yield ood_figure(rows)
    yield diagnostics_figure([r for r in rows if "diagnostics" in r], "sms")


def data_points(ax):
    """Display coordinates of every plotted point of ``ax`` (a horizontal line: its ends)."""
    for line in ax.get_lines():
        for x, y in line.get_xydata():
            yield line.get_label(), line.get_transform().transform((x, y))


@pytest.fixture(scope="module")
def rendered():
    figs = list(figures(small_run()))
    for fig in figs:
        fig.canvas.draw()
    yield figs
    for fig in figs:
        plt.close(fig)


def test_every_legend_has_distinct_labels_and_covers_no_data_point(rendered):
    for fig in rendered:
        for ax in fig.axes:
            legend = ax.get_legend()
            labels = [t.get_text() for t in legend.get_texts()]
            assert len(labels) == len(set(labels)), labels
            box = legend.get_window_extent()
            covered = [label for label, (x, y) in data_points(ax) if box.contains(x, y)]
            assert not covered, f"{ax.get_title()}: the legend covers points of {covered}"


def test_point_labels_cover_no_other_label_and_no_point(rendered):
    ax = rendered[1].axes[0]
    boxes = [text.get_window_extent() for text in ax.texts]
    assert len(boxes) == sum(len(phases) for phases in ACCURACY.values())
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :]), ax.texts[i].get_text()
        assert not any(box.contains(x, y) for _, (x, y) in data_points(ax))


def test_axes_are_labelled_with_units(rendered):
    for fig in rendered:
        for ax in fig.axes:
            assert "%" in ax.get_ylabel(), ax.get_title()
            assert ax.get_xlabel() not in ("", "t"), ax.get_title()
    assert "%" in rendered[0].axes[0].get_xlabel() and "%" in rendered[1].axes[0].get_xlabel()


def method_lines(ax) -> dict:
    """Each labelled line of ``ax`` by its label (an error bar's label is on its container)."""
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    return lines | {c.get_label(): c.lines[0] for c in ax.containers if c.lines[0] is not None}


def test_a_method_looks_the_same_in_every_plot(rendered):
    pruned = [m for m in ACCURACY if not m.endswith("dense")]
    looks = {m: set() for m in pruned}
    for fig in rendered[:2]:
        for method, line in method_lines(fig.axes[0]).items():
            if method in looks:
                looks[method].add((line.get_color(), line.get_marker()))
    assert all(len(looks[m]) == 1 for m in pruned), looks
    assert len({next(iter(looks[m])) for m in pruned}) == len(pruned)  # and differently from the others
    soup_line = next(line for label, line in method_lines(rendered[2].axes[0]).items() if "soup" in label)
    assert (soup_line.get_color(), soup_line.get_marker()) == next(iter(looks["sms"]))


def test_every_known_method_has_a_look_of_its_own():
    assert set(METHOD_ORDER) <= set(STYLES)
    assert len({tuple(method_style(m).values()) for m in METHOD_ORDER}) == len(METHOD_ORDER)
    assert isinstance(Line2D([], [], **method_style("local-imp")), Line2D)  # unknown names get one too


def test_write_plots_writes_every_plot_of_a_run(tmp_path):
    paths = write_plots(small_run(), tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy_vs_sparsity.png", "diagnostics_sms.png", "id_vs_ood.png"]


def test_coinciding_points_stay_visible_side_by_side(rendered):
    ax, fig = rendered[0].axes[0], rendered[0]
    lines = method_lines(ax)
    phase1 = [lines[m].get_transform().transform(lines[m].get_xydata()[0]) for m in ("imp", "imp-best", "sms")]
    apart = 2 * fig.dpi / 72  # two points on the page
    xs = [x for x, _ in phase1]
    for i, x in enumerate(xs):
        assert all(abs(x - other) >= apart for other in xs[i + 1 :])
