"""Model registry: output shapes, parameter counts, state dicts, prunable weights, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.masks import prunable_names
from fedsms.models import Normalize, build_model
from fedsms.models.resnet import cifar_resnet, wide_resnet

CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)
NUM_CLASSES = 7  # not 10, so a hard-coded head size would show

# Every registry name on the input shapes it is meant for; the CIFAR nets also on digits,
# since they take any channel count.
CASES = [
    ("mlp", DIGITS),
    ("mlp-64", (1, 1, 40)),  # MNIST-1D signals
    ("cnn1d", (1, 1, 40)),
    ("cnn1d-8", (2, 1, 37)),  # any channel count and odd lengths
    ("resnet1d-8", (1, 1, 40)),
    ("resnet1d-14", (3, 1, 17)),
    ("cnn", DIGITS),
    ("cnn", CIFAR),
    ("resnet20", CIFAR),
    ("resnet20", DIGITS),
    ("resnet56", CIFAR),
    ("wrn-16-4", CIFAR),
    ("wrn-10-1", DIGITS),
    ("tv:resnet18", CIFAR),
]
IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape in CASES]


def images(shape: tuple[int, int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One model per case, built once (tv:resnet18 and wrn-16-4 have millions of weights)."""
    torch.manual_seed(0)
    return {case_id: build_model(name, NUM_CLASSES, shape) for case_id, (name, shape) in zip(IDS, CASES)}


# --- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", IDS)
def test_output_shape_in_train_and_eval_mode(models, case_id):
    model = models[case_id]
    shape = CASES[IDS.index(case_id)][1]
    x = images(shape)
    with torch.no_grad():
        for train in (True, False):
            model.train(train)
            out = model(x)
            assert out.shape == (2, NUM_CLASSES)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "wrn-10-2"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, CIFAR)
    loss = nn.functional.cross_entropy(model(images(CIFAR, batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_classifier_normalises_its_input():
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = build_model("resnet20", NUM_CLASSES, CIFAR, mean=mean, std=std).eval()
    x = images(CIFAR)
    expected = model.net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    # Without statistics the builder normalises with mean 0, std 1: the identity.
    plain = build_model("cnn", NUM_CLASSES, DIGITS).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images(DIGITS)), plain.net(images(DIGITS)))


def test_wide_resnet_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = wide_resnet(10, 1, NUM_CLASSES, dropout=0.5)
    x = images(CIFAR, batch=4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        # Train mode with BN in eval isolates dropout as the only source of randomness.
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train()
        assert not torch.allclose(model(x), model(x))


# --- sizes and init ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        # He et al. report 0.27 M / 0.85 M with option-A (parameter-free) shortcuts: 269,722 and
        # 853,018. Option-B projections add 16*32 + 32*64 conv weights and 2*(32 + 64) BN
        # parameters = 2,752.
        ("resnet20", 269_722 + 2_752),
        ("resnet56", 853_018 + 2_752),
        # WRN-16-4: 2.7 M in Zagoruyko & Komodakis (Table 1), exact count of the reference code.
        ("wrn-16-4", 2_748_890),
    ],
)
def test_parameter_counts_for_cifar10(name, expected):
    assert param_count(build_model(name, 10, CIFAR)) == expected


def test_convs_have_kaiming_init_and_batchnorm_starts_as_identity():
    torch.manual_seed(0)
    model = cifar_resnet(56, 10)
    # 16 -> 32 channels, so fan-out mode (torchvision's choice) differs from fan-in by sqrt(2);
    # 4,608 weights estimate the std to about 1 %.
    conv = model.layer2[0].conv1
    fan_out = conv.out_channels * math.prod(conv.kernel_size)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, nn.Conv2d):
            assert module.bias is None  # BatchNorm supplies the shift


