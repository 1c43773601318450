"""Any task, any model: a regression task end to end through the strategy and the built-in
ClientApp, the app's own run-config keys, every weight matrix pruned (attention included),
client errors that reach the server unwrapped, and client draws that do not depend on
Flower's random node ids."""

import json
import random

import pytest
import torch
from helpers import RecordingGrid, make_strategy
from torch import nn

from fedsms import FedSMSError
from fedsms.config import FederationConfig, RunConfig, split_config
from fedsms.data import ArrayData, make_splits
from fedsms.masks import kept_count, prunable_names, prune_plan
from fedsms.task import CLASSIFICATION, REGRESSION, Task
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import partitions
from fedsms_server.gate import client_exception
from fedsms_server.strategy import RoundFailed, SparseSoupStrategy

FEATURES = 6


class Rows(nn.Module):
    """A user's tabular regressor: features as tokens, one attention layer, a value head."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.value = nn.Linear(1, hidden)
        self.attention = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        tokens = self.value(x.unsqueeze(-1))
        mixed, _ = self.attention(tokens, tokens, tokens)
        return self.head(self.norm(tokens + mixed).mean(dim=1)).squeeze(-1)


def rows(seed: int, n: int) -> ArrayData:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    return ArrayData(x, x[:, 0] - 2 * x[:, 1] + x[:, 2] * x[:, 3])


def row_splits(seed: int = 0):
    return make_splits("rows", rows(seed, 320), rows(seed + 1, 160), heldout_fraction=0.25, seed=seed)


def regression_job(out, grid_nodes: dict | None = None, **federation) -> tuple[SparseSoupStrategy, RecordingGrid]:
    """A data soup over 4 clients, 2 a round, greedy on R², the model's width from the app's own key."""
    seen = []

    def model_fn(run, splits, context):  # reads the app's own key through the Flower Context
        seen.append(context.run_config["hidden"])
        return Rows(int(context.run_config["hidden"]))

    app = make_client_app(model_fn=model_fn, data_fn=lambda run, data_dir: row_splits(), task=REGRESSION)
    grid = RecordingGrid(app, partitions(4), run_config={"hidden": 8})
    if grid_nodes is not None:
        grid.nodes = grid_nodes
    run = RunConfig(
        phases=2, target_sparsity=0.7, merge="greedy", pretrain_epochs=3, retrain_epochs=1, batch_size=16,
        lr=0.01, pretrain_lr=0.01, augment=False, ood=False, out_dir=str(out),
    )  # fmt: skip
    fed = FederationConfig(
        mode="data", pretrain_rounds=1, clients_per_round=2, min_train_clients=2, min_available_clients=4,
        fraction_evaluate=0.5, **federation,
    )  # fmt: skip
    torch.manual_seed(0)
    strategy = SparseSoupStrategy(run, fed, Rows(8), server_data=row_splits(), task=REGRESSION, log=lambda _: None)
    strategy.seen_hidden = seen
    return strategy, grid


def test_a_regression_job_scores_every_choice_and_record_by_r2(tmp_path):
    strategy, grid = regression_job(tmp_path)
    strategy.start(grid)
    assert set(strategy.seen_hidden) == {8}  # the app's own key reached model_fn

    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert all({"r2", "mse", "mae", "loss"} <= set(r["central_eval"]) for r in rounds)
    assert all("r2" in r["federated_eval"] for r in rounds)  # the clients' own metrics, example-weighted
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["phase"] for p in summary["phases"]] == [0, 1, 2] and all("r2" in p for p in summary["phases"])
    diagnostics = summary["phases"][-1]["diagnostics"]
    assert diagnostics["score"] == "r2" and {"heldout_r2", "test_r2"} <= set(diagnostics["soup"])
    assert summary["model"]["task"] == "regression" and summary["model"]["dataset"] == "rows"
    assert summary["model"]["model"].endswith("Rows") and summary["model"]["model_class"] == "Rows"
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert results[-1]["r2"] == rounds[-1]["central_eval"]["r2"] > 0  # learnt something; 0 is the mean

    # every weight matrix is pruned to the exact count, attention's projections included
    names = list(strategy.mask)
    assert {"attention.in_proj_weight", "attention.out_proj.weight", "value.weight", "head.weight"} == set(names)
    total = sum(strategy.mask[n].numel() for n in names)
    assert sum(int(strategy.mask[n].sum()) for n in names) == kept_count(total, 0.7)
    assert all(not strategy.soup[n][~strategy.mask[n]].any() for n in names)
    assert summary["model"]["sparsity"] == pytest.approx(0.7, abs=1 / total)
    assert summary["model"]["sparsity_all"] < summary["model"]["sparsity"]


def test_the_same_seed_draws_the_same_partitions_whatever_the_node_ids(tmp_path):
    """Flower draws node ids at random; the draw goes by the partition-ids the clients report."""
    soups, drawn = [], []
    for run in range(2):
        ids = random.Random(run).sample(range(10**6, 10**7), 4)
        strategy, grid = regression_job(
            tmp_path / str(run), {node: {"partition-id": i, "num-partitions": 4} for i, node in enumerate(ids)}
        )
        strategy.start(grid)
        rounds = [json.loads(line) for line in (tmp_path / str(run) / "rounds.jsonl").read_text().splitlines()]
        drawn.append([r["partitions"] for r in rounds])
        soups.append(strategy.soup)
    assert drawn[0] == drawn[1] and all(len(p) == 2 for p in drawn[0])
    assert len({tuple(p) for p in drawn[0]}) > 1  # the draw does change from round to round
    assert all(torch.equal(soups[0][k], soups[1][k]) for k in soups[0])


def test_a_client_that_always_fails_the_same_way_is_not_retried_and_its_exception_is_said(tmp_path):
    lines = []
    strategy = make_strategy(tmp_path, round_retries=3, log=lines.append)
    app = make_client_app(model_fn=lambda run, splits: (_ for _ in ()).throw(ValueError("shard 3 is empty")))
    grid = RecordingGrid(app, partitions(2))
    with pytest.raises(RoundFailed, match="ValueError: shard 3 is empty"):
        strategy.start(grid)
    assert not any("retrying" in line for line in lines)
    assert len([m for m in grid.sent if m.metadata.message_type == "train"]) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "the client failed: ValueError: shard 3 is empty" in summary["stopped"]


def test_a_retry_leaves_out_the_client_that_failed(tmp_path):
    strategy = make_strategy(tmp_path, mode="data", clients_per_round=2, min_available_clients=3, round_retries=1)
    grid = RecordingGrid(make_client_app(), partitions(3))
    failing = []

    def drop(message):  # the first client drawn never answers
        if message.metadata.message_type != "train":
            return False
        failing[:] = failing or [message.metadata.dst_node_id]
        return message.metadata.dst_node_id == failing[0]

    grid.drop = drop
    strategy.start(grid, num_rounds=1)
    trains = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 4 and trains.count(failing[0]) == 1, trains  # the retry drew the two others
    assert strategy.rounds[0].accepted == 2 and set(strategy.rounds[0].rejected) == set(failing)


@pytest.mark.parametrize(
    "reason, said",
    [
        ("<class 'ValueError'>:<'shard 3 is empty'>", "ValueError: shard 3 is empty"),
        (
            "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=7, ip=1)\n"
            '  File "app.py", line 9, in train\n    raise KeyError("hidden")\nKeyError: \'hidden\'\n\n'
            "The above exception was the direct cause of the following exception:\n\n"
            '  File "ray_actor.py", line 65, in run\n    raise ClientAppException(str(ex)) from ex\n'
            "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
            "Message: 'hidden''>",
            "KeyError: 'hidden'",
        ),
        ("timed out", "timed out"),
    ],
)
def test_client_exceptions_come_out_of_flower_and_ray_wrappers(reason, said):
    assert client_exception(reason) == said


def test_own_keys_are_left_to_the_app_and_near_misses_are_refused():
    run, fed = split_config({"hidden": 24, "target-sparsity": 0.5, "rows-per-client": 9}, strict=False)
    assert run.target_sparsity == 0.5
    with pytest.raises(FedSMSError, match="unknown config key 'hidden'"):
        split_config({"hidden": 24})  # the CLI and the built-in app know every key
    with pytest.raises(FedSMSError, match="did you mean 'target-sparsity'"):
        split_config({"target-sparsty": 0.5}, strict=False)
    run, _ = split_config({"local-epochs": 2}, strict=False)  # Flower's quickstart key
    assert (run.pretrain_epochs, run.retrain_epochs) == (2, 2)
    with pytest.raises(FedSMSError, match="'local-epochs' sets 'retrain-epochs' too"):
        split_config({"local-epochs": 2, "retrain-epochs": 3})


def test_every_weight_matrix_is_prunable_and_the_plan_says_why_not():
    model = nn.Sequential(
        nn.Embedding(10, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.GRU(8, 8), nn.Linear(8, 3)
    )
    names = prunable_names(model)
    assert "1.self_attn.in_proj_weight" in names and "1.self_attn.out_proj.weight" in names
    assert {"2.weight_ih_l0", "2.weight_hh_l0", "1.linear1.weight", "3.weight"} <= set(names)
    plan = dict(prune_plan(model, exclude="3.*"))
    assert plan["0.weight"].startswith("embedding") and plan["1.norm1.weight"] == "norm layer"
    assert plan["3.weight"] == "excluded by '3.*'" and plan["1.self_attn.in_proj_weight"] == ""
    assert "0.weight" in prunable_names(model, include="0.*")


def test_tasks_check_what_their_metrics_give():
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert REGRESSION.evaluate(y.unsqueeze(1), y)["r2"] == 1.0  # (N, 1) outputs for (N,) targets
    assert REGRESSION.evaluate(torch.full((4,), 1.5), y)["r2"] == 0.0
    with pytest.raises(FedSMSError, match="one output per target value"):
        REGRESSION.evaluate(torch.zeros(4, 2), y)
    with pytest.raises(FedSMSError, match="pass task=REGRESSION"):
        CLASSIFICATION.evaluate(torch.zeros(4), y)
    bad = Task("mine", None, lambda o, t: {"loss": 1.0}, score="f1")
    with pytest.raises(FedSMSError, match=r"without \['f1'\]"):
        bad.evaluate(y, y)
    assert Task("err", None, lambda o, t: {"loss": 1.0, "mse": 2.0}, "mse", maximize=False).better(2.0) == -2.0


def test_a_resumed_job_draws_what_the_uninterrupted_job_drew(tmp_path):
    from fedsms.checkpoint import load_checkpoint

    def nodes(seed):
        ids = random.Random(seed).sample(range(10**6, 10**7), 4)
        return {node: {"partition-id": i, "num-partitions": 4} for i, node in enumerate(ids)}

    whole, grid = regression_job(tmp_path / "whole", nodes(0))
    whole.start(grid)
    first, grid = regression_job(tmp_path / "resumed", nodes(1))
    first.start(grid, num_rounds=2)
    again, grid = regression_job(tmp_path / "resumed", nodes(2), resume=True)  # new node ids after the restart
    again.restore(load_checkpoint(tmp_path / "resumed" / "checkpoints" / "soup"))
    again.start(grid)
    assert [r.partitions for r in again.rounds] == [r.partitions for r in whole.rounds]
    assert all(torch.equal(again.soup[k], whole.soup[k]) for k in whole.soup)
