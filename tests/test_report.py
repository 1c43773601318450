"""The tables fit a 100-column terminal, say n = 1 where one seed has no spread, and the
comparison note says what a table of one run can and cannot tell apart."""

import pytest

from fedsms.report import comparison_note, final_table, phase_table

METHODS = ("imp", "imp-long", "imp-best", "imp-avg", "sms", "sms-greedy", "fed-hyperparameter-gmp")


def rows(seeds=(0,), phases=3, test_examples=360):
    out = [{"method": "dense", "seed": s, "phase": 0, "sparsity": 0.0, "accuracy": 0.975, "ece": 0.02} for s in seeds]
    for seed in seeds:
        for method in METHODS:
            for phase in range(1, phases + 1):
                accuracy = 0.9 + 0.01 * seed + 0.001 * phase
                out.append({"method": method, "seed": seed, "phase": phase, "sparsity": phase / (phases + 1)})
                out[-1].update(accuracy=accuracy, ece=0.03, ood_accuracy=0.8)
    out[0]["test_examples"] = test_examples
    return out


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
@pytest.mark.parametrize("phases", [3, 12])
def test_tables_fit_100_columns_and_keep_every_cell(seeds, phases):
    table = phase_table(rows(seeds, phases))
    assert max(len(line) for line in table.splitlines()) <= 100
    assert max(len(line) for line in final_table(rows(seeds, phases)).splitlines()) <= 100
    for phase in range(phases + 1):
        assert f"phase {phase}" in table
    for method in METHODS:  # every method appears once per block of phases
        assert sum(line.startswith(method + " ") for line in table.splitlines()) == table.count("sparsity ")


def test_one_seed_prints_n_1_and_no_spread():
    table, final = phase_table(rows()), final_table(rows())
    assert "n = 1" in table and "±" not in table and "±" not in final
    several = phase_table(rows((0, 1)))
    assert "mean ± std over 2 seeds" in several and "90.60 ± 0.71" in several


def test_the_comparison_note_says_what_one_run_can_resolve():
    note = comparison_note(rows(test_examples=360))
    assert "same dense model (97.50 %)" in note and "one seed on 360 test examples" in note
    assert "one example is 0.28 points" in note and "±0.8 points" in note  # sqrt(.975 * .025 / 360)
    assert "fedsms local --seeds" in note
    assert "standard deviation over seeds" in comparison_note(rows((0, 1)))
