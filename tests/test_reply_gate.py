"""The reply gate (fedsms_server.gate): train, evaluate and norm-statistics replies with
hostile fields are rejected with a short reason and never crash a round (issue 12, points
1, 2, 8, 15b), and any unexpected error ends the job at its last completed round."""

import io
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import LocalGrid, digits, partitions, reply_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedsms import codec
from fedsms.checkpoint import load_checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.models import build_for
from fedsms.norms import NormStatsAverage, NormStatsError, norm_stats
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import train_reply
from fedsms_flower.records import record_of
from fedsms_server import gate
from fedsms_server.strategy import JobStopped, SparseSoupStrategy
from fedsms_server.updates import unpack_reply

SPLITS = digits()


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a SuperLink would set


def make_strategy(tmp_path, model="mlp", **federation):
    run = RunConfig(
        model=model,
        phases=1,
        target_sparsity=0.5,
        out_dir=str(tmp_path),
        ood=False,
        pretrain_epochs=1,
        retrain_epochs=1,
    )
    fed = FederationConfig(pretrain_rounds=1, min_train_clients=1, **federation)
    torch.manual_seed(0)
    return SparseSoupStrategy(
        run, fed, build_for(model, SPLITS), server_data=SPLITS, out_dir=tmp_path, log=lambda _: None
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


def update_payload(strategy, server_round, examples=100, scale=1.0, seed=0):
    phase = strategy.schedule[server_round - 1].phase
    g = torch.Generator().manual_seed(seed)
    state = {
        k: (v + scale * torch.randn(v.shape, generator=g) * strategy.mask.get(k, 1)) if v.is_floating_point() else v
        for k, v in strategy.soup.items()
    }
    return codec.encode(state, strategy.mask, phase=phase, round=server_round, kind="update", num_examples=examples)


def reply(content: dict) -> Message:
    return Message(RecordDict(content), dst_node_id=0, message_type="train")


def train_reply_of(node: int, content: dict, server_round: int = 1) -> Message:
    """The reply of ``node`` (candidate ``node``) to its train message of ``server_round``, holding ``content``."""
    return train_reply(server_round, node, node, RecordDict(content))


BAD_TRAIN_METRICS = [
    {"train_loss": float("nan")},
    {"train_loss": float("inf")},
    {"train_loss": -float("inf")},
    {"train_loss": [1.0, 2.0]},
    {"train_loss": 1e300},
    {f"k{i}": 1.0 for i in range(100)},
]


def test_train_replies_with_bad_metrics_are_rejected_and_the_round_checkpoints(tmp_path):
    strategy = make_strategy(tmp_path)
    opened(strategy)
    payload = update_payload(strategy, 1)
    good = [
        train_reply_of(node, {"update": record_of(payload), "metrics": MetricRecord(m)})
        for node, m in enumerate([{"train_loss": 0.5}, {}, {"train_loss": 0.7, "extra": 1.0}])
    ]
    bad = {
        10 + i: train_reply_of(10 + i, {"update": record_of(payload), "metrics": MetricRecord(m)})
        for i, m in enumerate(BAD_TRAIN_METRICS)
    }
    bad[20] = train_reply_of(20, {"update": record_of(payload), "metrics": ConfigRecord({"train_loss": "low"})})
    bad[21] = train_reply_of(21, {"update": record_of(payload)})  # no metrics
    arrays, metrics = strategy.aggregate_train(1, [*good, *bad.values()])

    assert arrays is not None
    assert dict(metrics) == {"train_loss": pytest.approx(0.6), "extra": 1.0}  # each key over the replies carrying it
    log = closed(strategy)
    assert log.accepted == 3
    assert set(log.rejected) == set(bad)
    assert log.train == {"train_loss": pytest.approx(0.6), "extra": 1.0}
    assert load_checkpoint(tmp_path / "checkpoints" / "soup").metadata["server_round"] == 1


def eval_reply(metrics) -> Message:
    return reply({"metrics": MetricRecord(metrics) if not isinstance(metrics, ConfigRecord) else metrics})


@pytest.mark.parametrize(
    "metrics",
    [
        {"accuracy": 0.5},
        {"accuracy": 0.5, "num-examples": float("nan")},
        {"accuracy": 0.5, "num-examples": float("inf")},
        {"accuracy": 0.5, "num-examples": -1000},
        {"accuracy": 0.5, "num-examples": 0},
        {"accuracy": 0.5, "num-examples": 10**12},
        {"accuracy": 0.5, "num-examples": 2.5},
        {"accuracy": float("nan"), "num-examples": 10},
        {"accuracy": [0.5], "num-examples": 10},
        ConfigRecord({"accuracy": "x", "num-examples": 10}),
    ],
)
def test_bad_evaluation_replies_are_rejected(tmp_path, metrics):
    strategy = make_strategy(tmp_path)
    opened(strategy)
    good = eval_reply({"accuracy": 0.9, "num-examples": 100})
    assert dict(strategy.aggregate_evaluate(1, [good, eval_reply(metrics)])) == {"accuracy": pytest.approx(0.9)}


def test_an_evaluation_round_of_only_bad_replies_reports_nothing(tmp_path):
    strategy = make_strategy(tmp_path)
    opened(strategy)
    assert strategy.aggregate_evaluate(1, [eval_reply({"accuracy": 1.0, "num-examples": -5})]) is None


def npy_array(shape, dtype="float32", data_shape=None) -> Array:
    """An Array whose header says ``shape`` but whose bytes hold ``data_shape``."""
    real = np.zeros(data_shape if data_shape is not None else shape, dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, real, allow_pickle=False)
    data = buffer.getvalue()
    if data_shape is not None:
        data = data.replace(repr(tuple(data_shape)).encode(), repr(tuple(shape)).encode())
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


def test_an_array_header_with_an_absurd_shape_is_rejected_without_allocating():
    array = npy_array((2**50,), data_shape=(16,))
    with pytest.raises(gate.Rejected, match="declares"):
        gate.array_fits("payload", array)
    update = unpack_reply(
        reply({"update": ArrayRecord({"payload": npy_array((2**50,), "uint8", (16,))}), "metrics": MetricRecord({})}), 3
    )
    assert "declares" in update.error


def norm_reply(stats: dict, examples) -> Message:
    arrays = ArrayRecord({k: Array(v.numpy()) if isinstance(v, torch.Tensor) else v for k, v in stats.items()})
    return reply({"stats": arrays, "metrics": MetricRecord({"num-examples": examples})})


def test_bad_norm_statistics_are_rejected_and_the_pool_stays_finite():
    model = build_for("cnn", SPLITS)
    template = norm_stats(model)
    first = next(n for n in template if n.endswith("running_mean"))
    var = first[: -len("mean")] + "var"
    cases = {
        "nan": ({**template, first: torch.full_like(template[first], float("nan"))}, 10),
        "negative variance": ({**template, var: -torch.ones_like(template[var])}, 10),
        "huge count": (template, 10**15),
        "zero count": (template, 0),
        "wrong shape": ({**template, first: torch.zeros(3)}, 10),
        "absurd header": ({**template, first: npy_array((2**40,), data_shape=tuple(template[first].shape))}, 10),
        "missing": ({k: v for k, v in template.items() if k != first}, 10),
    }
    pooled = NormStatsAverage(model)
    for _label, (stats, examples) in cases.items():
        with pytest.raises(gate.Rejected):
            pooled.add(*gate.norm_stats_reply(norm_reply(stats, examples), pooled.template))
    pooled.add(*gate.norm_stats_reply(norm_reply(template, 10), pooled.template))
    assert pooled.count == 1 and all(torch.isfinite(v.double()).all() for v in pooled.result().values())


def test_norm_stats_average_checks_before_adding_and_refuses_to_pool_nothing():
    model = build_for("cnn", SPLITS)
    pooled = NormStatsAverage(model)
    with pytest.raises(NormStatsError, match="nothing to pool"):
        pooled.result()
    g = torch.Generator().manual_seed(0)  # statistics unlike the template's, so a stray sum shows
    stats = {
        k: v + torch.rand(v.shape, generator=g) if v.is_floating_point() else v for k, v in norm_stats(model).items()
    }
    alone = NormStatsAverage(model)
    alone.add(stats, 10)
    last = list(stats)[-2]  # a late tensor of the wrong shape: nothing before it may be summed
    with pytest.raises(NormStatsError, match="shape"):
        pooled.add({**stats, last: torch.zeros(1, 2, 3)}, 10)
    assert pooled.count == 0 and pooled.examples == 0
    with pytest.raises(NormStatsError, match="NaN"):
        pooled.add({**stats, last: torch.full_like(stats[last], float("nan"))}, 10)
    assert pooled.count == 0 and pooled.examples == 0
    pooled.add(stats, 10)  # the refused adds left nothing behind: the pool is that one client's
    assert all(torch.equal(value, alone.result()[name]) for name, value in pooled.result().items())


def test_reasons_are_short_and_escaped(tmp_path):
    forged = "oom\n2026-01-01 INFO round 9: all fine\x1b[31m" + "x" * (16 << 20)
    error_reply = Message(
        Error(code=0, reason=forged), reply_to=Message(RecordDict(), dst_node_id=1, message_type="train")
    )
    update = unpack_reply(error_reply, 4)
    assert len(update.error) <= gate.MAX_REASON and "\n" not in update.error and "\x1b" not in update.error
    strategy = make_strategy(tmp_path)
    opened(strategy)
    dense = next(k for k in strategy.soup if k not in strategy.mask)
    state = {("w" * (4 << 20) if k == dense else k): v for k, v in strategy.soup.items()}
    payload = codec.encode(state, strategy.mask, phase=0, round=1, kind="update", num_examples=10)
    long_name = train_reply_of(5, {"update": record_of(payload), "metrics": MetricRecord({})})
    assert strategy.aggregate_train(1, [long_name, reply_of(1, 4, 4, error=forged)]) == (None, None)
    log = closed(strategy)
    assert set(log.rejected) == {4, 5}
    assert all(len(r) <= gate.MAX_REASON and "\n" not in r and "\x1b" not in r for r in log.rejected.values())


# ---- property: whatever the fields, the gate returns checked values or rejects ------------

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63 - 1),
    st.lists(st.floats(allow_nan=False), max_size=3),
)
metric_records = st.dictionaries(
    st.sampled_from(["num-examples", "accuracy", "loss", "x" * 200, "a"]), numbers, max_size=4
)
headers = st.tuples(
    st.sampled_from(["float32", "float64", "int64", "uint8"]),
    st.lists(st.integers(0, 2**62), max_size=3),
    st.lists(st.integers(0, 4), max_size=3),
)


