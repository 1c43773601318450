"""SparseSoupStrategy keeps Flower's contract: it runs under Flower's own ``Strategy.start``
loop, and its own ``start`` keeps that signature and meaning (``initial_arrays`` is the
dense start, ``num_rounds`` is checked against the phase schedule, ``evaluate_fn`` runs at
round 0 and after every round and is recorded, a ``Result`` holds every round's metrics)."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy
from helpers import LocalGrid, digits, make_strategy, partitions

from fedsms import FedSMSError, codec
from fedsms.masks import dense_mask, kept_count, prune_state
from fedsms.models import build_for
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import train_reply
from fedsms_flower.records import origin_of, payload_of

pytestmark = pytest.mark.usefixtures("one_thread")


def kept(mask) -> int:
    return sum(int(keep.sum()) for keep in mask.values())


def recording_evaluate_fn(seen: dict):
    """An evaluate_fn of a user's own: the soup's weight norm, and which rounds it saw."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        seen[server_round] = state
        return MetricRecord({"weight_norm": float(sum(v.float().norm() ** 2 for v in state.values()) ** 0.5)})

    return evaluate_fn


def test_the_strategy_runs_under_flowers_own_start_loop(tmp_path):
    strategy = make_strategy(tmp_path)  # 1 dense round, then 2 phases to 80 %
    grid = LocalGrid(make_client_app(), partitions(3))
    torch.manual_seed(1)
    start = build_for("mlp", digits()).state_dict()
    seen = {}
    result = Strategy.start(
        strategy,
        grid,
        ArrayRecord(start),
        num_rounds=strategy.num_rounds,
        evaluate_fn=recording_evaluate_fn(seen),
    )

    assert sorted(seen) == [0, 1, 2, 3] and sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert all(torch.equal(seen[0][k], v) for k, v in start.items())  # Flower's round 0 saw initial_arrays
    final = result.arrays.to_torch_state_dict()
    total = sum(keep.numel() for keep in strategy.mask.values())
    assert kept(strategy.mask) == kept_count(total, 0.8)  # phases mapped on rounds: exact sparsity at the end
    assert all(int(torch.count_nonzero(final[n][~keep])) == 0 for n, keep in strategy.mask.items())
    assert [r["sparsity"] for r in map(json.loads, (tmp_path / "rounds.jsonl").read_text().splitlines())] == [
        pytest.approx(s, abs=1e-3) for s in (0.0, 1 - 0.2**0.5, 0.8)
    ]
    # round 1 sent initial_arrays to the clients, not the constructor's model
    first = next(m for m in grid.sent if m.metadata.message_type == "train")
    sent = codec.decode(
        payload_of(first.content["soup"]),
        expected_mask=None,
        expected_digest=None,
        template=start,
        expected_kind="soup",
    ).to_state_dict(start)
    assert all(torch.equal(sent[k], v) for k, v in start.items())


def test_start_uses_initial_arrays_as_the_dense_start(tmp_path):
    strategy = make_strategy(tmp_path, pretrain_rounds=0)  # round 1 prunes the start at once
    torch.manual_seed(7)
    start = build_for("mlp", digits()).state_dict()
    seen = {}
    strategy.start(
        LocalGrid(make_client_app(), partitions(3)),
        ArrayRecord(start),
        num_rounds=1,
        evaluate_fn=recording_evaluate_fn(seen),
    )
    assert all(torch.equal(seen[0][k], v) for k, v in start.items())
    _, expected = prune_state(start, dense_mask(strategy.model, list(strategy.mask)), 1 - 0.2**0.5)
    assert all(torch.equal(strategy.mask[n], expected[n]) for n in expected)  # pruned from initial_arrays


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"0.weight": torch.zeros(3, 3)}, "do not fit its model"),
        ("wrong dtype", "do not fit its model"),
    ],
)
def test_initial_arrays_that_do_not_fit_are_refused_before_any_round(tmp_path, arrays, message):
    strategy = make_strategy(tmp_path)
    if arrays == "wrong dtype":
        arrays = {k: v.double() for k, v in strategy.soup.items()}
    with pytest.raises(FedSMSError, match=message):
        strategy.start(LocalGrid(make_client_app(), partitions(3)), ArrayRecord(arrays))
    assert not (tmp_path / "rounds.jsonl").exists()


def test_num_rounds_beyond_the_phase_schedule_is_refused_in_one_sentence(tmp_path):
    strategy = make_strategy(tmp_path)
    with pytest.raises(FedSMSError, match=r"num_rounds=4, but the phase schedule has 3 rounds left"):
        strategy.start(LocalGrid(make_client_app(), partitions(3)), num_rounds=4)
    assert not (tmp_path / "rounds.jsonl").exists()


def test_evaluate_fn_runs_at_round_0_and_after_every_round_and_is_recorded(tmp_path):
    strategy = make_strategy(tmp_path)
    seen = {}
    result = strategy.start(LocalGrid(make_client_app(), partitions(3)), evaluate_fn=recording_evaluate_fn(seen))

    assert sorted(seen) == [0, 1, 2, 3]
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["evaluate_fn"]) for r in rounds] == [["weight_norm"]] * 3
    assert all("accuracy" in r["central_eval"] for r in rounds)  # the strategy's own evaluation stays
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_eval"]["weight_norm"] > 0
    assert [sorted(p["evaluate_fn"]) for p in summary["phases"]] == [["weight_norm"]] * 3
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == summary["phases"]
    # Result: round 0 and every round, the user's metric beside the strategy's own
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2, 3]
    assert {"accuracy", "weight_norm"} <= set(result.evaluate_metrics_serverapp[3])
    assert result.evaluate_metrics_serverapp[3]["weight_norm"] == pytest.approx(
        rounds[-1]["evaluate_fn"]["weight_norm"]
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    final = result.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], v) for k, v in strategy.soup.items())


@pytest.mark.parametrize("node", [1, 10**19 - 1, 2**64 - 1])  # Flower's node ids are unsigned 64-bit
def test_every_node_id_is_read_back_from_the_group_id(node, monkeypatch):
    """A reply's candidate and node come from its group id; a node id of 20 digits (half of
    Flower's random ids) fell back to node-id order, so the soup's float sum depended on the ids."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a SuperLink sets them
        monkeypatch.setattr(TaskIdentity, name, value)
    reply = train_reply(3, 2, node)
    assert origin_of(reply, 3) == (2, node) and origin_of(reply, 4) is None
