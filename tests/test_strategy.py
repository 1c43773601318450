"""SparseSoupStrategy's aggregation, without a Flower transport: the soup after a round is
exactly the masked average of the clients' decoded replies, and bad replies never count."""

import json

import pytest
import torch

from fedsms import codec
from fedsms.config import FederationConfig, RunConfig
from fedsms.data import load_dataset
from fedsms.masks import compute_mask, kept_count, mask_digest, sparsity_after_phase
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate
from fedsms_server.strategy import SparseSoupStrategy, Update

SPLITS = load_dataset("digits")


def make_strategy(tmp_path, merge="uniform", **federation):
    run = RunConfig(model="cnn", phases=2, target_sparsity=0.8, merge=merge, out_dir=str(tmp_path), ood=False)
    fed = FederationConfig(pretrain_rounds=1, min_train_clients=2, **federation)
    torch.manual_seed(0)
    return SparseSoupStrategy(run, fed, build_for("cnn", SPLITS), server_data=SPLITS, out_dir=tmp_path, log=lambda _: None)


def client_reply(payload: bytes, server_round: int, seed: int, examples: int, **encode_options) -> tuple[bytes, dict]:
    """What a fedsms client does: decode the soup, retrain under its mask, encode the values."""
    model = build_for("cnn", SPLITS)
    template = model.state_dict()
    soup = codec.decode(payload, expected_mask=None, expected_digest=None, template=template, expected_kind="soup")
    model.load_state_dict(soup.to_state_dict(template))
    data = SPLITS.train.head(examples)
    train_candidate(model, soup.mask, data, CandidateConfig(seed=seed, epochs=1, batch_size=32))
    options = {"phase": soup.phase, "round": server_round, "kind": "update",
               "num_examples": examples, **encode_options}
    return codec.encode(model.state_dict(), soup.mask, **options), soup.mask


def decoded_state(payload: bytes, strategy) -> dict:
    decoded = codec.decode(payload, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup)
    return decoded.to_state_dict(strategy.soup)


@pytest.mark.parametrize("merge", ["uniform", "weighted"])
def test_soup_is_the_masked_average_of_the_replies(tmp_path, merge):
    strategy = make_strategy(tmp_path, merge=merge)
    payload = strategy.begin_round(2)  # round 2 opens phase 1: the strategy prunes first
    examples = [120, 200, 320]
    replies = [client_reply(payload, 2, seed, n)[0] for seed, n in zip(range(3), examples)]
    states = [decoded_state(r, strategy) for r in replies]
    strategy.aggregate_updates(2, [Update(node, r, {"train_loss": 0.5}) for node, r in enumerate(replies)])

    weights = torch.tensor(examples if merge == "weighted" else [1, 1, 1], dtype=torch.float32)
    for name, value in strategy.soup.items():
        stacked = torch.stack([s[name] for s in states])
        if value.is_floating_point():
            expected = (stacked * weights.view(-1, *[1] * value.dim())).sum(0) / weights.sum()
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, stacked.max(0).values)  # num_batches_tracked
    for name, keep in strategy.mask.items():
        assert torch.count_nonzero(strategy.soup[name][~keep]) == 0, name  # exactly zero outside the mask
    assert strategy.current.accepted == 3 and not strategy.current.rejected


