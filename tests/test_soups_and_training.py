"""Retraining under a mask, soups of candidates, the greedy rule, norm recalibration,
recipes and checkpoints: the invariants Sparse Model Soups rests on."""

import copy
import json

import pytest
import torch
from helpers import digits

from fedsms import FedSMSError
from fedsms.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedsms.data import ArrayData
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_for
from fedsms.norms import recalibrate_norms
from fedsms.recipe import CandidateConfig, expand_recipe, parse_grid
from fedsms.soup import RunningAverage, SoupError, average, greedy_soup
from fedsms.training import lr_factor, make_optimizer, resolve_device, train_candidate

pytestmark = pytest.mark.usefixtures("one_thread")


def small_data() -> ArrayData:
    return digits().train.head(300)


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = build_for("cnn", digits())
    mask = compute_mask(dict(model.named_parameters()), dense_mask(model, prunable_names(model)), 0.8)
    state = {k: v * mask[k] if k in mask else v.clone() for k, v in model.state_dict().items()}
    return model, mask, state


def candidates(pruned, seeds, epochs=1):
    model, mask, state = pruned
    states = []
    for config in (CandidateConfig(seed=seed, epochs=epochs, batch_size=32) for seed in seeds):
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(state)
        train_candidate(candidate, mask, small_data(), config)
        states.append(candidate.state_dict())
    return states


def test_lr_schedules():
    assert lr_factor(0, 100, "linear", 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, "linear", 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, "linear", 10) == pytest.approx(1 / 90, abs=1e-9)
    assert lr_factor(55, 100, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(70, 100, "constant", 10) == 1.0


def test_nesterov_only_with_weight_decay(pruned):
    model = pruned[0]
    assert make_optimizer(model, CandidateConfig(weight_decay=1e-4)).defaults["nesterov"] is True
    assert make_optimizer(model, CandidateConfig(weight_decay=0.0)).defaults["nesterov"] is False


def test_zeros_stay_zero_through_training_and_averaging(pruned):
    _, mask, _ = pruned
    states = candidates(pruned, [0, 1, 2])
    soup = average(states, mask)
    for name, keep in mask.items():
        for state in [*states, soup]:
            assert torch.count_nonzero(state[name][~keep]) == 0
        torch.testing.assert_close(soup[name], torch.stack([s[name] for s in states]).mean(0))


def test_same_seed_same_weights_other_seed_other_weights(pruned):
    a, b = candidates(pruned, [0, 0]), candidates(pruned, [0, 1])
    name = prunable_names(pruned[0])[0]
    assert torch.equal(a[0][name], a[1][name])
    assert torch.equal(a[0][name], b[0][name]) and not torch.equal(b[0][name], b[1][name])


def test_training_learns_and_divergence_is_reported(pruned):
    model, mask, state = pruned
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    result = train_candidate(model, mask, digits().train, CandidateConfig(epochs=3, lr=0.05))
    assert result["train_accuracy"] > 0.8
    poisoned = ArrayData(torch.full_like(small_data().images, float("nan")), small_data().labels)
    with pytest.raises(FedSMSError, match="lower the learning rate"):
        train_candidate(model, mask, poisoned, CandidateConfig(epochs=1))


def test_cuda_on_a_cpu_machine_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FedSMSError, match="--device cpu"):
        resolve_device("cuda")


def test_refusals_of_the_soup(pruned):
    _, mask, state = pruned
    outside = {k: v.clone() for k, v in state.items()}
    name = next(iter(mask))
    outside[name][~mask[name]] = 1.0
    with pytest.raises(SoupError, match=f"outside the shared mask in '{name}'"):
        average([state, outside], mask)
    with pytest.raises(SoupError, match="lacks the masked tensors"):
        average([state, {k: v for k, v in state.items() if k != name}], mask)


