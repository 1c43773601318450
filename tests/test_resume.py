"""Crash and resume at the strategy level: a job restored from its round checkpoint ends
with exactly the soup, mask and history of the same job run without interruption."""

import json

import pytest
import torch

from fedsms import FedSMSError
from fedsms.checkpoint import load_checkpoint
from fedsms.config import FederationConfig, RunConfig
from fedsms.models import build_for
from fedsms_server.strategy import SparseSoupStrategy, Update

from test_strategy import SPLITS, client_reply

CLIENT_SEEDS = (0, 1, 2)


def make_strategy(out_dir, **run_changes):
    settings = {"model": "cnn", "phases": 2, "target_sparsity": 0.8, "ood": False, **run_changes}
    run = RunConfig(out_dir=str(out_dir), **settings)
    fed = FederationConfig(pretrain_rounds=1, rounds_per_phase=2, min_train_clients=2)
    torch.manual_seed(0)
    return SparseSoupStrategy(run, fed, build_for(run.model, SPLITS), server_data=SPLITS, out_dir=out_dir, log=lambda _: None)


def play(strategy, flower_rounds):
    """What Flower's ``Strategy.start`` does with each round, with deterministic clients."""
    for flower_round in flower_rounds:
        server_round = flower_round + strategy.round_offset
        payload = strategy.begin_round(server_round)
        replies = [client_reply(payload, server_round, seed + 10 * server_round, 150)[0] for seed in CLIENT_SEEDS]
        strategy.aggregate_updates(server_round, [Update(n, r, {}) for n, r in enumerate(replies)])
        if strategy.ends_phase(server_round):
            strategy.finish_phase(server_round)
        strategy.end_round(server_round)


def history(out_dir):
    lines = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    strategy = make_strategy(out)
    play(strategy, range(1, strategy.num_rounds + 1))
    return strategy, out


def test_resumed_job_equals_the_uninterrupted_one(uninterrupted, tmp_path):
    reference, reference_out = uninterrupted
    crashed = make_strategy(tmp_path)
    play(crashed, [1, 2, 3])  # mid-phase 1 ... and the process dies here
    (tmp_path / "rounds.jsonl").open("a").write('{"server_round": 4, "half": "written"}\n')  # died mid-write

    resumed = make_strategy(tmp_path)
    resumed.restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
    assert resumed.round_offset == 3 and resumed.rounds_left == reference.num_rounds - 3
    play(resumed, range(1, resumed.rounds_left + 1))

    assert all(torch.equal(resumed.soup[k], reference.soup[k]) for k in reference.soup)
    assert resumed.digest == reference.digest
    assert all(torch.equal(resumed.mask[k], reference.mask[k]) for k in reference.mask)
    assert history(tmp_path) == history(reference_out)  # the torn line is gone, nothing lost
    assert [log.server_round for log in resumed.rounds] == list(range(1, reference.num_rounds + 1))


def test_checkpoint_of_other_settings_is_refused(uninterrupted, tmp_path):
    _, out = uninterrupted
    checkpoint = load_checkpoint(out / "checkpoints" / "soup")
    with pytest.raises(FedSMSError, match="target-sparsity=0.8 \\(now 0.9\\)"):
        make_strategy(tmp_path, target_sparsity=0.9).restore(checkpoint)
    with pytest.raises(FedSMSError, match="model='cnn' \\(now 'mlp'\\)"):
        make_strategy(tmp_path, model="mlp").restore(checkpoint)
    settings_only = make_strategy(tmp_path, device="cpu")  # where a job runs may change
    settings_only.restore(checkpoint)
    assert settings_only.rounds_left == 0
