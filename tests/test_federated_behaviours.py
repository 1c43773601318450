"""Promises of the README that only a whole round shows, each through ``strategy.start`` with
the real ClientApp behind an in-process grid: a straggler, a retry after a partial failure,
half-precision values end to end, each client its own candidate (hyperparameter soup) or its
own shard (data soup, ``iid`` and ``shards`` partitioning), ``fedsms simulate --baselines``,
and that a local SMS soup is the mean of its candidates."""

import json
from dataclasses import replace

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from helpers import RecordingGrid, digits, in_process_simulation, make_strategy, partitions, payloads, train_replies

from fedsms import codec
from fedsms.data.partition import partition
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate
from fedsms_client.app import make_client_app
from fedsms_flower.records import payload_of, wire_name

pytestmark = pytest.mark.usefixtures("one_thread")


def decoded(strategy, payload: bytes) -> codec.Decoded:
    return codec.decode(payload, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup)


def assert_soup_is_the_mean_of(strategy, replies: list[Message]) -> None:
    states = [decoded(strategy, p).to_state_dict(strategy.soup) for p in payloads(replies)]
    for name, value in strategy.soup.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([s[name] for s in states]).mean(0), rtol=1e-5, atol=1e-6)


def one_round_job(tmp_path, **federation):
    """A data soup that starts in phase 1 with two rounds a phase: round 1 only averages."""
    return make_strategy(tmp_path, pretrain_rounds=0, rounds_per_phase=2, mode="data", **federation)


# ---- stragglers and retries ---------------------------------------------------------------


