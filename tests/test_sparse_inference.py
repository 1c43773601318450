"""Sparse inference: the replaced layers compute the dense model's outputs, the measured
plan decides what is replaced, and a recorded plan replays (fedsms.sparse_inference)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.models import build_model
from fedsms.sparse_inference import (
    SparseConv,
    SparseLinear,
    SparseMultiheadAttention,
    SparsePlan,
    apply_plan,
    format_plan,
    sparsify,
)

ALWAYS = 1e9  # a margin every sparse kernel beats: every candidate layer is replaced
NEVER = 1e-9  # a margin no sparse kernel beats

BUILT_IN = [
    ("mlp", (1, 8, 8)),
    ("cnn", (1, 8, 8)),
    ("resnet20", (3, 32, 32)),
    ("cnn1d", (1, 1, 40)),
    ("tv:resnet18", (3, 32, 32)),
]


def prune(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    """Zero a random ``sparsity`` of every weight matrix and kernel (attention projections too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.masked_fill_(torch.rand(param.shape, generator=generator) < sparsity, 0.0)
    return model.eval()


def encoder(batch_first: bool = True) -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def replaced(model: nn.Module) -> int:
    return sum(isinstance(m, (SparseLinear, SparseConv, SparseMultiheadAttention)) for m in model.modules())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("name, shape", BUILT_IN)
@pytest.mark.parametrize("batch", [1, 3])  # one row takes torch.mv, more take addmm
def test_sparse_layers_compute_the_dense_outputs(name, shape, batch, one_thread):
    torch.manual_seed(0)
    model = prune(build_model(name, 10, shape))
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        dense = model(x)
        plan = sparsify(model, x, margin=ALWAYS, repeats=1)
        sparse = model(x)
    assert replaced(model) == len(plan.layers) > 0 and all(c.kernel == "csr" for c in plan.layers)
    assert not any(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) for m in model.modules())  # all of them ran sparse
    assert close(sparse, dense)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_transformer_encoder_runs_sparse_with_its_padding_mask(batch_first, one_thread):
    torch.manual_seed(0)
    model = prune(encoder(batch_first))
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        dense, dense_padded = model(x), model(x, src_key_padding_mask=padding)
        plan = sparsify(model, x, margin=ALWAYS, repeats=1)
        sparse, sparse_padded = model(x), model(x, src_key_padding_mask=padding)
    kinds = sorted({c.kind for c in plan.layers})
    assert kinds == ["attention", "linear"]
    assert replaced(model) == 2 * (1 + 2 + 2)  # per layer: the attention, its two projections, the feed-forward
    assert all(
        isinstance(m.self_attn.in_proj, SparseLinear) and isinstance(m.self_attn.out_proj, SparseLinear)
        for m in model.layers
    )
    assert close(sparse, dense)
    keep = ~padding.T.unsqueeze(-1) if not batch_first else ~padding.unsqueeze(-1)  # padded positions are undefined
    assert close(sparse_padded * keep, dense_padded * keep)


@pytest.mark.parametrize("sparse_in, sparse_out", [(True, True), (True, False), (False, True), (False, False)])
def test_attention_matches_multihead_attention_with_masks_and_weights(sparse_in, sparse_out):
    torch.manual_seed(0)
    attention = prune(nn.MultiheadAttention(16, 4))
    sparse = SparseMultiheadAttention(attention, sparse_in, sparse_out)
    q, kv = torch.randn(5, 2, 16), torch.randn(6, 2, 16)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.ones(5, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for args, kwargs in (
            ((q, q, q), {}),
            ((q, kv, kv), {"key_padding_mask": padding}),
            ((q, kv, kv), {"attn_mask": causal, "average_attn_weights": False}),
            ((q[:, 0], kv[:, 0], kv[:, 0]), {"attn_mask": causal.float() * -1e4}),  # unbatched, additive mask
        ):
            out, weights = attention(*args, **kwargs)
            got, got_weights = sparse(*args, **kwargs)
            assert close(got, out) and close(got_weights, weights)


def test_nothing_is_replaced_where_no_sparse_kernel_wins(one_thread):
    model = prune(build_model("cnn", 10, (1, 8, 8)))
    before = [type(m) for m in model.modules()]
    plan = sparsify(model, torch.rand(2, 1, 8, 8), margin=NEVER, repeats=1)
    assert [type(m) for m in model.modules()] == before and {c.kernel for c in plan.layers} == {"dense"}
    assert all(c.dense_ms > 0 and c.sparse_ms > 0 for c in plan.layers)


def test_dense_layers_are_not_candidates(one_thread):
    model = build_model("mlp", 10, (1, 8, 8)).eval()
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    prune(model.get_submodule(first))  # only the first layer has zeros
    plan = sparsify(model, torch.rand(2, 1, 8, 8), margin=ALWAYS, repeats=1)
    assert [c.name for c in plan.layers] == [first]


def test_a_recorded_plan_replays_without_measuring(one_thread):
    torch.manual_seed(0)
    model = prune(encoder())
    measured = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)
    only = ["layers.0.self_attn", "layers.1.linear1", "layers.1.linear2"]
    plan = sparsify(measured, x, margin=ALWAYS, repeats=1, only=only)
    record = json.loads(json.dumps(plan.to_dict()))
    assert SparsePlan.from_dict(record) == plan
    record["layers"][1]["kernel"] = "dense"  # as if dense had won for layers.1.linear1
    record["layers"][0]["detail"]["out_proj"]["kernel"] = "dense"
    with torch.no_grad():
        dense = model(x)
        apply_plan(model, record)
        assert close(model(x), dense)
    attention = model.layers[0].self_attn
    assert isinstance(attention.in_proj, SparseLinear) and isinstance(attention.out_proj, nn.Linear)
    assert isinstance(model.layers[1].linear2, SparseLinear) and isinstance(model.layers[1].linear1, nn.Linear)
    assert re.search(r"^layers\.1\.linear2 +linear +\d+\.\d+% +csr ", format_plan(record), re.M)
    with pytest.raises(FedSMSError, match=r"\(attention\) does not fit this model; measure its own plan"):
        apply_plan(build_model("mlp", 10, (1, 8, 8)), record)


def test_bad_arguments_are_refused():
    model = prune(build_model("mlp", 10, (1, 8, 8)))
    with pytest.raises(FedSMSError, match="pass names from the plan"):
        sparsify(model, torch.rand(1, 1, 8, 8), only=["net.9"])
    with pytest.raises(FedSMSError, match="margin must be > 0"):
        sparsify(model, torch.rand(1, 1, 8, 8), margin=0)


def test_a_layer_replaced_beside_a_dense_attention_turns_the_fused_paths_off(one_thread):
    # torch's fused encoder paths read linear1.weight, which a SparseLinear has not: they must be off
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = prune(nn.TransformerEncoder(layer, 2))  # nested tensors enabled, as torch's default
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        dense, dense_padded = model(x), model(x, src_key_padding_mask=padding)
        sparsify(model, x, margin=ALWAYS, repeats=1, only=["layers.0.linear1"])
        sparse, sparse_padded = model(x), model(x, src_key_padding_mask=padding)
    assert isinstance(model.layers[0].linear1, SparseLinear) and not model.use_nested_tensor
    keep = ~padding.unsqueeze(-1)
    assert close(sparse, dense) and close(sparse_padded * keep, dense_padded * keep)