def test_depth_sets_blocks_per_stage():
    for depth in (20, 56):
        model = cifar_resnet(depth, 10)
        assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [(depth - 2) // 6] * 3
    wrn = wide_resnet(28, 2, 10)
    assert [len(stage) for stage in (wrn.layer1, wrn.layer2, wrn.layer3)] == [4, 4, 4]
    assert wrn.fc.in_features == 64 * 2


# --- state dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", IDS)
def test_state_dict_has_no_normalisation_buffers_and_round_trips(models, case_id):
    name, shape = CASES[IDS.index(case_id)]
    model = models[case_id].eval()
    state = model.state_dict()
    assert state and all(key.startswith("net.") for key in state), [k for k in state if not k.startswith("net.")]
    # The buffers exist on the module (they move with .to()) but are not saved.
    assert {n for n, _ in model.named_buffers()} >= {"normalize.mean", "normalize.std"}

    torch.manual_seed(1)  # a differently initialised fresh model
    fresh = build_model(name, NUM_CLASSES, shape)
    fresh.load_state_dict(state)  # strict: same keys, same shapes
    fresh.eval()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = images(shape)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_normalize_buffers_are_not_persistent():
    norm = Normalize((0.5,), (0.25,))
    assert norm.state_dict() == {}
    torch.testing.assert_close(norm(torch.full((1, 1, 2, 2), 0.75)), torch.ones(1, 1, 2, 2))


# --- prunable weights -------------------------------------------------------------------------


def conv_and_linear_weights(model: nn.Module) -> list[str]:
    return [
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]


@pytest.mark.parametrize("case_id", IDS)
def test_prunable_names_are_exactly_the_conv_and_linear_weights(models, case_id):
    model = models[case_id]
    names = prunable_names(model)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert names and len(set(names)) == len(names)
    assert set(names) == set(conv_and_linear_weights(model))
    for name in names:
        assert name.endswith(".weight") and "normalize" not in name
        assert isinstance(modules[name.removesuffix(".weight")], (nn.Conv1d, nn.Conv2d, nn.Linear)), name
        assert params[name].dim() in (2, 3, 4)
    # Never a bias or a norm-layer parameter.
    norm_params = {
        f"{module_name}.{p}"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
        for p, _ in module.named_parameters(recurse=False)
    }
    assert not set(names) & norm_params
    assert not any(name.endswith(".bias") for name in names)
    # Parameter order, which defines the wire order.
    order = list(params)
    assert names == sorted(names, key=order.index)


@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet20", 1 + 18 + 2 + 1),  # stem, 9 blocks x 2 convs, 2 projections, head
        ("resnet56", 1 + 54 + 2 + 1),
        ("wrn-16-4", 1 + 12 + 3 + 1),  # stem, 6 blocks x 2 convs, 3 projections (16 -> 64 too), head
    ],
)
def test_prunable_tensor_counts(name, count):
    names = prunable_names(build_model(name, 10, CIFAR))
    assert len(names) == count
    assert names[0] == "net.conv1.weight" and names[-1] == "net.fc.weight"


@pytest.mark.parametrize(
    "name, kinds",
    [
        ("cnn1d", ["Conv1d"] * 3 + ["Linear"]),
        ("resnet1d-8", ["Conv1d"] * (1 + 6 + 2) + ["Linear"]),  # stem, 3 blocks x 2 convs, 2 projections
        ("resnet1d-14", ["Conv1d"] * (1 + 12 + 2) + ["Linear"]),
    ],
)
def test_signal_nets_convolve_along_the_signal_only(name, kinds):
    """Every prunable weight of a 1-D net is a Conv1d or Linear one, so none is wasted on padding."""
    model = build_model(name, 10, (1, 1, 40))
    modules = dict(model.named_modules())
    names = prunable_names(model)
    assert [type(modules[n.removesuffix(".weight")]).__name__ for n in names] == kinds
    assert all(p.ndim in (2, 3) for n, p in model.named_parameters() if n in names)


def test_signal_cnn_sees_where_along_the_signal_a_feature_is():
    """No global pooling: a shifted copy of a signal gives other logits."""
    torch.manual_seed(0)
    model = build_model("cnn1d", 10, (1, 1, 40)).eval()
    x = torch.zeros(1, 1, 1, 40)
    x[..., 5] = 1.0
    assert not torch.allclose(model(x), model(torch.roll(x, 20, dims=-1)))


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, fix",
    [
        ("resnet18", CIFAR, "resnet20"),  # only the CIFAR depths are registered by name
        ("vgg", CIFAR, "tv:TORCHVISION_NAME"),
        ("tv:not_a_model", CIFAR, "list_models()"),
        ("tv:resnet18", DIGITS, "resnet20"),
        ("tv:resnet18", (4, 32, 32), "any channel count"),
        ("wrn-15-4", CIFAR, "6n+4"),
        ("wrn-16-0", CIFAR, "wrn-16-4"),
        ("resnet1d-9", (1, 1, 40), "resnet1d-DEPTH"),
        ("cnn1d-0", (1, 1, 40), "cnn1d-WIDTH"),
    ],
)
def test_registry_errors_name_the_fix(name, shape, fix):
    with pytest.raises(FedSMSError, match="use|see|pick") as error:
        build_model(name, NUM_CLASSES, shape)
    assert fix in str(error.value)


@pytest.mark.parametrize("depth", [2, 19, 21, 57])
def test_cifar_resnet_rejects_depth_not_6n_plus_2(depth):
    with pytest.raises(FedSMSError, match=r"6n\+2") as error:
        cifar_resnet(depth, 10)
    assert str(depth) in str(error.value) and "20" in str(error.value)


@pytest.mark.parametrize("depth", [4, 15, 20, 27])
def test_wide_resnet_rejects_depth_not_6n_plus_4(depth):
    with pytest.raises(FedSMSError, match=r"6n\+4") as error:
        wide_resnet(depth, 2, 10)
    assert str(depth) in str(error.value) and "wrn-16-4" in str(error.value)


def test_wide_resnet_rejects_bad_dropout():
    with pytest.raises(FedSMSError, match="dropout"):
        wide_resnet(16, 4, 10, dropout=1.0)


def test_mlp_width_comes_from_its_name():
    model = build_model("mlp-64", NUM_CLASSES, (1, 1, 40))
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(40, 64), (64, 64), (64, NUM_CLASSES)]
    with pytest.raises(FedSMSError, match="mlp-WIDTH"):
        build_model("mlp-wide", NUM_CLASSES, DIGITS)
