import math

import pytest
import torch

from fedsms import FedSMSError
from fedsms.corruptions import CORRUPTIONS, corrupt
from fedsms.data import load_dataset
from fedsms.data.arrays import ArrayData
from fedsms.evaluate import (
    ensemble_logits,
    ensemble_metrics,
    evaluate,
    evaluate_ood,
    metrics_from_logits,
    predict_logits,
)
from fedsms.models import build_model

SEVERITIES = (1, 2, 3, 4, 5)


def logits_with_confidence(confidence: float, n: int) -> torch.Tensor:
    """Two-class logits whose softmax predicts class 0 with probability ``confidence``."""
    return torch.tensor([[math.log(confidence), math.log(1 - confidence)]]).repeat(n, 1)


@pytest.fixture(scope="module")
def digits() -> ArrayData:
    return load_dataset("digits").test.head(48)


@pytest.fixture(scope="module")
def images(digits) -> dict[str, torch.Tensor]:
    return {
        "digits": digits.float_images()[:16],
        "cifar": torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", 10, (1, 8, 8))


# ---- metrics -----------------------------------------------------------------------------


def test_accuracy_and_loss_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    m = metrics_from_logits(logits, labels)
    assert m["accuracy"] == pytest.approx(0.5)
    expected_loss = (
        sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())) / 4
    )
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_ece_of_perfectly_calibrated_predictions_is_zero():
    # confidence 0.7: 7 of 10 right; confidence 0.9: 9 of 10 right
    logits = torch.cat([logits_with_confidence(0.7, 10), logits_with_confidence(0.9, 10)])
    labels = torch.tensor([0] * 7 + [1] * 3 + [0] * 9 + [1] * 1)
    m = metrics_from_logits(logits, labels)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["accuracy"] == pytest.approx(0.8)


