"""Helpers shared by the tests. Nothing here loads data at import time."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from flwr.app import Message

from fedsms.data import DatasetSplits, load_dataset
from fedsms_flower.local_grid import LocalGrid, partitions

__all__ = [
    "LocalGrid",
    "RecordingGrid",
    "digits",
    "in_process_simulation",
    "make_strategy",
    "partitions",
    "payloads",
    "reply_of",
    "train_replies",
]


@lru_cache(maxsize=1)
def digits() -> DatasetSplits:
    """The embedded digits data, loaded once per test process on first use."""
    return load_dataset("digits")


class RecordingGrid(LocalGrid):
    """A ``LocalGrid`` that also keeps every reply it hands back, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def train_replies(grid: LocalGrid, server_round: int | None = None) -> list[Message]:
    """The train replies a ``RecordingGrid`` handed back (of one server round if given)."""
    sent = {m.metadata.message_id: m for m in grid.sent}
    out = []
    for reply in grid.replies:
        request = sent.get(reply.metadata.reply_to_message_id)
        if request is None or request.metadata.message_type != "train" or reply.has_error():
            continue
        if server_round is None or int(request.content["config"]["server-round"]) == server_round:
            out.append(reply)
    return out


def make_strategy(out_dir, *, model: str = "mlp", server_data=True, log=None, run: dict | None = None, **federation):
    """A small ``SparseSoupStrategy`` on digits with seeded starting weights: two phases to
    80 % sparsity, one-epoch candidates, no OOD; ``run`` and ``federation`` override."""
    import torch

    from fedsms.config import FederationConfig, RunConfig
    from fedsms.models import build_for
    from fedsms_server.strategy import SparseSoupStrategy

    settings = {
        **dict(
            model=model,
            phases=2,
            target_sparsity=0.8,
            pretrain_epochs=1,
            retrain_epochs=1,
            batch_size=32,
            candidates=3,
            augment=False,
            ood=False,
            device="cpu",
            soup_guard="off",  # these tests check the averaged soup itself; the guard has its own tests
            out_dir=str(out_dir),
        ),
        **(run or {}),
    }
    fed = FederationConfig(
        **{
            "pretrain_rounds": 1,
            "min_train_clients": 2,
            "min_available_clients": 2,
            "fraction_evaluate": 0.0,
            **federation,
        }
    )
    torch.manual_seed(0)
    data = digits()
    return SparseSoupStrategy(
        RunConfig(**settings),
        fed,
        build_for(model, data),
        server_data=data if server_data else None,
        out_dir=out_dir,
        log=log or (lambda _: None),
    )


def payloads(replies: Iterable[Message]) -> list[bytes]:
    """The update payloads of train replies."""
    from fedsms_flower.records import payload_of

    return [payload_of(r.content["update"]) for r in replies]


def reply_of(server_round: int, candidate: int, node: int, payload: bytes | None = None, *, error: str = "", **metrics):
    """A train reply as node ``node`` would send it for ``candidate`` of ``server_round``:
    the compact ``payload`` (with ``metrics``), or an error reply when ``error`` is given."""
    from flwr.app import MetricRecord, RecordDict

    from fedsms_flower.local_grid import train_reply
    from fedsms_flower.records import record_of

    if error:
        return train_reply(server_round, candidate, node, error=error)
    return train_reply(
        server_round, candidate, node, RecordDict({"update": record_of(payload), "metrics": MetricRecord(metrics)})
    )


def in_process_simulation(config, num_clients, *, started: dict | None = None, **resources) -> None:
    """A stand-in for ``fedsms_flower.simulation.simulate`` that runs the same strategy and
    ClientApp in this process (the transport is the slow tests' business); ``started``
    receives the soup the job starts from."""
    from fedsms.config import split_config
    from fedsms_client.app import make_client_app
    from fedsms_server.app import build_strategy

    run, fed = split_config(config)
    strategy = build_strategy(run, fed, log=lambda _: None)
    if started is not None:
        started.update(strategy.soup)
    strategy.start(RecordingGrid(make_client_app(), partitions(num_clients)))
