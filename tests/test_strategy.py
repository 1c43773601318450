"""SparseSoupStrategy's Flower hooks with the real ClientApp in the fast tier: the soup after
a round is exactly the masked average of the clients' decoded replies, federated evaluation
is the example-weighted mean of the clients' metrics, bad replies never count, and the
greedy soup is the one held-out accuracy computed here picks, a soup that loses to its best
candidate falls back (soup-guard) and the round's record says so. Each hook is called as
Flower's loop calls it, with nothing set up beforehand."""

import gc
import weakref

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, RecordingGrid, digits, make_strategy, partitions, payloads, reply_of, train_replies

from fedsms import codec
from fedsms.evaluate import evaluate
from fedsms.masks import compute_mask, kept_count, mask_digest, sparsity_after_phase
from fedsms.norms import norm_stat_names, recalibrate_norms
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate
from fedsms_client.app import make_client_app
from fedsms_flower.records import JOB_KEY
from fedsms_server import strategy as strategy_module

pytestmark = pytest.mark.usefixtures("one_thread")


def decoded_state(payload: bytes, strategy) -> codec.Decoded:
    return codec.decode(payload, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup)


def replies_of_round(strategy, server_round: int, clients: int = 2) -> list[bytes]:
    """``server_round``'s train messages (the hook prunes when the round opens a phase),
    handled by real ClientApps; the update payloads."""
    grid = LocalGrid(make_client_app(), partitions(clients))
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    return payloads(grid.send_and_receive(messages))


def closed(strategy, server_round: int):
    """Close the round as Flower's loop does (``aggregate_evaluate``); its record."""
    strategy.aggregate_evaluate(server_round, [])
    return strategy.rounds[-1]


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
    good = replies_of_round(strategy, 2)  # round 2 opens phase 1: the strategy prunes first
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
        10: reply_of(2, 2, 10, other_round),
        11: reply_of(2, 3, 11, nan_payload),
        12: reply_of(2, 4, 12, wrong_mask),
        13: reply_of(2, 5, 13, good[0][: len(good[0]) // 2]),
        14: reply_of(2, 6, 14, b"\x00garbage" * 10),
        15: reply_of(2, 7, 15, absurd),
        16: reply_of(2, 8, 16, error="out of memory"),
    }
    arrays, _ = strategy.aggregate_train(2, [reply_of(2, 0, 0, good[0]), *bad.values(), reply_of(2, 1, 1, good[1])])

    expected = [decoded_state(g, strategy).to_state_dict(strategy.soup) for g in good]
    assert_masked_average(strategy, expected, [1, 1])
    assert all(
        torch.equal(t, strategy.soup[k]) for k, t in arrays.to_torch_state_dict().items()
    )  # the soup, as Flower gets it
    log = closed(strategy, 2)
    assert set(log.rejected) == set(bad)
    reasons = log.rejected
    assert "round" in reasons[10]
    assert "finite" in reasons[11].lower() or "nan" in reasons[11].lower()
    assert "digest" in reasons[12] or "mask" in reasons[12]
    assert "training examples" in reasons[15] and "out of memory" in reasons[16]
    assert log.accepted == 2


def test_too_few_valid_replies_leave_the_soup_unchanged(tmp_path):
    strategy = make_strategy(tmp_path)
    (reply, _) = replies_of_round(strategy, 2)
    before = {k: v.clone() for k, v in strategy.soup.items()}
    assert strategy.aggregate_train(2, [reply_of(2, 0, 0, reply), reply_of(2, 1, 1, b"junk")]) == (None, None)
    assert all(torch.equal(before[k], strategy.soup[k]) for k in before)
    assert closed(strategy, 2).accepted == 1


def test_each_phase_prunes_to_its_exact_sparsity_and_nests(tmp_path):
    strategy = make_strategy(tmp_path, model="cnn", rounds_per_phase=2)
    assert strategy.num_rounds == 1 + 2 * 2
    assert [(r.phase, r.round_in_phase) for r in strategy.schedule] == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert [r.ends_phase for r in strategy.schedule] == [True, False, True, False, True]
    total = sum(m.numel() for m in strategy.mask.values())
    previous = strategy.mask
    grid = LocalGrid(make_client_app(), partitions(2))
    for server_round, phase in ((2, 1), (4, 2)):
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        kept = sum(int(m.sum()) for m in strategy.mask.values())
        assert kept == kept_count(total, sparsity_after_phase(0.8, 2, phase))
        assert all(bool((strategy.mask[n] <= previous[n]).all()) for n in previous)
        assert strategy.digest == mask_digest(strategy.mask)
        previous = strategy.mask
    # a retry of the round, and the round after a phase's first, keep the mask
    digest = strategy.digest
    strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid)
    strategy.configure_train(5, ArrayRecord(), ConfigRecord(), grid)
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
    trained = ArrayRecord({k: v.clone() for k, v in model.state_dict().items()})
    grid = LocalGrid(make_client_app(), partitions(3))
    # the trained dense model as Flower's loop hands it to round 1, which prunes it and ends phase 1
    good = payloads(grid.send_and_receive(strategy.configure_train(1, trained, ConfigRecord(), grid)))
    spoiled = decoded_state(good[0], strategy).to_state_dict(strategy.soup)
    generator = torch.Generator().manual_seed(0)
    for name, keep in strategy.mask.items():  # a candidate that lowers held-out accuracy
        spoiled[name] = (spoiled[name] + torch.randn(spoiled[name].shape, generator=generator) * 0.3) * keep
    bad = codec.encode(spoiled, strategy.mask, phase=1, round=1, kind="update", num_examples=400)
    payloads_ = [bad, *good]  # unsorted: the worst candidate comes first
    states = [decoded_state(p, strategy).to_state_dict(strategy.soup) for p in payloads_]

    strategy.aggregate_train(1, [reply_of(1, n, n, p) for n, p in enumerate(payloads_)])  # ends the phase

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