def test_ece_of_overconfident_predictions_matches_hand_computation():
    # 4 at confidence 0.9 with 2 right: |0.5 - 0.9| = 0.4; 4 at 0.7 all right: |1 - 0.7| = 0.3
    logits = torch.cat([logits_with_confidence(0.9, 4), logits_with_confidence(0.7, 4)])
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])
    m = metrics_from_logits(logits, labels)
    assert m["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.3, abs=1e-6)
    expected_loss = (2 * -math.log(0.9) + 2 * -math.log(0.1) + 4 * -math.log(0.7)) / 8
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["accuracy"] == pytest.approx(0.75)


def test_metrics_of_no_examples_raise():
    with pytest.raises(FedSMSError, match="no examples"):
        metrics_from_logits(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


# ---- corruptions -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["digits", "cifar"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_shape_range_and_severity_order(images, kind, name):
    x = images[kind]
    before = x.clone()
    diffs = []
    for severity in SEVERITIES:
        y = corrupt(x, name, severity, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert not torch.equal(y, x), f"{name} at severity {severity} left the images unchanged"
        diffs.append((y - x).abs().mean().item())
    assert torch.equal(x, before), "corrupt modified its input"
    assert diffs[-1] > diffs[0], f"{name}: severity 5 changes less than severity 1 ({diffs})"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_given_the_generator(images, name):
    x = images["cifar"]
    a = corrupt(x, name, 3, torch.Generator().manual_seed(7))
    b = corrupt(x, name, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    if name.endswith("_noise"):
        assert not torch.equal(a, corrupt(x, name, 3, torch.Generator().manual_seed(8)))


def test_corruptions_work_on_tiny_images():
    x = torch.rand(2, 2, 1, 3)
    for name in CORRUPTIONS:
        assert corrupt(x, name, 5, torch.Generator()).shape == x.shape


def test_brightness_of_grey_images_adds_to_every_channel():
    x = torch.full((1, 3, 2, 2), 0.4)
    x[..., 0, 0] = 0.0
    y = corrupt(x, "brightness", 5, torch.Generator())
    assert torch.allclose(y, x + 0.3)


def test_gaussian_blur_preserves_constant_images():
    x = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(corrupt(x, "gaussian_blur", 5, torch.Generator()), x)
    assert torch.allclose(corrupt(x, "defocus_blur", 5, torch.Generator()), x)


def test_bad_corruption_name_or_severity_names_the_choices(images):
    x = images["digits"]
    with pytest.raises(ValueError, match="gaussian_noise") as info:
        corrupt(x, "fog", 1, torch.Generator())
    assert isinstance(info.value, FedSMSError)
    for severity in (0, 6, 2.5):
        with pytest.raises(FedSMSError, match="1, 2, 3, 4, 5"):
            corrupt(x, "contrast", severity, torch.Generator())
    model = make_model(0)
    with pytest.raises(FedSMSError, match="brightness"):
        evaluate_ood(model, ArrayData(x, torch.zeros(len(x), dtype=torch.long)), corruptions=("snow",))


# ---- evaluation of a model ---------------------------------------------------------------


def test_predict_logits_batches_and_restores_mode(digits):
    model = make_model(0)
    model.train()
    whole = predict_logits(model, digits, batch_size=512)
    assert model.training and all(m.training for m in model.modules())
    assert whole.shape == (len(digits), 10) and whole.dtype == torch.float32
    assert torch.allclose(predict_logits(model, digits, batch_size=7), whole, atol=1e-6)
    model.eval()
    predict_logits(model, digits)
    assert not model.training


def test_evaluate_matches_metrics_of_a_direct_forward_pass(digits):
    model = make_model(0)
    with torch.no_grad():
        expected = metrics_from_logits(model(digits.float_images()), digits.labels)
    got = evaluate(model, digits, batch_size=16)
    assert got.keys() == {"accuracy", "loss", "ece"}
    for key in got:
        assert got[key] == pytest.approx(expected[key], abs=1e-5)


def test_evaluate_ood_structure_and_determinism(digits):
    model = make_model(0)
    result = evaluate_ood(model, digits, batch_size=32, seed=3)
    assert set(result["per_corruption"]) == set(CORRUPTIONS)
    accuracies = [a for per in result["per_corruption"].values() for a in per.values()]
    assert all(set(per) == set(SEVERITIES) for per in result["per_corruption"].values())
    assert result["ood_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert 0.0 <= result["ood_ece"] <= 1.0
    assert evaluate_ood(model, digits, batch_size=32, seed=3) == result

    noisy = ("gaussian_noise", 5)
    a = predict_logits(model, digits, corruption=noisy, seed=3)
    assert torch.equal(a, predict_logits(model, digits, corruption=noisy, seed=3))
    assert not torch.equal(a, predict_logits(model, digits, corruption=noisy, seed=4))


def test_evaluate_ood_max_examples_and_subsets(digits):
    model = make_model(1)
    small = evaluate_ood(model, digits, corruptions=("contrast", "shot_noise"), severities=(2, 5), max_examples=10)
    assert small == evaluate_ood(model, digits.head(10), corruptions=("contrast", "shot_noise"), severities=(2, 5))
    assert set(small["per_corruption"]) == {"contrast", "shot_noise"}
    assert set(small["per_corruption"]["contrast"]) == {2, 5}


# ---- prediction ensemble -----------------------------------------------------------------


def test_ensemble_of_identical_models_equals_the_model(digits):
    model = make_model(0)
    single = evaluate(model, digits)
    ensemble = ensemble_metrics([model, make_model(0), model], digits)
    assert ensemble.keys() == single.keys()
    for key in single:
        assert ensemble[key] == pytest.approx(single[key], abs=1e-5)
    kwargs = dict(corruptions=("impulse_noise", "brightness"), severities=(1, 4), seed=5)
    single_ood = evaluate_ood(model, digits, **kwargs)
    ensemble_ood_ = ensemble_metrics([model, model], digits, ood=True, **kwargs)
    assert ensemble_ood_["per_corruption"] == single_ood["per_corruption"]
    assert ensemble_ood_["ood_ece"] == pytest.approx(single_ood["ood_ece"], abs=1e-5)


def test_ensemble_averages_probabilities(digits):
    models = [make_model(0), make_model(1)]
    with torch.no_grad():
        probs = torch.stack([m(digits.float_images()).softmax(1) for m in models]).mean(0)
    assert torch.allclose(ensemble_logits(models, digits).exp(), probs, atol=1e-6)
    expected = metrics_from_logits(probs.log(), digits.labels)
    got = ensemble_metrics(models, digits, batch_size=10)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-5)
    with pytest.raises(FedSMSError, match="at least one model"):
        ensemble_metrics([], digits)