def test_weighted_running_average_and_integer_buffers():
    average_ = RunningAverage()
    average_.add({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, weight=1)
    average_.add({"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}, weight=3)
    mean = average_.mean()
    torch.testing.assert_close(mean["w"], torch.tensor([2.5, 5.0]))
    assert int(mean["n"]) == 5


def closeness(target: float):
    """A held-out score that is best when w[0] is near ``target``."""
    return lambda state: -abs(float(state["w"][0]) - target)


def scalars(*values: float) -> list[dict]:
    return [{"w": torch.tensor([v, 0.5])} for v in values]


MASK = {"w": torch.tensor([True, True])}


def test_greedy_ranks_an_unsorted_list_and_leaves_out_what_lowers_the_score():
    # ranked 1.0, 0.75, 0.2, 0.0 (the best is third in the list); adding 0.75 gives 0.875
    # (better), then 0.2 -> 0.65 and 0.0 -> 0.58 (worse: left out)
    soup, chosen, scores = greedy_soup(scalars(0.0, 0.75, 1.0, 0.2), MASK, closeness(0.9))
    assert chosen == [2, 1]
    torch.testing.assert_close(soup["w"], torch.tensor([0.875, 0.5]))
    assert scores == pytest.approx([-0.9, -0.15, -0.1, -0.7])


def test_greedy_keeps_a_candidate_that_leaves_the_score_unchanged():
    def accuracy(state):  # held-out accuracy is coarse: many soups tie
        return 1.0 if 0.5 <= float(state["w"][0]) <= 1.5 else 0.0

    soup, chosen, _ = greedy_soup(scalars(1.0, 0.6, 5.0), MASK, accuracy)
    assert chosen == [0, 1]  # 0.6 ties (soup 0.8 still scores 1.0): kept; 5.0 would drop it: left out
    torch.testing.assert_close(soup["w"], torch.tensor([0.8, 0.5]))


def test_greedy_ties_in_the_ranking_keep_the_candidates_order():
    soup, chosen, _ = greedy_soup(scalars(0.5, 1.2, 1.2), MASK, closeness(0.9))
    # the two 1.2 tie for first (list order), their soup ties with either (kept), 0.5 improves it
    assert chosen == [1, 2, 0]
    torch.testing.assert_close(soup["w"], torch.tensor([2.9 / 3, 0.5]))


def test_best_of_m_keeps_the_best_candidate_unaveraged_and_unrecalibrated():
    from fedsms.engine import PhaseHooks, SoupEngine

    calls = []
    hooks = PhaseHooks(recalibrate=lambda state, step: calls.append(step) or state, heldout_score=closeness(0.9))
    engine = SoupEngine({"w": torch.zeros(2)}, MASK, hooks=hooks)
    merge = engine.merge("best")
    for state in scalars(0.0, 0.75, 1.0, 1.0):
        merge.add(state, 10)
    engine.end_round(merge)
    assert engine.end_phase(1, merge) == [2]
    torch.testing.assert_close(engine.state["w"], torch.tensor([1.0, 0.5]))
    assert calls == []


def test_recalibration_restores_the_mode_and_the_momentum(pruned):
    model = copy.deepcopy(pruned[0])
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    layer.running_mean.fill_(100.0)
    model.eval()
    used = recalibrate_norms(model, small_data(), fraction=0.5)
    assert used == 150 and not model.training and layer.momentum == 0.1
    # that the statistics are the right ones is tests/test_recalibration.py's business


def test_recipe_grid_and_errors():
    configs = expand_recipe("weight_decay=1e-4,5e-4;lr=0.1,0.05", 5, CandidateConfig(seed=7))
    assert [(c.weight_decay, c.lr) for c in configs] == [
        (1e-4, 0.1),
        (1e-4, 0.05),
        (5e-4, 0.1),
        (5e-4, 0.05),
        (1e-4, 0.1),
    ]
    assert [c.seed for c in configs] == [7, 8, 9, 10, 11]
    with pytest.raises(FedSMSError, match="unknown recipe key 'momentumm'"):
        parse_grid("momentumm=0.9")
    with pytest.raises(FedSMSError, match="'lr' must be a float"):
        parse_grid("lr=fast")


def test_checkpoint_round_trip_and_refusals(pruned, tmp_path):
    model, mask, state = pruned
    path = save_checkpoint(tmp_path / "c", state, mask, {"model": "cnn", "phase": 2})
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.metadata["phase"] == 2 and all(torch.equal(loaded.state[k], state[k]) for k in state)
    fresh = build_for("cnn", digits())
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(path))  # plain PyTorch loading
    check_compatible(loaded, fresh)
    with pytest.raises(FedSMSError, match="saved for 'cnn'"):
        check_compatible(loaded, build_for("mlp", digits()))
    meta = json.loads((tmp_path / "c.json").read_text())
    meta["mask_digest"] = "0" * 64
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.raises(FedSMSError, match="does not match the digest"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(FedSMSError, match="is missing"):
        load_checkpoint(tmp_path / "nothing")
    outside = {k: v.clone() for k, v in state.items()}
    name = next(iter(mask))
    outside[name][~mask[name]] = 1.0
    save_checkpoint(tmp_path / "d", state, mask, {})
    from safetensors.torch import save_file

    save_file(outside, tmp_path / "d.safetensors")
    with pytest.raises(FedSMSError, match="modified after saving"):
        load_checkpoint(tmp_path / "d")
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    ("fallback", "tolerance", "kept", "w0"),
    [
        ("greedy", 0.05, [2, 3, 1], 2.75 / 3),  # the soup (0.6875) is 0.11 below the best (1.0): greedy soup
        ("best", 0.05, [2], 1.0),
        ("greedy", 0.2, [0, 1, 2, 3], 0.6875),  # within the tolerance: the soup stays
    ],
)
def test_a_soup_that_loses_to_its_best_candidate_falls_back(fallback, tolerance, kept, w0):
    from fedsms.engine import PhaseHooks, SoupEngine, SoupGuard

    lines = []
    hooks = PhaseHooks(heldout_score=closeness(0.9))
    engine = SoupEngine(
        {"w": torch.zeros(2)}, MASK, hooks=hooks, guard=SoupGuard(fallback, tolerance), log=lines.append
    )
    merge = engine.merge("uniform")
    for state in scalars(0.0, 0.75, 1.0, 1.0):
        merge.add(state, 10)
    engine.end_round(merge)
    assert engine.end_phase(3, merge) == kept
    torch.testing.assert_close(engine.state["w"], torch.tensor([w0, 0.5]))
    if len(kept) < 4:
        assert engine.fallback == {
            "rule": fallback,
            "soup": pytest.approx(-0.2125),
            "best": pytest.approx(-0.1),
            "kept": kept,
        }
        assert any(f"falling back to the {fallback} soup" in line for line in lines)
    else:
        assert engine.fallback is None and not lines


def test_the_guard_keeps_the_soup_without_held_out_data_or_when_off():
    from fedsms.engine import SoupEngine, SoupGuard

    for engine in (
        SoupEngine({"w": torch.zeros(2)}, MASK, guard=SoupGuard()),  # no held-out score: cannot act
        SoupEngine({"w": torch.zeros(2)}, MASK, guard=SoupGuard.of("off", 0.01)),
    ):
        merge = engine.merge("uniform")
        assert not merge.candidates  # nothing kept for a guard that cannot act
        for state in scalars(0.0, 1.0):
            merge.add(state, 10)
        engine.end_round(merge)
        assert engine.end_phase(1, merge) == [0, 1] and engine.fallback is None
    with pytest.raises(FedSMSError, match="use greedy, best or off"):
        SoupGuard("uniform", 0.01)
