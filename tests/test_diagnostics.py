"""Soup diagnostics: candidates against their soup, interpolation barriers and update
spread, as a library call, in ``fedsms local`` and on the federated server."""

import copy
import json
import re

import pytest
import torch
from helpers import LocalGrid, digits, make_strategy, partitions

from fedsms import FedSMSError
from fedsms.cli import main
from fedsms.diagnostics import describe, interpolate, norm_recalibrator, soup_diagnostics, update_spread
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.report import phase_table, summary
from fedsms.soup import average
from fedsms.training import train_candidate
from fedsms_client.app import make_client_app

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(start: dict, mask: dict, seed: int, epochs: int) -> dict:
    """``start`` retrained on digits under ``mask`` with batch-order seed ``seed``."""
    model = build_for("cnn", digits())
    model.load_state_dict(start)
    train_candidate(
        model, mask, digits().train, CandidateConfig(seed=seed, epochs=epochs, batch_size=32, augment=False)
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh(seed: int) -> dict:
    torch.manual_seed(seed)
    return build_for("cnn", digits()).state_dict()


@pytest.fixture(scope="module")
def setting():
    """A cnn, a mask at 50 %, the state pruned to it from a dense model trained 3 epochs from
    seed 0, a recalibration on digits, and that dense state."""
    threads = torch.get_num_threads()  # module fixtures start before the one_thread fixture
    torch.set_num_threads(1)
    model = build_for("cnn", digits())
    mask = dense_mask(model, prunable_names(model))
    dense = trained(fresh(0), mask, seed=0, epochs=3)
    torch.set_num_threads(threads)
    pruned_mask = compute_mask(dense, mask, 0.5)
    start = {k: v * pruned_mask[k] if k in pruned_mask else v for k, v in dense.items()}
    return model, pruned_mask, start, norm_recalibrator(model, digits().train, fraction=0.2), dense


def diagnose(model, start, candidates, soup, recalibrate, **kwargs):
    data = digits()
    return soup_diagnostics(
        model, start, candidates, soup, heldout=data.heldout, test=data.test, recalibrate=recalibrate, **kwargs
    )


def test_identical_candidates_have_no_spread_and_no_barrier(setting):
    model, mask, start, recalibrate, _ = setting
    candidate = trained(start, mask, seed=1, epochs=1)
    result = diagnose(model, start, [candidate, copy.deepcopy(candidate)], recalibrate(candidate), recalibrate)
    assert result["spread"] == 0 and result["mean_distance"] == 0 and result["mean_update_norm"] > 0
    for line in result["lines"].values():  # flat: every point is the same recalibrated state
        assert line["barrier"] == pytest.approx(0, abs=1e-9)
        assert max(line["test_accuracy"]) - min(line["test_accuracy"]) < 1e-9
        assert max(line["test_loss"]) - min(line["test_loss"]) < 1e-5
        assert line["loss_barrier"] == pytest.approx(0, abs=1e-6)
        assert len(line["t"]) == len(line["test_accuracy"]) == 5 and line["t"][0] == 0 and line["t"][-1] == 1
    # One candidate twice: the soup is that candidate (recalibrated), and so is the ensemble.
    assert result["ensemble"]["accuracy"] == result["candidates"][0]["test_accuracy"]
    assert result["gain"] == pytest.approx(100 * (result["soup"]["test_accuracy"] - result["best_candidate"]))
    json.dumps(result)  # plain JSON


def test_spread_is_measured_on_the_updates_not_on_the_states():
    torch.manual_seed(0)
    start = {"w": torch.randn(50) * 10, "b": torch.randn(3)}
    d1 = {"w": torch.randn(50), "b": torch.zeros(3)}
    d2 = {"w": torch.randn(50), "b": torch.zeros(3)}
    candidates = [{k: start[k] + d[k] for k in start} for d in (d1, d2)]
    spread = update_spread(start, candidates, ["w", "b"])
    expected = float((d1["w"] - d2["w"]).norm()) / ((float(d1["w"].norm()) + float(d2["w"].norm())) / 2)
    assert spread["spread"] == pytest.approx(expected, rel=1e-6)
    # Orthogonal updates of equal norm: √2; opposite ones: 2.
    e1, e2 = torch.eye(2)
    zero = {"w": torch.zeros(2)}
    assert update_spread(zero, [{"w": e1}, {"w": e2}], ["w"])["spread"] == pytest.approx(2**0.5)
    assert update_spread(zero, [{"w": e1}, {"w": -e1}], ["w"])["spread"] == pytest.approx(2.0)


def test_norm_statistics_are_re_estimated_along_the_lines(setting):
    """Two candidates with the same weights but far-apart running statistics: with every
    point recalibrated the line is flat; interpolating the statistics instead is not."""
    model, mask, start, recalibrate, _ = setting
    candidate = trained(start, mask, seed=1, epochs=1)
    skewed = dict(candidate)
    for name in candidate:
        if name.endswith("running_var"):
            skewed[name] = candidate[name] * 400
        elif name.endswith("running_mean"):
            skewed[name] = candidate[name] + 5
    soup = recalibrate(candidate)
    result = diagnose(model, start, [candidate, skewed], soup, recalibrate)
    accuracies = result["lines"]["candidates"]["test_accuracy"]
    assert max(accuracies) - min(accuracies) < 1e-9 and result["lines"]["candidates"]["barrier"] == 0
    assert result["candidates"][1]["test_accuracy"] < result["candidates"][0]["test_accuracy"] - 0.1  # as given
    plain = diagnose(model, start, [candidate, skewed], soup, False)["lines"]["candidates"]["test_accuracy"]
    assert max(plain) - min(plain) > 0.1


def test_candidates_from_different_starts_have_a_clear_barrier(setting):
    model, _, _, recalibrate, dense = setting
    mask = dense_mask(model, prunable_names(model))
    a, b = dense, trained(fresh(1), mask, seed=1, epochs=3)  # seeds 0 and 1, 3 epochs each
    far = diagnose(model, fresh(0), [a, b], recalibrate(average([a, b], mask)), recalibrate)
    one_start = a
    c, d = trained(one_start, mask, seed=5, epochs=1), trained(one_start, mask, seed=6, epochs=1)
    near = diagnose(model, one_start, [c, d], recalibrate(average([c, d], mask)), recalibrate)
    assert far["lines"]["candidates"]["barrier"] > 5  # points of accuracy
    assert far["lines"]["candidates"]["barrier"] > near["lines"]["candidates"]["barrier"] + 5
    assert far["lines"]["candidates"]["loss_barrier"] > near["lines"]["candidates"]["loss_barrier"]
    assert far["gain"] < -5  # the soup of strangers loses to its best candidate
    assert far["spread"] > near["spread"]


def test_bad_input_names_the_fix(setting):
    model, mask, start, recalibrate, _ = setting
    with pytest.raises(FedSMSError, match="at least 2 candidates"):
        diagnose(model, start, [start], start, recalibrate)
    other = {k: v for k, v in start.items() if not k.endswith("running_mean")}
    with pytest.raises(FedSMSError, match="candidate 1 names other tensors.*same architecture"):
        diagnose(model, start, [start, other], start, recalibrate)
    wide = {**start, next(iter(mask)): torch.zeros(1, 2, 3)}
    with pytest.raises(FedSMSError, match="soup's .* has shape"):
        diagnose(model, start, [start, start], wide, recalibrate)
    with pytest.raises(FedSMSError, match="BatchNorm.*norm_recalibrator"):
        diagnose(model, start, [start, start], start, None)
    with pytest.raises(FedSMSError, match="points"):
        diagnose(model, start, [start, start], start, recalibrate, points=2)


def test_interpolation_keeps_integer_tensors_and_ends():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(9)}
    assert torch.equal(interpolate(a, b, 0.25)["w"], torch.tensor([1.0, 2.0]))
    assert int(interpolate(a, b, 0.5)["n"]) == 3
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])


