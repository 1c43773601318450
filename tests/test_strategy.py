"""SparseSoupStrategy's Flower hooks with the real ClientApp in the fast tier: the soup after
a round is exactly the masked average of the clients' decoded replies, federated evaluation
is the example-weighted mean of the clients' metrics, bad replies never count, and the
greedy soup is the one held-out accuracy computed here picks."""

import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, RecordingGrid, digits, make_strategy, partitions, payloads, train_replies

from fedsms import codec
from fedsms.evaluate import evaluate
from fedsms.masks import compute_mask, kept_count, mask_digest, sparsity_after_phase
from fedsms.norms import norm_stat_names, recalibrate_norms
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate
from fedsms_client.app import make_client_app
from fedsms_flower.records import JOB_KEY
from fedsms_server.strategy import Update

pytestmark = pytest.mark.usefixtures("one_thread")


def decoded_state(payload: bytes, strategy) -> codec.Decoded:
    return codec.decode(payload, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup)


def replies_of_round(strategy, server_round: int, clients: int = 2) -> list[bytes]:
    """``server_round``'s train messages handled by real ClientApps; the update payloads."""
    grid = LocalGrid(make_client_app(), partitions(clients))
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    return payloads(grid.send_and_receive(messages))


def assert_masked_average(strategy, states: list[dict], weights: list[float]) -> None:
    w = torch.tensor(weights, dtype=torch.float64)
    for name, value in strategy.soup.items():
        stacked = torch.stack([s[name] for s in states])
        if value.is_floating_point():
            expected = (stacked.double() * w.view(-1, *[1] * value.dim())).sum(0) / w.sum()
            torch.testing.assert_close(value, expected.float(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, stacked.max(0).values)  # num_batches_tracked
    for name, keep in strategy.mask.items():
        assert torch.count_nonzero(strategy.soup[name][~keep]) == 0, name  # exactly zero outside the mask


@pytest.mark.parametrize("merge, model", [("uniform", "mlp"), ("weighted", "cnn")])
def test_a_round_through_the_flower_hooks_gives_the_masked_average_of_the_replies(tmp_path, merge, model):
    # A data soup over uneven (dirichlet) shards, so example weights differ; two rounds per
    # phase, so round 1 only averages (no phase end, no recalibration).
    strategy = make_strategy(
        tmp_path,
        model=model,
        run=dict(merge=merge),
        mode="data",
        partitioning="dirichlet",
        pretrain_rounds=0,
        rounds_per_phase=2,
        fraction_evaluate=1.0,
        min_available_clients=3,
    )
    grid = RecordingGrid(make_client_app(), partitions(3))
    strategy.start(grid, num_rounds=1)

    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert [int(m.content["config"]["candidate"]) for m in sent] == [0, 1, 2]
    assert all(dict(m.content[JOB_KEY])["merge"] == merge for m in sent)  # the job travels with the message
    decoded = [decoded_state(p, strategy) for p in payloads(train_replies(grid, 1))]
    examples = [d.num_examples for d in decoded]
    assert len(set(examples)) == 3 and sum(examples) == len(digits().train)  # uneven shards covering the data
    weights = examples if merge == "weighted" else [1, 1, 1]
    assert_masked_average(strategy, [d.to_state_dict(strategy.soup) for d in decoded], weights)
    (log,) = strategy.rounds
    assert log.accepted == 3 and not log.rejected
    assert log.sparsity == pytest.approx(sparsity_after_phase(0.8, 2, 1), abs=1e-4)

    # federated evaluation: every client evaluated the soup, weighted by its examples
    evaluated = [r.content["metrics"] for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert len(evaluated) == 3
    n = sum(int(m["num-examples"]) for m in evaluated)
    assert n == len(digits().test)  # the test split, sharded IID without overlap
    expected = sum(float(m["accuracy"]) * int(m["num-examples"]) for m in evaluated) / n
    assert log.federated_eval["accuracy"] == pytest.approx(expected)
    assert log.central_eval["accuracy"] == pytest.approx(evaluate(strategy.model, digits().test)["accuracy"])


def test_invalid_replies_are_rejected_with_a_reason_and_never_touch_the_soup(tmp_path):
    strategy = make_strategy(tmp_path)
    strategy.begin_round(2)  # round 2 opens phase 1: the strategy prunes first
    good = replies_of_round(strategy, 2)
    decoded = decoded_state(good[0], strategy)
    state, mask = decoded.to_state_dict(strategy.soup), strategy.mask
    other_round = codec.encode(state, mask, phase=1, round=3, kind="update", num_examples=150)
    poisoned = {k: v.clone() for k, v in state.items()}
    first = next(iter(mask))
    poisoned[first][mask[first]] = float("nan")
    nan_payload = codec.encode(poisoned, mask, phase=1, round=2, kind="update", num_examples=150, check_finite=False)
    other_mask = compute_mask(strategy.soup, mask, 0.9)
    other_state = {k: v * other_mask[k] if k in other_mask else v for k, v in strategy.soup.items()}
    wrong_mask = codec.encode(other_state, other_mask, phase=1, round=2, kind="update", num_examples=150)
    absurd = codec.encode(state, mask, phase=1, round=2, kind="update", num_examples=10**12)
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

    expected = [decoded_state(g, strategy).to_state_dict(strategy.soup) for g in good]
    assert_masked_average(strategy, expected, [1, 1])
    assert set(strategy.current.rejected) == set(bad)
    reasons = strategy.current.rejected
    assert "round" in reasons[10]
    assert "finite" in reasons[11].lower() or "nan" in reasons[11].lower()
    assert "digest" in reasons[12] or "mask" in reasons[12]
    assert "training examples" in reasons[15] and "out of memory" in reasons[16]
    assert strategy.current.accepted == 2


def test_too_few_valid_replies_leave_the_soup_unchanged(tmp_path):
    strategy = make_strategy(tmp_path)
    strategy.begin_round(2)
    before = {k: v.clone() for k, v in strategy.soup.items()}
    (reply, _) = replies_of_round(strategy, 2)
    strategy.aggregate_updates(2, [Update(0, reply, {}), Update(1, b"junk", {})])
    assert all(torch.equal(before[k], strategy.soup[k]) for k in before)
    assert strategy.current.accepted == 1


def test_each_phase_prunes_to_its_exact_sparsity_and_nests(tmp_path):
    strategy = make_strategy(tmp_path, model="cnn", rounds_per_phase=2)
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


# ---- greedy soup on the server, against held-out accuracy computed here -----------------


def expected_greedy(states: list[dict], score) -> list[int]:
    """The greedy soup as the paper states it, written out here: rank by held-out score,
    then add each candidate in turn if the soup's score does not drop."""
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = score(mean_of([states[j] for j in chosen + [i]]))
        if trial >= best:
            chosen, best = chosen + [i], trial
    return chosen


def mean_of(states: list[dict]) -> dict:
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(states[0][k].dtype)
        if states[0][k].is_floating_point()
        else torch.stack([s[k] for s in states]).max(0).values
        for k in states[0]
    }


def test_greedy_merge_is_the_soup_that_heldout_accuracy_picks_with_recalibrated_norms(tmp_path):
    lines = []
    strategy = make_strategy(
        tmp_path,
        model="cnn",
        log=lines.append,
        run=dict(merge="greedy"),
        mode="data",
        pretrain_rounds=0,
        min_available_clients=3,
    )
    data = digits()
    model = strategy.model
    torch.manual_seed(0)
    train_candidate(model, strategy.mask, data.train, CandidateConfig(epochs=2, lr=0.05, batch_size=64))
    strategy.engine.restore({k: v.clone() for k, v in model.state_dict().items()}, strategy.mask)
    strategy.begin_round(1)  # prunes the trained dense model; round 1 ends phase 1
    good = replies_of_round(strategy, 1, clients=3)
    spoiled = decoded_state(good[0], strategy).to_state_dict(strategy.soup)
    generator = torch.Generator().manual_seed(0)
    for name, keep in strategy.mask.items():  # a candidate that lowers held-out accuracy
        spoiled[name] = (spoiled[name] + torch.randn(spoiled[name].shape, generator=generator) * 0.3) * keep
    bad = codec.encode(spoiled, strategy.mask, phase=1, round=1, kind="update", num_examples=400)
    payloads_ = [bad, *good]  # unsorted: the worst candidate comes first
    states = [decoded_state(p, strategy).to_state_dict(strategy.soup) for p in payloads_]

    strategy.aggregate_updates(1, [Update(n, p, {}) for n, p in enumerate(payloads_)])
    strategy.finish_phase(1)

    phase_seed = strategy.run.seed + 1  # the recalibration subset of phase 1
    scratch = model  # the strategy's own model is scratch space here: the soup lives in the engine

    def recalibrated(state):
        scratch.load_state_dict(state)
        recalibrate_norms(scratch, data.train, fraction=strategy.run.recalibration_fraction, seed=phase_seed)
        return {k: v.clone() for k, v in scratch.state_dict().items()}

    def heldout(state):
        scratch.load_state_dict(recalibrated(state))
        return evaluate(scratch, data.heldout)["accuracy"]

    chosen = expected_greedy(states, heldout)
    [line] = [m for m in lines if "greedy soup kept candidates" in m]
    assert line.endswith(f"candidates {chosen}")
    assert 0 not in chosen and len(chosen) >= 1
    expected = recalibrated(mean_of([states[i] for i in chosen]))
    stats = set(norm_stat_names(model))
    for name, value in strategy.soup.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    averaged = mean_of([states[i] for i in chosen])
    assert any(not torch.allclose(strategy.soup[n], averaged[n], atol=1e-3) for n in stats if "running" in n)
    assert heldout(strategy.soup) >= max(heldout(s) for s in states)


def made_replies(strategy, server_round: int, count: int = 2) -> list[Update]:
    """``count`` valid update replies for ``server_round``: the soup with its kept values scaled."""
    phase, _ = strategy.phase_at(server_round)
    replies = []
    for i in range(count):
        state = {k: v * (1.5 + i) if v.is_floating_point() else v + i for k, v in strategy.soup.items()}
        payload = codec.encode(state, strategy.mask, phase=phase, round=server_round, kind="update", num_examples=10)
        replies.append(Update(i, payload, {}))
    return replies


def test_the_reply_reader_is_built_once_per_mask_and_anew_when_the_mask_changes(tmp_path):
    # rounds 2 and 3 share phase 1's mask; round 4 opens phase 2 (a new mask)
    strategy = make_strategy(tmp_path, rounds_per_phase=2)
    readers = []
    for server_round in (2, 3, 4):
        strategy.begin_round(server_round)
        before = {k: v.clone() for k, v in strategy.soup.items()}
        strategy.aggregate_updates(server_round, made_replies(strategy, server_round))
        assert strategy.current.accepted == 2 and not strategy.current.rejected, strategy.current.rejected
        for name, value in strategy.soup.items():  # the mean of x1.5 and x2.5 (integers: the maximum)
            expected = before[name] * 2 if value.is_floating_point() else before[name] + 1
            torch.testing.assert_close(value, expected, msg=name)
        readers.append(strategy._reader_cache)
    assert readers[0] is readers[1]  # same mask: built once
    assert readers[2] is not readers[1] and readers[2].digest == strategy.digest  # pruned: built anew


def test_aggregation_holds_one_reply_at_a_time(tmp_path):
    # The strategy lets go of each reply (accepted or refused) before it asks for the next,
    # so a generator that unpacks replies one by one keeps a single payload copy alive.
    strategy = make_strategy(tmp_path, rounds_per_phase=2)
    strategy.begin_round(2)
    payloads_ = [u.payload for u in made_replies(strategy, 2, count=2)]
    payloads_.insert(1, b"junk")
    still_held = []

    def one_by_one():
        for i, payload in enumerate(payloads_):
            update = Update(i, payload, {"train_loss": 0.5})
            yield update
            still_held.append(sys.getrefcount(update) - 2)  # less this frame's name and the call's argument

    metrics = strategy.aggregate_updates(2, one_by_one())
    assert strategy.current.accepted == 2 and list(strategy.current.rejected) == [1]
    assert still_held == [0, 0, 0]
    assert metrics == {"train_loss": 0.5}