def test_a_straggler_is_left_out_of_the_soup_with_its_reason_and_asked_again(tmp_path):
    strategy = one_round_job(tmp_path, min_available_clients=3)
    grid = RecordingGrid(make_client_app(), partitions(3))
    late = 1002  # alive, but its round-1 reply misses round-timeout
    grid.drop = lambda m: m.metadata.dst_node_id == late and m.content["config"].get("server-round") == 1
    strategy.start(grid, num_rounds=2)

    first, second = strategy.rounds
    assert first.accepted == 2 and set(first.rejected) == {late}
    assert first.rejected[late] == f"no reply within round-timeout ({strategy.fed.round_timeout:g} s)"
    assert second.accepted == 3 and not second.rejected  # not written off: asked again, and counted
    assert [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"] == [1000, 1001, 1002] * 2
    assert_soup_is_the_mean_of(strategy, train_replies(grid, 2))
    assert first.bytes_up == sum(len(p) for p in payloads(train_replies(grid, 1)))


def test_after_a_partial_failure_the_round_is_sent_again_and_only_the_new_replies_count(tmp_path):
    lines = []
    strategy = one_round_job(tmp_path, round_retries=2, log=lines.append)
    grid = RecordingGrid(make_client_app(), partitions(2))
    attempts = []

    def drop(message):  # node 1001 misses the first attempt only
        if message.metadata.message_type != "train":
            return False
        attempts.append(message.metadata.dst_node_id)
        return message.metadata.dst_node_id == 1001 and attempts.count(1001) == 1

    grid.drop = drop
    strategy.start(grid, num_rounds=1)

    assert attempts == [1000, 1001, 1000, 1001]
    assert any("round 1: retrying (1 of 2)" in line for line in lines)
    assert not any("retrying (2 of 2)" in line for line in lines)
    (log,) = strategy.rounds
    assert log.accepted == 2 and log.clients == 2
    replies = train_replies(grid, 1)
    assert len(replies) == 3  # 1000 twice, 1001 once: the soup is the second attempt's two replies
    assert_soup_is_the_mean_of(strategy, replies[1:])  # a leak of the first attempt would count 1000 twice


# ---- half-precision values on the wire ------------------------------------------------------


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16"])
def test_half_precision_values_travel_both_ways_and_average_exactly(tmp_path, value_dtype):
    strategy = one_round_job(tmp_path, value_dtype=value_dtype)
    grid = RecordingGrid(make_client_app(), partitions(2))
    strategy.start(grid, num_rounds=1)

    down = [payload_of(m.content["soup"]) for m in grid.sent if m.metadata.message_type == "train"]
    up = payloads(train_replies(grid, 1))
    assert {decoded(strategy, p).value_dtype for p in down + up} == {value_dtype}
    bound = codec.payload_size_bound(strategy.mask, strategy.soup, value_dtype, kind="soup")
    assert bound <= len(down[0]) <= bound + 1024  # 2 bytes a value, not 4
    assert strategy.rounds[0].bytes_down == len(down[0]) * 2
    wire = {"fp16": torch.float16, "bf16": torch.bfloat16}[value_dtype]
    for payload in up:  # what came back is representable in the wire type: it went through it
        for values in decoded(strategy, payload).values.values():
            assert torch.equal(values, values.to(wire).float())
    assert_soup_is_the_mean_of(strategy, train_replies(grid, 1))
    assert strategy.rounds[0].central_eval["accuracy"] > 0.3  # it learns through half precision


# ---- who trains what --------------------------------------------------------------------------


def test_each_client_retrains_its_own_candidate_of_the_recipe(tmp_path):
    recipe = [(0.0, 0.05), (0.0, 0.1), (0.01, 0.05), (0.01, 0.1)]  # weight_decay outer, lr inner
    strategy = make_strategy(
        tmp_path,
        run=dict(recipe="weight_decay=0,0.01;lr=0.05,0.1", candidates=4),
        pretrain_rounds=0,
        rounds_per_phase=2,
        min_available_clients=4,
    )
    grid = RecordingGrid(make_client_app(), partitions(5))  # one more client than candidates
    strategy.start(grid, num_rounds=1)

    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    configs = [m.content["config"] for m in sent]
    assert [(c["weight-decay"], c["lr"]) for c in configs] == recipe
    assert len({c["seed"] for c in configs}) == 4
    replies = {r.metadata.reply_to_message_id: r for r in train_replies(grid, 1)}
    fields_ = CandidateConfig.__dataclass_fields__
    for message, config in zip(sent, configs):  # each reply is its own candidate retrained on all the data
        soup = codec.decode(
            payload_of(message.content["soup"]), expected_mask=None, expected_digest=None, template=strategy.soup
        )
        model = build_for("mlp", digits())
        model.load_state_dict(soup.to_state_dict(model.state_dict()))
        train_candidate(
            model, soup.mask, digits().train, CandidateConfig.from_dict({k: config[wire_name(k)] for k in fields_})
        )
        got = decoded(strategy, payloads([replies[message.metadata.message_id]])[0])
        assert got.num_examples == len(digits().train)
        for name, keep in soup.mask.items():
            assert torch.equal(got.values[name], model.state_dict()[name][keep]), name


def recording_app(seen: dict[int, list[int]]) -> ClientApp:
    """The fedsms ClientApp on digits whose pixel (0, 0, 0) holds each training example's
    index; it records, per client, the indices its model was trained on."""
    train = digits().train
    images = train.images.clone()
    images[:, 0, 0, 0] = torch.arange(len(train), dtype=torch.float32) / 4096
    marked = replace(digits(), train=replace(train, images=images))
    current = []

    def model_fn(run, splits):
        model = build_for(run.model, splits)
        model.register_forward_pre_hook(
            lambda module, args: (
                seen[current[-1]].extend((args[0][:, 0, 0, 0] * 4096).round().long().tolist())
                if module.training
                else None
            )
        )
        return model

    fedsms_app, app = make_client_app(model_fn=model_fn, data_fn=lambda run, data_dir: marked), ClientApp()

    @app.train()
    def train_(message: Message, context: Context) -> Message:
        current.append(int(context.node_config["partition-id"]))
        seen[current[-1]] = []
        return fedsms_app(message, context)

    return app


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_in_a_data_soup_each_client_trains_on_its_own_shard_of_the_configured_partitioning(tmp_path, scheme):
    seen: dict[int, list[int]] = {}
    strategy = one_round_job(tmp_path, partitioning=scheme, min_available_clients=4)
    strategy.start(RecordingGrid(recording_app(seen), partitions(4)), num_rounds=1)

    labels = digits().train.labels
    expected = partition(labels, scheme, 4, seed=strategy.run.seed)  # disjoint shards covering the data
    batch = strategy.run.batch_size
    assert sorted(seen) == [0, 1, 2, 3]
    for pid, indices in seen.items():
        shard = set(expected[pid].tolist())
        assert len(indices) == len(set(indices))  # one epoch: each example at most once
        assert set(indices) <= shard  # only its own shard...
        assert len(shard) - len(indices) < batch  # ...all of it but a last partial batch
    classes = [len(labels[torch.tensor(i)].unique()) for i in seen.values()]
    # two label-sorted shards of ~160 examples per client (a class has ~130): a few classes each
    assert all(c <= 6 for c in classes) if scheme == "shards" else all(c == 10 for c in classes)


# ---- the local driver and the simulate command ---------------------------------------------


def test_a_local_sms_soup_is_the_mean_of_its_candidates(tmp_path):
    from fedsms.checkpoint import load_checkpoint
    from fedsms.config import RunConfig
    from fedsms.local import LocalRun

    config = RunConfig(
        model="mlp",
        phases=2,
        target_sparsity=0.8,
        candidates=3,
        pretrain_epochs=1,
        retrain_epochs=1,
        methods="sms",
        ood=False,
        device="cpu",
        out_dir=str(tmp_path),
        augment=False,
    )
    run = LocalRun(config, log=lambda _: None)
    trained = []
    original = run.trainer.train
    run.trainer.train = lambda *args, **kwargs: trained.append(original(*args, **kwargs)) or trained[-1]
    try:
        rows = run.run()
    finally:
        run.close()
    last = [state for state, _ in trained[-1]]
    assert len(trained) == 3 and len(last) == 3  # dense, then 3 candidates in each of 2 phases
    soup = load_checkpoint(tmp_path / "checkpoints" / "seed0-sms").state
    for name in soup:
        torch.testing.assert_close(soup[name], torch.stack([s[name] for s in last]).mean(0), rtol=1e-6, atol=1e-7)
    assert [r["method"] for r in rows] == ["dense", "ensemble", "sms", "ensemble", "sms"]


def test_simulate_with_baselines_compares_like_with_like(tmp_path, monkeypatch, capsys):
    import functools

    import fedsms_flower.simulation
    from fedsms.checkpoint import load_checkpoint
    from fedsms.cli import main

    started = {}
    in_process = functools.partial(in_process_simulation, started=started)
    monkeypatch.setattr(fedsms_flower.simulation, "simulate", in_process)
    out = tmp_path / "job"
    tiny = ["--model", "mlp", "--phases", "1", "--target-sparsity", "0.5", "--candidates", "2"]
    tiny += ["--pretrain-epochs", "1", "--retrain-epochs", "1", "--ood", "false", "--device", "cpu"]
    argv = ["simulate", *tiny, "--num-clients", "2", "--baselines", "imp,sms", "--out-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    local = [json.loads(line) for line in (out / "local" / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["phase"]) for r in local} >= {("dense", 0), ("imp", 1), ("sms", 1)}
    # the federated job pruned the baselines' dense model: no dense rounds of its own
    dense = load_checkpoint(out / "local" / "checkpoints" / "seed0-dense").state
    assert started.keys() == dense.keys() and all(torch.equal(started[k], dense[k]) for k in dense)
    federated = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in federated] == ["fed-hyperparameter"]
    assert "the federated job then starts from their dense model" in printed
    tables = printed[printed.index("test accuracy (%)") :]
    for method in ("dense", "imp", "sms", "fed-hyperparameter"):
        assert f"\n{method} " in tables
    assert "\nensemble " not in tables  # sms's ensemble was not asked for
    assert "Every method started from the same dense model" in tables and "± 0.00" not in tables
    assert max(len(line) for line in tables.splitlines() if not line.startswith("federated results")) <= 100
    assert list((out / "comparison").glob("*.png")) and (out / "local" / "diagnostics_sms.png").is_file()


def test_simulate_with_baselines_refuses_dense_rounds_of_its_own(tmp_path, capsys):
    from fedsms.cli import main

    argv = ["simulate", "--baselines", "imp", "--pretrain-rounds", "2", "--out-dir", str(tmp_path / "job")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "drop --pretrain-rounds or --baselines" in err and err.count("\n") == 1
