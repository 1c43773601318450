"""The GPU-ready training path, checked on the CPU: the seeded batch order survives the
device-side draws, the fit rule of device-resident data, bf16 autocast and the
channels-last layout under the mask, and refusals of unknown settings."""

import copy

import pytest
import torch
from helpers import digits

from fedsms import FedSMSError
from fedsms.data.arrays import ArrayData, Augmentation, batches, generator_on, resident, to_device
from fedsms.masks import compute_mask, dense_mask, outside_mask_nonzeros, prunable_names
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.training import autocast_for, train_candidate

pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_cnn(sparsity: float = 0.8):
    torch.manual_seed(0)
    model = build_for("cnn", digits())
    mask = compute_mask(dict(model.named_parameters()), dense_mask(model, prunable_names(model)), sparsity)
    return model, mask


def test_batches_of_host_data_keep_the_order_and_shifts_the_seed_always_gave():
    n, pad = 40, 1
    data = ArrayData(torch.arange(n * 16, dtype=torch.uint8).view(n, 1, 4, 4), torch.arange(n))
    got = list(batches(data, 8, shuffle=True, generator=torch.Generator().manual_seed(3), augment=Augmentation(pad)))
    # The order and shifts as drawn straight from the caller's generator, in the batches' sequence.
    reference = torch.Generator().manual_seed(3)
    order = torch.randperm(n, generator=reference)
    for start, (x, y) in zip(range(0, n, 8), got):
        idx = order[start : start + 8]
        assert torch.equal(y, idx)
        expected = Augmentation(pad)(data.inputs(idx), reference)
        assert torch.equal(x, expected)


def test_a_generator_already_on_the_device_is_used_as_it_is():
    generator = torch.Generator().manual_seed(0)
    assert generator_on("cpu", generator) is generator
    batch = torch.ones(3, 2)
    assert to_device(batch, "cpu") is batch  # no copy where the batch already is


def test_data_too_large_for_the_devices_free_memory_stays_on_the_host(monkeypatch):
    data = ArrayData(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), torch.zeros(100, dtype=torch.long))
    size = data.images.nbytes + data.labels.nbytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * size - 1, 10 * size))
    assert resident(data, "cuda", fraction=0.25) is data  # 0.25 × free is one byte short
    assert resident(data, "cpu") is data
    loader = [(data.images, data.labels)]
    assert resident(loader, "cuda") is loader  # only in-memory arrays are moved


def test_bf16_autocast_trains_under_the_mask_and_changes_the_arithmetic():
    model, mask = pruned_cnn()
    config = CandidateConfig(epochs=1, batch_size=32, seed=1)
    data = digits().train.head(200)
    trained = {}
    for precision in ("fp32", "bf16"):
        candidate = copy.deepcopy(model)
        result = train_candidate(candidate, mask, data, config, precision=precision)
        assert torch.isfinite(torch.tensor(result["train_loss"]))
        assert outside_mask_nonzeros(candidate.state_dict(), mask) == {}
        trained[precision] = candidate.state_dict()
    differs = [k for k in mask if not torch.equal(trained["fp32"][k], trained["bf16"][k])]
    assert differs, "bf16 autocast left every weight as fp32 training made it"


def test_channels_last_training_matches_the_usual_layout_and_hands_back_contiguous_weights():
    model, mask = pruned_cnn()
    config = CandidateConfig(epochs=1, batch_size=32, seed=2)
    data = digits().train.head(200)
    usual, last = copy.deepcopy(model), copy.deepcopy(model)
    train_candidate(usual, mask, data, config)
    train_candidate(last, mask, data, config, channels_last=True)
    assert outside_mask_nonzeros(last.state_dict(), mask) == {}
    for name, value in last.state_dict().items():
        assert value.is_contiguous(), f"{name} came back in the channels-last layout"
        torch.testing.assert_close(value, usual.state_dict()[name], rtol=1e-4, atol=1e-5)


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(FedSMSError, match="auto, fp32, bf16"):
        autocast_for(torch.device("cpu"), "fp8")
