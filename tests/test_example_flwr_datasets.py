"""examples/flwr_datasets: the built-in ClientApp on each client's partition from a
flwr-datasets partitioner over a local ``datasets.Dataset``: every client trains on exactly
its own partition, used whole, and the soup reaches its sparsity."""

import importlib.util
import sys
from pathlib import Path

import torch
from helpers import RecordingGrid, make_strategy, train_replies

from fedsms.masks import kept_count

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flwr_datasets"
CLIENTS = 3


def example():
    """The example's ClientApp module (under a name of its own: other examples have a
    ``client_app`` too) and its data module."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location("flwr_datasets_client_app", EXAMPLE / "client_app.py")
        client_app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(client_app)
        import partitions_task

        return client_app, partitions_task
    finally:
        sys.path.remove(str(EXAMPLE))


def test_each_client_trains_on_its_own_flwr_datasets_partition(tmp_path, one_thread):
    client_app, task = example()
    strategy = make_strategy(tmp_path, mode="data", min_available_clients=CLIENTS, run={"phases": 1})
    grid = RecordingGrid(client_app.app, [{"partition-id": i, "num-partitions": CLIENTS} for i in range(CLIENTS)])
    strategy.start(grid)
    sizes = [len(task.client_splits(i, CLIENTS, 0).train) for i in range(CLIENTS)]
    assert len(set(sizes)) > 1  # label-skewed partitions of different sizes
    for server_round in (1, 2):
        replies = sorted(train_replies(grid, server_round), key=lambda r: r.metadata.src_node_id)
        assert [int(r.content["metrics"]["num-examples"]) for r in replies] == sizes  # whole, not re-sharded
    total = sum(keep.numel() for keep in strategy.mask.values())
    assert sum(int(keep.sum()) for keep in strategy.mask.values()) == kept_count(total, 0.8)
    assert all(not strategy.soup[n][~keep].any() for n, keep in strategy.mask.items())
    assert torch.isfinite(torch.tensor(strategy.rounds[-1].central_eval["accuracy"]))
