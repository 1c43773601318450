"""An unchanged, quickstart-style Flower ClientApp (only Flower and torch) against
``SparseSoupStrategy`` with ``client-protocol = flower``: replies are accepted, the soup is
exactly sparse after every phase whatever the clients did to pruned weights, and the final
model loads with a strict ``load_state_dict``. The same job through the client toolkit is
run beside it (bench/unchanged_clients.py prints both accuracies and byte counts)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp
from helpers import LocalGrid, RecordingGrid, partitions
from safetensors.torch import load_file

from fedsms.config import FederationConfig, RunConfig, split_config
from fedsms.masks import kept_count, prunable_names
from fedsms_server.strategy import SparseSoupStrategy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def quickstart(module: str):
    sys.path.insert(0, str(EXAMPLE))
    try:
        return importlib.import_module(module), importlib.import_module("task")
    finally:
        sys.path.remove(str(EXAMPLE))


def run_job(out: Path, client_module: str, protocol: str, seed: int = 0) -> SparseSoupStrategy:
    """Two phases to 90 % as a data soup over 4 clients, each training 2 local epochs."""
    client, task = quickstart(client_module)
    torch.manual_seed(seed)
    run = RunConfig(target_sparsity=0.9, phases=2, lr=0.05, pretrain_lr=0.05, seed=seed, out_dir=str(out))
    fed = FederationConfig(mode="data", client_protocol=protocol, min_train_clients=4, min_available_clients=4)
    strategy = SparseSoupStrategy(run, fed, task.Net(), log=lambda _: None)
    strategy.start(LocalGrid(client.app, partitions(4), run_config={"local-epochs": 2}))
    return strategy


def test_an_unchanged_flower_client_app_takes_part_in_a_soup(tmp_path):
    torch.set_num_threads(1)
    strategy = run_job(tmp_path, "client_app", "flower")
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["accepted"], r["rejected"]) for r in rounds] == [(0, 4, {}), (1, 4, {}), (2, 4, {})]
    _, task = quickstart("client_app")
    model = task.Net()
    model.load_state_dict(load_file(tmp_path / "final_model.safetensors"), strict=True)
    weights = dict(model.named_parameters())
    names = prunable_names(model)
    total = sum(weights[n].numel() for n in names)
    assert sum(int(torch.count_nonzero(weights[n])) for n in names) <= kept_count(total, 0.9)
    assert sum(int(strategy.mask[n].sum()) for n in names) == kept_count(total, 0.9)
    assert all(not bool(weights[n][~strategy.mask[n]].any()) for n in names)  # exactly zero outside the mask
    assert rounds[-1]["federated_eval"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert rounds[-1]["bytes_up"] >= 4 * dense_bytes  # dense both ways: the cost of no client changes


@pytest.mark.parametrize("client_module, protocol", [("toolkit_client_app", "compact")])
def test_the_toolkit_version_of_the_same_client_sends_compact_replies(tmp_path, client_module, protocol):
    torch.set_num_threads(1)
    run_job(tmp_path, client_module, protocol)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert all(r["accepted"] == 4 for r in rounds)
    _, task = quickstart(client_module)
    dense_bytes = sum(t.numel() * t.element_size() for t in task.Net().state_dict().values())
    assert rounds[-1]["bytes_up"] < 4 * dense_bytes / 3  # values under a 90 % mask, no indices


def test_the_quickstart_client_trains_the_epochs_the_server_means(tmp_path, monkeypatch):
    """A quickstart ClientApp reads its epochs from the run config's ``local-epochs``: in the
    same run config, fedsms reads that key as its own epochs, and sends ``lr`` and
    ``local-epochs`` in every train message; a client that cannot evaluate is asked once."""
    torch.set_num_threads(1)
    client, task = quickstart("client_app")
    trained = []

    def recording_train(model, loader, epochs, optimizer):
        trained.append(epochs)
        return task.train(model, loader, epochs, optimizer)

    monkeypatch.setattr(client, "train", recording_train)
    app_config = {"local-epochs": 2, "target-sparsity": 0.9, "phases": 1, "lr": 0.05, "pretrain-lr": 0.05}
    run, fed = split_config(
        {**app_config, "mode": "data", "client-protocol": "flower", "min-train-clients": 2, "min-available-clients": 2}
    )
    run = RunConfig.from_mapping({"out_dir": str(tmp_path)}, base=run)
    torch.manual_seed(0)
    lines = []
    strategy = SparseSoupStrategy(run, fed, task.Net(), log=lines.append)
    no_evaluate = ClientApp()
    no_evaluate.train()(client.train_fn)  # the same client without its evaluate handler
    grid = RecordingGrid(no_evaluate, partitions(2), run_config=app_config)
    strategy.start(grid)
    assert (run.pretrain_epochs, run.retrain_epochs) == (2, 2) and trained == [2] * 4
    configs = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"]
    assert all(c["local-epochs"] == 2 and c["lr"] == 0.05 for c in configs)
    evaluations = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluations) == 2  # round 1's two, then no more
    assert sum("federated evaluation is off" in line for line in lines) == 1
