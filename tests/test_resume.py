"""Crash and resume at the strategy level: a job restored from its round checkpoint ends
with exactly the soup, mask and history of the same job run without interruption."""

import json

import pytest
import torch
from helpers import LocalGrid, partitions
from helpers import make_strategy as small_strategy

from fedsms import FedSMSError
from fedsms.checkpoint import load_checkpoint
from fedsms_client.app import make_client_app

pytestmark = pytest.mark.usefixtures("one_thread")


def make_strategy(out_dir, **run_changes):
    """A cnn data soup (norm layers: recalibration must resume too) of 3 clients, 2 rounds a phase."""
    return small_strategy(
        out_dir,
        model=run_changes.pop("model", "cnn"),
        run=run_changes,
        mode="data",
        rounds_per_phase=2,
        min_available_clients=3,
    )


def play(strategy, flower_rounds):
    """``rounds`` more rounds of the job through ``start`` with real (seeded, deterministic) clients."""
    strategy.start(LocalGrid(make_client_app(), partitions(3)), num_rounds=len(flower_rounds))


def history(out_dir):
    lines = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    for line in lines:  # wall-clock times differ from run to run
        line.pop("seconds")
        line["train"].pop("train_seconds", None)
    return lines


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (module fixtures run before function fixtures)
    try:
        strategy = make_strategy(out)
        play(strategy, range(1, strategy.num_rounds + 1))
    finally:
        torch.set_num_threads(threads)
    return strategy, out


def test_resumed_job_equals_the_uninterrupted_one(uninterrupted, tmp_path):
    reference, reference_out = uninterrupted
    crashed = make_strategy(tmp_path)
    play(crashed, [1, 2, 3])  # mid-phase 1 ... and the process dies here
    (tmp_path / "rounds.jsonl").open("a").write('{"server_round": 4, "half": "written"}\n')  # died mid-write

    resumed = make_strategy(tmp_path)
    resumed.restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
    assert [log.server_round for log in resumed.rounds] == [1, 2, 3]  # resumes after round 3
    assert resumed.rounds_left == reference.num_rounds - 3
    play(resumed, range(1, resumed.rounds_left + 1))

    assert [k for k in reference.soup if not torch.equal(resumed.soup[k], reference.soup[k])] == []
    assert resumed.digest == reference.digest
    assert all(torch.equal(resumed.mask[k], reference.mask[k]) for k in reference.mask)
    assert history(tmp_path) == history(reference_out)  # the torn line is gone, nothing lost
    assert [log.server_round for log in resumed.rounds] == list(range(1, reference.num_rounds + 1))


def test_a_restored_soup_keeps_the_state_dict_order(uninterrupted, tmp_path):
    reference, reference_out = uninterrupted
    restored = make_strategy(tmp_path)
    restored.restore(load_checkpoint(reference_out / "checkpoints" / "soup"))
    assert list(restored.soup) == list(reference.soup)


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