def test_a_federated_soup_that_loses_to_its_best_candidate_falls_back_and_says_so(tmp_path):
    """The guard at a federated phase end (the server holds data): the soup of a trained
    candidate and its negation (every float zero) scores at chance on the held-out split,
    far below the trained one; with ``soup-guard = best`` the strategy's soup is that
    candidate, and the log line and the round's result row name the fallback."""
    lines = []
    strategy = make_strategy(tmp_path, log=lines.append, run=dict(soup_guard="best"), mode="data", pretrain_rounds=0)
    data = digits()
    torch.manual_seed(0)
    train_candidate(strategy.model, strategy.mask, data.train, CandidateConfig(epochs=2, lr=0.05, batch_size=64))
    trained = ArrayRecord({k: v.clone() for k, v in strategy.model.state_dict().items()})
    grid = LocalGrid(make_client_app(), partitions(2))
    # round 1 prunes the trained dense model and ends phase 1
    [good, _] = payloads(grid.send_and_receive(strategy.configure_train(1, trained, ConfigRecord(), grid)))
    kept = decoded_state(good, strategy).to_state_dict(strategy.soup)
    negated = {k: -v if v.is_floating_point() else v for k, v in kept.items()}
    bad = codec.encode(negated, strategy.mask, phase=1, round=1, kind="update", num_examples=400)
    strategy.model.load_state_dict(kept)  # the strategy's model is scratch space: the soup lives in the engine
    assert evaluate(strategy.model, data.heldout)["accuracy"] > 0.5  # the candidate learned

    strategy.aggregate_train(1, [reply_of(1, 0, 0, good), reply_of(1, 1, 1, bad)])
    closed(strategy, 1)

    for name, value in strategy.soup.items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0, msg=name)
    [line] = [m for m in lines if "falling back" in m]
    assert "falling back to the best soup of candidates [0]" in line
    [row] = strategy.recorder.phase_rows()
    assert row["guard"]["rule"] == "best" and row["guard"]["kept"] == [0]
    assert row["guard"]["best"] - row["guard"]["soup"] > 0.3


def made_replies(strategy, server_round: int, count: int = 2) -> list:
    """``count`` valid train replies for ``server_round``: the soup with its kept values scaled."""
    phase = strategy.schedule[server_round - 1].phase
    replies = []
    for i in range(count):
        state = {k: v * (1.5 + i) if v.is_floating_point() else v + i for k, v in strategy.soup.items()}
        payload = codec.encode(state, strategy.mask, phase=phase, round=server_round, kind="update", num_examples=10)
        replies.append(reply_of(server_round, i, i, payload, train_loss=0.5))
    return replies


def test_the_reply_reader_is_built_once_per_mask_and_anew_when_the_mask_changes(tmp_path, monkeypatch):
    # rounds 2 and 3 share phase 1's mask; round 4 opens phase 2 (a new mask)
    built = []
    original = codec.UpdateReader.__init__

    def counted(self, mask, *args, **kwargs):
        built.append(mask_digest(mask))
        original(self, mask, *args, **kwargs)

    monkeypatch.setattr(codec.UpdateReader, "__init__", counted)
    strategy = make_strategy(tmp_path, rounds_per_phase=2)
    grid = LocalGrid(make_client_app(), partitions(2))
    for server_round in (2, 3, 4):
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)  # prunes in rounds 2 and 4
        before = {k: v.clone() for k, v in strategy.soup.items()}
        strategy.aggregate_train(server_round, made_replies(strategy, server_round))
        for name, value in strategy.soup.items():  # the mean of x1.5 and x2.5 (integers: the maximum)
            expected = before[name] * 2 if value.is_floating_point() else before[name] + 1
            torch.testing.assert_close(value, expected, msg=name)
        log = closed(strategy, server_round)
        assert log.accepted == 2 and not log.rejected, log.rejected
    assert len(built) == 2 and built[1] == strategy.digest  # once for phase 1's mask, once for phase 2's


def test_aggregation_holds_one_reply_at_a_time(tmp_path, monkeypatch):
    # The strategy lets go of each unpacked reply (accepted or refused) before it unpacks
    # the next, so one payload copy is alive at a time.
    strategy = make_strategy(tmp_path, rounds_per_phase=2)
    strategy.configure_train(2, ArrayRecord(), ConfigRecord(), LocalGrid(make_client_app(), partitions(2)))
    replies = made_replies(strategy, 2, count=2)
    replies.insert(1, reply_of(2, 5, 7, b"junk"))
    alive, unpacked = [], []
    original = strategy_module.unpack_reply

    def watched(*args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in unpacked))
        update = original(*args)
        unpacked.append(weakref.ref(update))
        return update

    monkeypatch.setattr(strategy_module, "unpack_reply", watched)
    _, metrics = strategy.aggregate_train(2, replies)
    log = closed(strategy, 2)
    assert log.accepted == 2 and list(log.rejected) == [7]
    assert alive == [0, 0, 0]
    assert dict(metrics) == {"train_loss": 0.5}