def test_invalid_replies_are_rejected_with_a_reason_and_never_touch_the_soup(tmp_path):
    strategy = make_strategy(tmp_path)
    payload = strategy.begin_round(2)
    good = [client_reply(payload, 2, seed, 150)[0] for seed in range(2)]
    other_round, _ = client_reply(payload, 3, 5, 150)
    nan_reply, mask = client_reply(payload, 2, 6, 150)
    decoded = codec.decode(nan_reply, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup)
    poisoned = decoded.to_state_dict(strategy.soup)
    first = next(iter(strategy.mask))
    poisoned[first][strategy.mask[first]] = float("nan")
    nan_payload = codec.encode(poisoned, mask, phase=1, round=2, kind="update",
                               num_examples=150, check_finite=False)
    other_mask = compute_mask(strategy.soup, strategy.mask, 0.9)
    other_state = {k: v * other_mask[k] if k in other_mask else v for k, v in strategy.soup.items()}
    wrong_mask = codec.encode(other_state, other_mask, phase=1, round=2, kind="update", num_examples=150)
    absurd = codec.encode(decoded.to_state_dict(strategy.soup), mask, phase=1, round=2, kind="update",
                          num_examples=10**12)
    bad = {
        10: Update(10, other_round, {}),
        11: Update(11, nan_payload, {}),
        12: Update(12, wrong_mask, {}),
        13: Update(13, good[0][: len(good[0]) // 2], {}),
        14: Update(14, b"\x00garbage" * 10, {}),
        15: Update(15, absurd, {}),
        16: Update(16, error="the client failed: out of memory"),
    }
    strategy.aggregate_updates(2, [Update(0, good[0], {}), *bad.values(), Update(1, good[1], {})])

    expected = [decoded_state(g, strategy) for g in good]
    for name, value in strategy.soup.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (expected[0][name] + expected[1][name]) / 2)
    assert set(strategy.current.rejected) == set(bad)
    reasons = strategy.current.rejected
    assert "round" in reasons[10]
    assert "finite" in reasons[11].lower() or "nan" in reasons[11].lower()
    assert "digest" in reasons[12] or "mask" in reasons[12]
    assert "training examples" in reasons[15] and "out of memory" in reasons[16]
    assert strategy.current.accepted == 2


def test_too_few_valid_replies_leave_the_soup_unchanged(tmp_path):
    strategy = make_strategy(tmp_path)
    payload = strategy.begin_round(2)
    before = {k: v.clone() for k, v in strategy.soup.items()}
    reply, _ = client_reply(payload, 2, 0, 100)
    strategy.aggregate_updates(2, [Update(0, reply, {}), Update(1, b"junk", {})])
    assert all(torch.equal(before[k], strategy.soup[k]) for k in before)


def test_each_phase_prunes_to_its_exact_sparsity_and_nests(tmp_path):
    strategy = make_strategy(tmp_path, rounds_per_phase=2)
    assert strategy.num_rounds == 1 + 2 * 2
    assert [strategy.phase_at(r) for r in range(1, 6)] == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert [strategy.ends_phase(r) for r in range(1, 6)] == [True, False, True, False, True]
    total = sum(m.numel() for m in strategy.mask.values())
    previous = strategy.mask
    for server_round, phase in ((2, 1), (4, 2)):
        strategy.begin_round(server_round)
        kept = sum(int(m.sum()) for m in strategy.mask.values())
        assert kept == kept_count(total, sparsity_after_phase(0.8, 2, phase))
        assert all(bool((strategy.mask[n] <= previous[n]).all()) for n in previous)
        assert strategy.digest == mask_digest(strategy.mask)
        previous = strategy.mask
    # the round after a phase's first keeps the mask
    digest = strategy.digest
    strategy.begin_round(5)
    assert strategy.digest == digest


def test_greedy_merge_keeps_only_candidates_that_do_not_hurt_the_heldout_soup(tmp_path):
    messages = []
    strategy = make_strategy(tmp_path, merge="greedy")
    strategy.log = messages.append
    payload = strategy.begin_round(2)  # phase 1 has one round, so this round ends the phase
    replies = [client_reply(payload, 2, seed, 200)[0] for seed in range(3)]
    states = [decoded_state(r, strategy) for r in replies]
    strategy.aggregate_updates(2, [Update(n, r, {}) for n, r in enumerate(replies)])
    strategy.finish_phase(2)  # server-held data: no federated round needed

    [line] = [m for m in messages if "greedy soup kept candidates" in m]
    chosen = json.loads(line.split("candidates ")[1])
    assert 1 <= len(chosen) <= 3
    for name in strategy.mask:  # weights are the chosen candidates' average; norm statistics are recalibrated
        expected = torch.stack([states[i][name] for i in chosen]).mean(0)
        torch.testing.assert_close(strategy.soup[name], expected)
