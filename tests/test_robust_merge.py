"""Magnitude checks, robust merges and the linear name check (issue 12, points 3, 4, 7, 15a):
the running sum stays finite, one client cannot own a weighted soup, ``trimmed-mean`` /
``median`` and the update-norm bound resist a bad candidate, and valid soups are unchanged."""

import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, digits, partitions, reply_of

from fedsms import FedSMSError, codec
from fedsms.config import FederationConfig, RunConfig
from fedsms.merge import Merge, RunningAverage, SoupError, capped_shares
from fedsms.models import build_for
from fedsms_client.app import make_client_app
from fedsms_server.strategy import SparseSoupStrategy

SPLITS = digits()


def make_strategy(tmp_path, log=lambda _: None, **run):
    config = RunConfig(
        **{"model": "mlp", "phases": 1, "target_sparsity": 0.5, "out_dir": str(tmp_path), "ood": False, **run}
    )
    torch.manual_seed(0)
    return SparseSoupStrategy(
        config,
        FederationConfig(pretrain_rounds=1, min_train_clients=1),
        build_for("mlp", SPLITS),
        server_data=SPLITS,
        out_dir=tmp_path,
        log=log,
    )


def opened(strategy, server_round: int = 1):
    """Open ``server_round`` as Flower's loop does (``configure_train``); its train messages."""
    return strategy.configure_train(
        server_round, ArrayRecord(), ConfigRecord(), LocalGrid(make_client_app(), partitions(2))
    )


def closed(strategy, server_round: int = 1):
    """Close the round as Flower's loop does (``aggregate_evaluate``); its record."""
    strategy.aggregate_evaluate(server_round, [])
    return strategy.rounds[-1]


def replies(payloads: list[bytes], server_round: int = 1) -> list:
    """Train replies of ``server_round``: candidate and node i sent ``payloads[i]``."""
    return [reply_of(server_round, i, i, p) for i, p in enumerate(payloads)]


def update(strategy, examples=100, scale=0.01, seed=0, fill=None, value_dtype="fp32"):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in strategy.soup.items():
        if not v.is_floating_point():
            state[k] = v
        elif fill is not None:
            state[k] = torch.full_like(v, fill)
        else:
            state[k] = v + scale * torch.randn(v.shape, generator=g)
    return codec.encode(
        state,
        strategy.mask,
        phase=0,
        round=1,
        kind="update",
        num_examples=examples,
        check_finite=False,
        value_dtype=value_dtype,
    )


@pytest.mark.parametrize("case", ["three of 3e38", "1e30 with 1e9 examples", "bf16 near its maximum"])
def test_enormous_finite_values_are_rejected_and_the_soup_stays_finite(tmp_path, case):
    strategy = make_strategy(tmp_path, merge="weighted")
    opened(strategy)
    if case == "three of 3e38":
        bad = [update(strategy, fill=3e38, seed=i) for i in range(3)]
    elif case == "1e30 with 1e9 examples":
        bad = [update(strategy, fill=1e30, examples=10**9)]
    else:
        bad = [update(strategy, fill=3.3e38, value_dtype="bf16")]
    good = [update(strategy, seed=10 + i, examples=120) for i in range(3)]
    strategy.aggregate_train(1, replies([*bad, *good]))
    log = closed(strategy)
    assert log.accepted == 3 and set(log.rejected) == set(range(len(bad)))
    assert all(bool(torch.isfinite(v.double()).all()) for v in strategy.soup.values())
    assert all("beyond" in reason for reason in log.rejected.values())


def test_a_nan_weight_is_refused_and_a_non_finite_merge_raises():
    average = RunningAverage()
    with pytest.raises(ValueError):
        average.add({"w": torch.ones(2)}, float("nan"))
    with pytest.raises(ValueError):
        average.add({"w": torch.ones(2)}, float("inf"))
    merge = Merge("uniform", keep_candidates=False)
    merge.add({"w": torch.full((2,), 3e38)}, 1)
    merge.add({"w": torch.full((2,), 3e38)}, 1)
    with pytest.raises(SoupError, match="not finite"):
        merge.result()


def test_one_client_claiming_1e9_examples_is_capped():
    shares = capped_shares([1e9, 120, 120, 120], 0.4)
    assert shares[0] == pytest.approx(0.4) and sum(shares) == pytest.approx(1.0)
    assert shares[1:] == pytest.approx([0.2, 0.2, 0.2])
    assert capped_shares([5, 1], 0.3) == [0.5, 0.5]  # a cap below 1/n: equal shares
    merge = Merge("weighted", keep_candidates=False, max_weight=0.4)
    for value, n in [(100.0, 10**9), (0.0, 120), (0.0, 120), (0.0, 120)]:
        merge.add({"w": torch.full((3,), value)}, n)
    assert torch.allclose(merge.result()["w"], torch.full((3,), 40.0))


def candidates(values):
    merge_input = [{"w": torch.tensor(v, dtype=torch.float32), "n": torch.tensor(i)} for i, v in enumerate(values)]
    return merge_input


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_median_and_trimmed_mean_ignore_one_outlier(rule):
    merge = Merge(rule, keep_candidates=False, trim_fraction=0.2)
    for c in candidates([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, 40.0], [2.0, 50.0]]):
        merge.add(c, 1)
    out = merge.result()
    # median of (1,2,3,1000,2) = 2, of (10..50) = 30 — the even case averages the two middle values
    if rule == "median":
        merge4 = Merge(rule, keep_candidates=False)
        for c in candidates([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, 40.0]]):
            merge4.add(c, 1)
        assert merge4.result()["w"].tolist() == [2.5, 25.0]
        assert out["w"].tolist() == [2.0, 30.0]
    else:
        assert out["w"].tolist() == pytest.approx([7 / 3, 30.0])  # cut 1 at each end: mean(2,2,3), mean(20,30,40)
    assert out["w"].dtype == torch.float32 and out["n"].item() == 4  # integer tensors keep the maximum