LINE = re.compile(
    r"\[sms\] phase (\d) diagnostics: soup [\d.]+ %, best candidate [\d.]+ %, gain [+-][\d.]+, "
    r"ensemble [\d.]+ %, barrier [\d.]+ \(cand-cand [\d.]+\), spread [\d.]+"
)


def test_local_sms_writes_prints_and_plots_its_diagnostics(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["local", "--model", "cnn", "--phases", "2", "--candidates", "2", "--target-sparsity", "0.8"]
    argv += ["--pretrain-epochs", "1", "--retrain-epochs", "1", "--methods", "imp,sms", "--ood", "false"]
    assert main([*argv, "--device", "cpu", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [m.group(1) for m in LINE.finditer(printed)] == ["1", "2"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    sms = [r for r in rows if r["method"] == "sms"]
    assert [r["phase"] for r in sms] == [1, 2] and all("diagnostics" in r for r in sms)
    assert not any("diagnostics" in r for r in rows if r["method"] != "sms")
    for row in sms:
        d = row["diagnostics"]
        assert len(d["candidates"]) == 2 and d["soup"]["test_accuracy"] == pytest.approx(row["accuracy"])
        ensemble = next(r for r in rows if r["method"] == "ensemble" and r["phase"] == row["phase"])
        assert d["ensemble"]["accuracy"] == pytest.approx(ensemble["accuracy"])
        assert describe(d, f"[sms] phase {row['phase']}") in printed
    assert (out / "diagnostics_sms.png").stat().st_size > 0
    assert "sms" in phase_table(rows) and "diagnostics" not in summary(rows)["sms"]["1"]


def test_a_federated_hyperparameter_soup_writes_diagnostics_rows(tmp_path):
    lines = []
    strategy = make_strategy(tmp_path, model="cnn", log=lines.append, clients_per_round=3)
    strategy.start(LocalGrid(make_client_app(), partitions(3)))
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [bool(r["diagnostics"]) for r in rounds] == [False, True, True]  # dense round: none
    assert all(len(r["diagnostics"]["candidates"]) == 3 for r in rounds[1:])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [("diagnostics" in r) for r in rows] == [False, True, True]
    assert rows[-1]["diagnostics"]["soup"]["test_accuracy"] == pytest.approx(rows[-1]["accuracy"])
    assert sum(bool(re.search(r"\[fed-hyperparameter\] phase \d diagnostics: soup", x)) for x in lines) == 2
    assert (tmp_path / "diagnostics_fed-hyperparameter.png").is_file()


@pytest.mark.parametrize(("server_data", "diagnostics"), [(False, True), (True, False)])
def test_candidates_are_kept_only_for_diagnostics_on_a_server_with_data(tmp_path, server_data, diagnostics):
    strategy = make_strategy(tmp_path, server_data=server_data, run={"diagnostics": diagnostics})
    merges, new_merge = [], strategy.engine.merge
    strategy.engine.merge = lambda *args, **kwargs: merges.append(new_merge(*args, **kwargs)) or merges[-1]
    strategy.start(LocalGrid(make_client_app(), partitions(2)), num_rounds=2)
    assert len(merges) == 2 and all(m.candidates == [] for m in merges)
    assert strategy.rounds[-1].diagnostics == {}


def test_readme_example_runs_as_written(setting, capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("**Soup diagnostics.**") :], re.S).group(1)
    model, mask, start, _, _ = setting
    cands = [trained(start, mask, seed=s, epochs=1) for s in (1, 2)]
    data = digits()
    namespace = dict(
        model=model,
        train_data=data.train,
        start=start,
        cand_a=cands[0],
        cand_b=cands[1],
        cand_c=cands[0],
        soup=average(cands, mask),
        heldout=data.heldout,
        test=data.test,
    )
    exec(compile(code, "README.md", "exec"), namespace)
    assert "my soup diagnostics: soup" in capsys.readouterr().out
