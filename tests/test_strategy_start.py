"""``SparseSoupStrategy.start`` end to end in one process: the real strategy and the real
built-in ClientApp, joined by an in-process grid (the SuperLink transport is covered by the
slow tests). Clients get an empty run config: the server is the job's single source of truth."""

import json

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from helpers import LocalGrid, digits, partitions
from safetensors.torch import load_file

from fedsms.checkpoint import load_checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import kept_count
from fedsms.models import build_for
from fedsms_client.app import make_client_app
from fedsms_server.strategy import RoundFailed, SparseSoupStrategy

TINY = dict(
    model="mlp",
    phases=2,
    target_sparsity=0.8,
    pretrain_epochs=5,
    retrain_epochs=2,
    candidates=3,
    ood=False,
    device="cpu",
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strategy_for(tmp_path, run=None, log=lambda _: None, **federation) -> SparseSoupStrategy:
    run = run or RunConfig(**TINY, out_dir=str(tmp_path))
    fed = FederationConfig(
        **{"min_train_clients": 2, "min_available_clients": 2, "fraction_evaluate": 0.0, **federation}
    )
    torch.manual_seed(0)
    return SparseSoupStrategy(run, fed, build_for(run.model, digits()), server_data=digits(), out_dir=tmp_path, log=log)


def test_a_whole_job_runs_and_writes_its_outputs(tmp_path):
    strategy = strategy_for(tmp_path, mode="data", clients_per_round=2)
    grid = LocalGrid(make_client_app(), partitions(4))
    result = strategy.start(grid)

    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["accepted"], r["clients"]) for r in rounds] == [(0, 2, 2), (1, 2, 2), (2, 2, 2)]
    final = load_file(tmp_path / "final_model.safetensors")
    model = build_for("mlp", digits())
    model.load_state_dict(final, strict=True)
    total = sum(strategy.mask[n].numel() for n in strategy.mask)
    assert sum(int(torch.count_nonzero(final[n])) for n in strategy.mask) <= kept_count(total, 0.8)
    assert sum(int(strategy.mask[n].sum()) for n in strategy.mask) == kept_count(total, 0.8)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "" and summary["model"]["model_class"] == type(model).__name__
    assert summary["phases"][-1]["accuracy"] > 0.5
    assert set(result.train_metrics_clientapp) == {1, 2, 3}


def trained_nodes(tmp_path) -> dict[int, set[int]]:
    """Which clients each of two rounds trained, with 3 of 6 sampled per round."""
    strategy = strategy_for(tmp_path, mode="data", clients_per_round=3)
    grid = LocalGrid(make_client_app(), partitions(6))
    strategy.start(grid, num_rounds=2)
    by_round: dict[int, set[int]] = {}
    for message in grid.sent:
        if message.metadata.message_type == "train":
            by_round.setdefault(message.content["config"]["server-round"], set()).add(message.metadata.dst_node_id)
    return by_round


def test_each_round_samples_its_clients_with_a_seed(tmp_path):
    first = trained_nodes(tmp_path / "first")
    assert sorted(first) == [1, 2] and [len(nodes) for nodes in first.values()] == [3, 3]
    assert first[1] != first[2]  # another draw each round
    assert trained_nodes(tmp_path / "second") == first  # the same draws from the same seed


def test_a_round_whose_clients_all_fail_stops_quoting_them(tmp_path):
    strategy = strategy_for(tmp_path, round_retries=0)
    wrong = build_for("cnn", digits())  # the clients' model differs from the server's
    grid = LocalGrid(make_client_app(model_fn=lambda run, splits: wrong), partitions(2))
    with pytest.raises(RoundFailed) as error:
        strategy.start(grid)
    assert "clients reported" in str(error.value) and "start more clients" not in str(error.value)
    assert "does not fit this client's model" in str(error.value)  # the mismatch itself, as the client saw it
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == str(error.value)


def test_too_few_clients_end_the_wait_with_one_sentence(tmp_path):
    strategy = strategy_for(tmp_path, min_available_clients=3, client_wait=1.0)
    with pytest.raises(RoundFailed, match=r"only 2 of the 3 clients the job needs connected within client-wait"):
        strategy.start(LocalGrid(make_client_app(), partitions(2)))


def failing_from_phase_1() -> ClientApp:
    """The fedsms ClientApp, except that training crashes once pruning has started."""
    fedsms_app, app = make_client_app(), ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if int(message.content["config"]["phase"]) >= 1:
            raise RuntimeError("the GPU fell off the bus")
        return fedsms_app(message, context)

    return app


def test_a_round_every_client_fails_alike_stops_unretried_and_resume_finishes(tmp_path):
    lines = []
    strategy = strategy_for(tmp_path, log=lines.append, round_retries=1)
    with pytest.raises(RoundFailed) as error:
        strategy.start(LocalGrid(failing_from_phase_1(), partitions(2)))
    stopped = str(error.value)
    # both clients failed the same way: a retry would too, so there is none
    assert stopped.startswith("round 2 got 0 valid replies after 0 retries") and "the GPU fell off the bus" in stopped
    assert "--resume" in stopped and not any("retrying" in line for line in lines)
    assert any("every client failed with the same error" in line for line in lines)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == stopped
    assert [json.loads(line)["server_round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1]

    resumed = strategy_for(tmp_path, log=lines.append, round_retries=1, resume=True)
    resumed.restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
    resumed.start(LocalGrid(make_client_app(), partitions(2)))
    assert any("resumed after round 1" in line for line in lines)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["server_round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == ""


def test_a_data_fn_of_the_wrong_type_is_named_in_the_stop_sentence(tmp_path):
    strategy = strategy_for(tmp_path, round_retries=0)
    grid = LocalGrid(make_client_app(data_fn=lambda run, data_dir: [1, 2, 3]), partitions(2))
    with pytest.raises(RoundFailed, match="data_fn returned list; it must return a fedsms.data.DatasetSplits"):
        strategy.start(grid)


@pytest.mark.slow  # 20 client trainings and 100 partitions: too slow for the unit tier
def test_a_data_soup_over_100_clients_trains_10_per_round(tmp_path):
    strategy = strategy_for(tmp_path, mode="data", clients_per_round=10, min_available_clients=100)
    grid = LocalGrid(make_client_app(), partitions(100))
    strategy.start(grid, num_rounds=2)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["accepted"]) for r in rounds] == [(10, 10), (10, 10)]
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert 10 < len(trained) <= 20  # two draws of 10 from 100
