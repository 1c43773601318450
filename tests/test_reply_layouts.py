"""Both reply layouts merge alike (issue 27, point 1): the same updates sent compact (the
fedsms payload), in Flower's standard layout (an ``ArrayRecord`` of the state dict) or
mixed give bit-identical soups under every merge rule, in rounds that keep their
candidates (phase end with diagnostics, robust merges) and in rounds that stream them."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from helpers import LocalGrid, make_strategy, partitions, reply_of

from fedsms import codec
from fedsms.merge import RULES, Merge
from fedsms.schema import MERGE_RULES
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import train_reply

EXAMPLES = [50, 120, 80, 200]


def updates(strategy, count):
    """Seeded full state dicts retrained from the soup (noise outside the mask too: the
    server drops it)."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        out.append(
            {
                k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + i
                for k, v in strategy.soup.items()
            }
        )
    return out


def reply(strategy, i, state, layout):
    if layout in ("compact", "fp16"):
        masked = {k: v * strategy.mask[k] if k in strategy.mask else v for k, v in state.items()}
        payload = codec.encode(
            masked,
            strategy.mask,
            phase=1,
            round=1,
            kind="update",
            num_examples=EXAMPLES[i] * 100,
            value_dtype="fp16" if layout == "fp16" else "fp32",
        )
        return reply_of(1, i, i, payload, train_loss=0.5)
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": EXAMPLES[i] * 100, "train_loss": 0.5})}
    )
    return train_reply(1, i, i, content)


def soup_after(tmp_path, rule, diagnostics, layouts, model="mlp"):
    strategy = make_strategy(
        tmp_path,
        model=model,
        run={"merge": rule, "diagnostics": diagnostics, "candidates": len(layouts), "phases": 2},
        pretrain_rounds=0,
        min_train_clients=2,
    )
    grid = LocalGrid(make_client_app(), partitions(len(layouts)))
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # prunes: phase 1 opens
    states = updates(strategy, len(layouts))
    _, metrics = strategy.aggregate_train(
        1, [reply(strategy, i, s, lay) for i, (s, lay) in enumerate(zip(states, layouts))]
    )
    assert metrics is not None, strategy.rounds
    return strategy.soup


MIXED = ["flower", "compact", "compact", "flower"]


@pytest.mark.parametrize("diagnostics", [True, False])
@pytest.mark.parametrize("rule", MERGE_RULES)
def test_both_layouts_and_a_mix_give_the_same_soup(tmp_path, rule, diagnostics):
    compact = soup_after(tmp_path / "c", rule, diagnostics, ["compact"] * 4)
    flower = soup_after(tmp_path / "f", rule, diagnostics, ["flower"] * 4)
    mixed = soup_after(tmp_path / "m", rule, diagnostics, MIXED)
    for name, value in compact.items():
        assert torch.equal(value, flower[name]), name
        assert torch.equal(value, mixed[name]), name


def test_float16_values_sum_alike_streamed_and_kept(tmp_path):
    """A float16 reply is widened before its weight (example count) applies, streamed or kept."""
    kept = soup_after(tmp_path / "k", "weighted", True, ["fp16"] * 4)
    streamed = soup_after(tmp_path / "s", "weighted", False, ["fp16"] * 4)
    assert all(torch.equal(value, streamed[name]) for name, value in kept.items())


def test_a_batchnorm_model_merges_alike_in_both_layouts(tmp_path):
    compact = soup_after(tmp_path / "c", "uniform", True, ["compact"] * 3, model="cnn")
    mixed = soup_after(tmp_path / "m", "uniform", True, ["flower", "compact", "flower"], model="cnn")
    assert all(torch.equal(value, mixed[name]) for name, value in compact.items())


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("rule", [*RULES])
def test_a_merge_takes_candidates_in_any_tensor_order(rule, keep):
    g = torch.Generator().manual_seed(0)
    candidates = [{"w": torch.randn(5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(4)]
    results = []
    for flip in (False, True, "alternate"):
        merge = Merge(rule, keep_candidates=keep)
        for i, c in enumerate(candidates):
            reverse = flip is True or (flip == "alternate" and i % 2)
            merge.add(dict(reversed(c.items())) if reverse else c, 10 + i)
        results.append(merge.result())
    assert all(torch.equal(r[k], results[0][k]) for r in results[1:] for k in ("w", "b"))
