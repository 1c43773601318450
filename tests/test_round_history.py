"""A job's round history stays bounded (issue 27, point 4): a round keeps at most
``gate.MAX_METRICS`` metric names whatever its clients send, the history is appended to
``rounds.jsonl`` and not rewritten into every checkpoint, and a resume reads it back."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, make_strategy, partitions, reply_of

from fedsms import FedSMSError, codec
from fedsms.checkpoint import load_checkpoint
from fedsms_client.app import make_client_app
from fedsms_server import gate


def play_round(strategy, server_round, names_per_client=0):
    grid = LocalGrid(make_client_app(), partitions(3))
    strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    step = strategy.schedule[server_round - 1]
    replies = []
    for node in range(3):
        g = torch.Generator().manual_seed(10 * server_round + node)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in strategy.soup.items()}
        payload = codec.encode(
            state, strategy.mask, phase=step.phase, round=server_round, kind="update", num_examples=50
        )
        metrics = {f"client{node}-metric{i}".ljust(gate.MAX_KEY, "x"): 1.0 for i in range(names_per_client)}
        replies.append(reply_of(server_round, node, node, payload, **metrics))
    assert strategy.aggregate_train(server_round, replies)[0] is not None
    strategy.aggregate_evaluate(server_round, [])


def checkpoint_json(out):
    return (out / "checkpoints" / "soup.json").read_bytes()


def test_a_round_keeps_a_bounded_number_of_metric_names(tmp_path):
    strategy = make_strategy(tmp_path)
    play_round(strategy, 1, names_per_client=gate.MAX_METRICS)  # 3 clients x 64 names of their own
    assert len(strategy.rounds[-1].train) == gate.MAX_METRICS


def test_the_history_is_appended_not_rewritten_and_a_resume_reads_it(tmp_path):
    strategy = make_strategy(tmp_path)
    sizes = []
    for server_round in range(1, strategy.num_rounds + 1):
        play_round(strategy, server_round, names_per_client=20)
        sizes.append(len(checkpoint_json(tmp_path)))
        assert "rounds" not in json.loads(checkpoint_json(tmp_path))
    assert max(sizes) - min(sizes) < 1024  # the checkpoint does not grow with the job
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    resumed = make_strategy(tmp_path)
    resumed.restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
    assert [log.server_round for log in resumed.rounds] == list(range(1, strategy.num_rounds + 1))
    assert (tmp_path / "rounds.jsonl").read_text().splitlines() == lines  # nothing rewritten
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "soup")
    checkpoint.metadata["server_round"] = True  # a bool is no round number (it was taken as round 1)
    with pytest.raises(FedSMSError, match="lacks 'server_round'"):
        make_strategy(tmp_path).restore(checkpoint)
    (tmp_path / "rounds.jsonl").write_text("\n".join(lines[:1]) + "\n")  # a history that lost rounds
    with pytest.raises(FedSMSError, match="does not hold rounds 1 to 3"):
        make_strategy(tmp_path).restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
