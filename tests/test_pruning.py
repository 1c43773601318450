"""Masks: prunable tensors, schedule arithmetic, exact sparsity, nesting, enforcement,
digest, and torch.nn.utils.prune interop."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from fedsms import FedSMSError
from fedsms.masks import (
    MaskEnforcer,
    compute_mask,
    dense_mask,
    export_to_torch_prune,
    import_from_torch_prune,
    kept_count,
    mask_digest,
    pack_mask,
    prunable_names,
    prune_fraction_per_phase,
    sparsity,
    sparsity_after_phase,
    sparsity_report,
    unpack_mask,
)
from fedsms.models import build_model


def cnn():
    torch.manual_seed(0)
    return build_model("cnn", 10, (1, 8, 8))


def test_only_conv_and_linear_weights_are_prunable():
    model = cnn()
    names = prunable_names(model)
    assert names == ["net.features.0.weight", "net.features.3.weight", "net.features.7.weight", "net.classifier.weight"]
    assert prunable_names(model, keep_first_dense=True, keep_last_dense=True) == names[1:-1]


@pytest.mark.parametrize("target, phases", [(0.9, 3), (0.98, 5), (0.5, 1)])
def test_schedule_reaches_the_target_exactly(target, phases):
    q = prune_fraction_per_phase(target, phases)
    assert q == pytest.approx(1 - (1 - target) ** (1 / phases))
    assert sparsity_after_phase(target, phases, 0) == 0.0
    assert sparsity_after_phase(target, phases, 1) == pytest.approx(q)
    assert sparsity_after_phase(target, phases, phases) == pytest.approx(target)
    # each phase prunes q of what is left
    for p in range(1, phases + 1):
        left_before, left_after = (
            1 - sparsity_after_phase(target, phases, p - 1),
            1 - sparsity_after_phase(target, phases, p),
        )
        assert left_after == pytest.approx(left_before * (1 - q))


@pytest.mark.parametrize("target, phases", [(1.0, 3), (-0.1, 3), (0.5, 0)])
def test_schedule_refuses_bad_values(target, phases):
    with pytest.raises(FedSMSError):
        prune_fraction_per_phase(target, phases)


@pytest.mark.parametrize("method", ["global", "uniform", "random"])
def test_every_phase_hits_its_exact_count_and_masks_nest(method):
    model = cnn()
    params = dict(model.named_parameters())
    mask = dense_mask(model, prunable_names(model))
    total = sum(m.numel() for m in mask.values())
    for phase in range(1, 4):
        target = sparsity_after_phase(0.9, 3, phase)
        new = compute_mask(params, mask, target, method=method, generator=torch.Generator().manual_seed(phase))
        assert all(bool((new[n] <= mask[n]).all()) for n in mask)  # never regrows
        if method == "uniform":
            for keep in new.values():
                assert int(keep.sum()) == kept_count(keep.numel(), target)
        else:
            assert sum(int(m.sum()) for m in new.values()) == kept_count(total, target)
        mask = new
        with torch.no_grad():  # prune, then perturb survivors like retraining would
            for name, keep in mask.items():
                params[name].mul_(keep).add_(0.01 * torch.randn_like(params[name]) * keep)
    assert sparsity(mask) == pytest.approx(0.9, abs=1 / total)


def test_global_magnitude_keeps_the_largest_weights_even_with_ties():
    weights = {"a": torch.tensor([[3.0, -1.0, 2.0]]), "b": torch.tensor([2.0, 2.0, 2.0, 0.5])}
    mask = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    new = compute_mask(weights, mask, 3 / 7)  # keep 4 of 7: 3 and three of the four 2s
    assert int(sum(m.sum() for m in new.values())) == 4
    assert bool(new["a"][0, 0]) and not bool(new["a"][0, 1]) and not bool(new["b"][3])


def test_enforcer_keeps_pruned_weights_exactly_zero_through_sgd():
    model = cnn()
    mask = compute_mask(dict(model.named_parameters()), dense_mask(model, prunable_names(model)), 0.8)
    enforcer = MaskEnforcer(model, mask)
    enforcer.apply()
    kept_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for _ in range(5):
        loss = model(torch.rand(16, 1, 8, 8)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        enforcer.apply()
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
        assert not torch.equal(params[name][keep], kept_before[name][keep])


def test_report_digest_and_packing():
    model = cnn()
    mask = compute_mask(dict(model.named_parameters()), dense_mask(model, prunable_names(model)), 0.5)
    rows = sparsity_report(mask)
    assert rows[-1]["name"] == "total" and rows[-1]["nnz"] == sum(r["nnz"] for r in rows[:-1])
    assert rows[-1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    shapes = {n: tuple(m.shape) for n, m in mask.items()}
    assert all(torch.equal(a, b) for a, b in zip(unpack_mask(pack_mask(mask), shapes).values(), mask.values()))
    assert mask_digest(mask) == mask_digest({k: v.clone() for k, v in mask.items()})
    flipped = {k: v.clone() for k, v in mask.items()}
    first = next(iter(flipped))
    flipped[first].view(-1)[0] ^= True
    assert mask_digest(flipped) != mask_digest(mask)
    with pytest.raises(FedSMSError):
        unpack_mask(pack_mask(mask)[:-1], shapes)


def test_torch_prune_round_trip():
    model = cnn()
    x = torch.rand(4, 1, 8, 8)
    mask = compute_mask(dict(model.named_parameters()), dense_mask(model, prunable_names(model)), 0.7)
    export_to_torch_prune(model, mask)
    modules = dict(model.named_modules())
    assert hasattr(modules["net.classifier"], "weight_orig") and hasattr(modules["net.classifier"], "weight_mask")
    model.eval()
    masked_out = model(x)
    back = import_from_torch_prune(model)
    assert list(back) == list(mask) and all(torch.equal(back[n], mask[n]) for n in mask)
    assert "net.classifier.weight" in dict(model.named_parameters())  # plain parameters again
    torch.testing.assert_close(model(x), masked_out)
    # a model pruned by torch's own method imports too
    other = cnn()
    torch_prune.l1_unstructured(dict(other.named_modules())["net.classifier"], "weight", amount=0.5)
    imported = import_from_torch_prune(other)
    assert (
        list(imported) == ["net.classifier.weight"] and float(imported["net.classifier.weight"].float().mean()) == 0.5
    )


def test_masks_for_another_model_are_refused():
    with pytest.raises(FedSMSError, match="use a mask made for this model"):
        MaskEnforcer(nn.Sequential(nn.Linear(3, 2)), {"0.weight": torch.ones(5, 5, dtype=torch.bool)})