def test_multi_krum_leaves_out_updates_that_point_elsewhere():
    """Two sign-flipped updates of honest norm among seven: coordinate-wise rules see nothing
    odd in any single value, Multi-Krum sees that the two sit far from the other five."""
    lines = []
    honest = [[1.0, 1.0, 1.0], [1.1, 0.9, 1.0], [0.9, 1.1, 1.0], [1.0, 1.1, 0.9], [1.0, 0.9, 1.1]]
    flipped = [[-1.0, -1.0, -1.0], [-1.1, -0.9, -1.0]]  # two that collude: close to each other
    merge = Merge("multi-krum", keep_candidates=False, krum_malicious=2, log=lines.append)
    for c in candidates(flipped[:1] + honest + flipped[1:]):
        merge.add(c, 1)
    assert merge.result()["w"].tolist() == pytest.approx([1.0, 1.0, 1.0])  # the mean of the honest five
    assert lines == ["merge: multi-krum left out candidates [0, 6], the farthest from their neighbours"]
    uniform = Merge("uniform", keep_candidates=False)
    for c in candidates(flipped[:1] + honest + flipped[1:]):
        uniform.add(c, 1)
    assert uniform.result()["w"].tolist() == pytest.approx([2.9 / 7, 3.1 / 7, 3 / 7])  # pulled to zero
    warned = []
    small = Merge("multi-krum", keep_candidates=False, krum_malicious=1, warn=warned.append)
    for c in candidates(honest[:3]):
        small.add(c, 1)
    small.result()
    assert warned == [
        "multi-krum with krum-malicious 1 needs more than 4 candidates for its guarantee, this merge has 3"
    ]


def test_a_scaled_reply_is_dropped_by_the_update_norm_bound_with_a_log_line(tmp_path):
    lines = []
    strategy = make_strategy(tmp_path, update_norm_bound=3.0, log=lines.append)
    opened(strategy)
    honest = [update(strategy, seed=i, examples=120) for i in range(3)]
    scaled = update(strategy, seed=9, scale=10.0)  # x1000 the honest perturbation
    strategy.aggregate_train(1, replies([*honest, scaled]))
    log = closed(strategy)
    assert log.accepted == 3 and list(log.rejected) == [3] and "update-norm-bound" in log.rejected[3]
    assert any("dropped candidate 3" in line for line in lines)
    reference = make_strategy(tmp_path / "ref")
    opened(reference)
    reference.aggregate_train(1, replies(honest))
    assert closed(reference).accepted == 3
    for name, value in strategy.soup.items():
        torch.testing.assert_close(value, reference.soup[name])


def test_default_options_leave_the_soup_bit_identical():
    values = [{"w": torch.randn(50, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    merge, average = Merge("weighted", keep_candidates=False), RunningAverage()
    for i, v in enumerate(values):
        merge.add(v, 100 + i)
        average.add(v, float(100 + i))
    assert torch.equal(merge.result()["w"], average.mean()["w"]) and not merge.candidates


@pytest.mark.parametrize(
    "bad",
    [
        dict(trim_fraction=0.5),
        dict(max_client_weight=0.0),
        dict(update_norm_bound=-1.0),
        dict(update_norm_bound=float("nan")),
        dict(max_client_weight=float("inf")),
        dict(merge="krum"),
    ],
)
def test_robust_merge_settings_are_declared_and_checked(bad):
    with pytest.raises(FedSMSError):
        RunConfig(**bad)


def test_the_name_check_is_linear():
    names = [f"t{i % 16000}" for i in range(64000)]  # 64 000 entries with repeated names
    started = time.perf_counter()
    reason = codec._name_diff(names, [f"t{i}" for i in range(16000)])
    assert "repeat" in reason and time.perf_counter() - started < 5  # quadratic took minutes
    assert math.isfinite(codec.MAX_MAGNITUDE)


def test_a_setting_that_cannot_act_says_so_once(tmp_path):
    """Issue 27, point 7: a trim that cuts nothing, a norm bound over fewer than 3 replies
    and a weight cap outside ``weighted`` each log one warning, once a job."""
    from fedsms.engine import SoupEngine

    lines = []
    engine = SoupEngine({"w": torch.zeros(3)}, {}, log=lines.append)
    for _ in range(2):  # two rounds: one warning each
        merge = engine.merge("trimmed-mean", trim_fraction=0.2, norm_bound=2.0, max_weight=0.5)
        for value in range(4):
            merge.add({"w": torch.full((3,), float(value))}, 10)
        assert torch.equal(merge.result()["w"], torch.full((3,), 1.5, dtype=torch.float64).float())
        two = engine.merge("uniform", norm_bound=2.0)
        two.add({"w": torch.ones(3)}, 1)
        two.add({"w": torch.zeros(3)}, 1)
        two.result()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 3, warnings
    assert any("trims nothing from 4 candidates at trim-fraction 0.2" in w for w in warnings)
    assert any("update-norm-bound is off in a merge of 2 candidates" in w for w in warnings)
    assert any("max-client-weight 0.5 acts only under merge 'weighted'" in w for w in warnings)