def hostile_array(header) -> Array:
    dtype, shape, data_shape = header
    return npy_array(shape, dtype, data_shape) if shape != data_shape else npy_array(shape, dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["train", "evaluate", "norm_stats"]),
    metrics=metric_records,
    header=headers,
    drop=st.sampled_from([None, "metrics", "update", "stats"]),
)
def test_property_every_reply_kind_is_checked_or_rejected(kind, metrics, header, drop):
    template = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}
    content = {"metrics": MetricRecord(metrics)}
    if kind == "train":
        content["update"] = ArrayRecord({"payload": hostile_array(("uint8",) + header[1:])})
    elif kind == "norm_stats":
        content["stats"] = ArrayRecord(
            {"bn.running_mean": hostile_array(header), "bn.running_var": Array(np.ones(4, "float32"))}
        )
    content.pop(drop, None)
    message = reply(content)
    try:
        if kind == "train":
            payload, values = gate.train_reply(message)
            assert isinstance(payload, memoryview) and payload.readonly  # read in place, never written
        elif kind == "evaluate":
            values, count = gate.evaluate_reply(message)
            assert 1 <= count <= gate.MAX_EXAMPLES
        else:
            stats, count = gate.norm_stats_reply(message, template)
            assert 1 <= count <= gate.MAX_EXAMPLES
            assert all(bool(torch.isfinite(v).all()) and v.shape == (4,) for v in stats.values())
            values = {}
    except gate.Rejected as error:
        assert 0 < len(str(error)) <= gate.MAX_REASON and str(error).isprintable()
        return
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())


# ---- any unexpected error: stopped at the last completed round, with a summary ----------


def test_an_unexpected_error_stops_the_job_at_the_last_completed_round(tmp_path):
    from helpers import LocalGrid, partitions

    from fedsms_client.app import make_client_app

    strategy = make_strategy(tmp_path, min_available_clients=2, fraction_evaluate=0.0)
    calls = []

    def central_evaluation():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire\nFAKE LOG LINE")
        return {}

    strategy.central_evaluation = central_evaluation
    with pytest.raises(JobStopped, match=r"last completed round \(1\)"):
        strategy.start(LocalGrid(make_client_app(), partitions(2)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "disk on fire" in summary["stopped"] and "\n" not in summary["stopped"]
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "soup")
    assert checkpoint.metadata["server_round"] == 1
    exported = load_file(tmp_path / "final_model.safetensors")  # round 1's soup, not the unfinished round's
    assert all(torch.equal(exported[k], checkpoint.state[k]) for k in exported)
