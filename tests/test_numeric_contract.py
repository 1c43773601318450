"""One numeric contract for every value a reply brings into the soup (issue 27, point 2):
weights, dense extras, norm statistics and metrics are finite and within
``codec.MAX_MAGNITUDE`` in their own dtype, alike in both reply layouts; a round whose soup
has an unusable central evaluation is dropped (naming the client), never checkpointed."""

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import LocalGrid, digits, make_strategy, partitions, reply_of

from fedsms import codec
from fedsms.config import FederationConfig
from fedsms.models import build_for
from fedsms.norms import norm_stats
from fedsms.schema import declared
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import train_reply
from fedsms_server import gate

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def test_the_bound_keeps_the_largest_jobs_sums_finite_in_float32():
    caps = {f.name: k.cap for f, k in declared(FederationConfig)}
    clients = caps["clients_per_round"]
    assert clients * gate.MAX_EXAMPLES * codec.MAX_MAGNITUDE < FLOAT32_MAX
    assert gate.MAX_METRIC == codec.MAX_MAGNITUDE  # one bound for every value


def opened(strategy):
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), LocalGrid(make_client_app(), partitions(3)))


def state_like(strategy, fill=None, dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in strategy.soup.items():
        value = v.to(dtype) if dtype is not None else v
        out[k] = torch.full_like(value, fill) if fill is not None else value + 0.01 * torch.randn(v.shape, generator=g)
    return out


def flower_reply(node, state, examples=100):
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    return train_reply(
        1, node, node, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})})
    )


def compact_reply(strategy, node, state, examples=100):
    payload = codec.encode(
        state, strategy.mask, phase=0, round=1, kind="update", num_examples=examples, check_finite=False
    )
    return reply_of(1, node, node, payload)


@pytest.mark.parametrize(
    "layout, fill, dtype",
    [
        ("flower", 1e300, torch.float64),  # became inf when cast to float32
        ("flower", 1e30, torch.float32),  # accepted, then the soup could not be sent
        ("flower", 5e20, torch.float32),
        ("compact", 5e20, torch.float32),
    ],
)
def test_a_value_beyond_the_bound_is_refused_in_either_layout(tmp_path, layout, fill, dtype):
    strategy = make_strategy(tmp_path, min_train_clients=2)
    opened(strategy)
    bad = state_like(strategy, fill=fill, dtype=dtype)
    good = [state_like(strategy, seed=i) for i in (1, 2)]
    make = (lambda n, s: flower_reply(n, s)) if layout == "flower" else (lambda n, s: compact_reply(strategy, n, s))
    arrays, _ = strategy.aggregate_train(1, [make(0, bad), make(1, good[0]), make(2, good[1])])
    assert arrays is not None
    strategy.aggregate_evaluate(1, [])
    log = strategy.rounds[-1]
    assert log.accepted == 2 and list(log.rejected) == [0]
    assert "beyond ±1e+20" in log.rejected[0]
    assert all(codec.in_range(v) for v in strategy.soup.values() if v.is_floating_point())


def test_values_within_the_bound_are_taken_alike_in_both_layouts(tmp_path):
    soups = []
    for layout in ("flower", "compact"):
        strategy = make_strategy(tmp_path / layout, min_train_clients=2)
        opened(strategy)
        states = [state_like(strategy, seed=i) for i in range(2)]
        states[0]["net.1.bias"] = torch.full_like(states[0]["net.1.bias"], 9e19)
        replies = [
            flower_reply(i, s) if layout == "flower" else compact_reply(strategy, i, s) for i, s in enumerate(states)
        ]
        strategy.merge_replies(1, replies)  # the soup is kept or dropped alike
        soups.append(strategy.soup)
    assert all(torch.equal(v, soups[1][k]) for k, v in soups[0].items())


def test_a_round_whose_central_loss_is_not_finite_is_dropped_naming_the_client(tmp_path):
    lines = []
    strategy = make_strategy(tmp_path, min_train_clients=2, log=lines.append)
    opened(strategy)
    huge = state_like(strategy, seed=0)
    for name in huge:
        if name.endswith("weight"):
            huge[name] = torch.full_like(huge[name], 9e19 if name == "net.5.weight" else 1e15)
    replies = [compact_reply(strategy, 0, state_like(strategy, seed=1)), compact_reply(strategy, 7, huge)]
    before = {k: v.clone() for k, v in strategy.soup.items()}
    assert strategy.aggregate_train(1, replies) == (None, None)  # dropped: the retry sends the round again
    assert all(torch.equal(v, before[k]) for k, v in strategy.soup.items())
    dropped = next(line for line in lines if "dropped" in line)
    assert (
        "central evaluation is not finite (ece, loss)" in dropped and "node 7" in dropped and "diverged" not in dropped
    )
    assert not (tmp_path / "checkpoints").exists() and not strategy.rounds
    good = [compact_reply(strategy, i, state_like(strategy, seed=i)) for i in (1, 2)]
    assert strategy.aggregate_train(1, good)[0] is not None  # the retry's replies are taken
    strategy.aggregate_evaluate(1, [])
    assert strategy.rounds[-1].server_round == 1 and (tmp_path / "checkpoints").exists()


def message(content: dict) -> Message:
    return Message(RecordDict(content), dst_node_id=0, message_type="query")


def norm_reply(stats, examples=10):
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in stats.items()})
    return message({"stats": arrays, "metrics": MetricRecord({"num-examples": examples})})


def test_norm_statistics_and_metrics_keep_the_same_bound():
    template = norm_stats(build_for("cnn", digits()))
    var = next(n for n in template if n.endswith("running_var"))
    with pytest.raises(gate.Rejected, match="beyond"):  # 1e30 stopped a job: the pooled soup could not be sent
        gate.norm_stats_reply(norm_reply({**template, var: torch.full_like(template[var], 1e30)}), template)
    stats, _ = gate.norm_stats_reply(norm_reply(template), template)
    assert list(stats) == list(template)
    with pytest.raises(gate.Rejected, match="sensible size"):
        gate.evaluate_reply(message({"metrics": MetricRecord({"num-examples": 5, "loss": 1e25})}))


def test_statistics_within_the_bound_that_pool_beyond_it_are_refused():
    from fedsms.norms import NormStatsAverage, NormStatsError

    model = build_for("cnn", digits())
    template = norm_stats(model)
    mean = next(n for n in template if n.endswith("running_mean"))
    pooled = NormStatsAverage(model)
    for sign in (1, -1):  # each client's statistics keep the bound; their pooled variance (1e40) does not
        pooled.add({**template, mean: torch.full_like(template[mean], sign * 1e20)}, 10)
    with pytest.raises(NormStatsError, match="beyond"):
        pooled.result()


def test_a_global_model_beyond_the_bound_is_refused(tmp_path):
    from fedsms import FedSMSError

    strategy = make_strategy(tmp_path)
    huge = {k: torch.full_like(v, 1e30) if v.is_floating_point() else v for k, v in strategy.soup.items()}
    with pytest.raises(FedSMSError, match="beyond ±1e\\+20 in tensor"):
        strategy.configure_train(1, ArrayRecord(huge), ConfigRecord(), LocalGrid(make_client_app(), partitions(3)))
