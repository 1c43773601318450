"""Whole federated jobs with real processes on 127.0.0.1: fedsms-server (Flower SuperLink)
and 3 fedsms-client processes (Flower SuperNodes), 2 phases on digits; then the same job
with the server host killed mid-phase and restarted with --resume."""

import pytest
import torch
from processes import finish, kill_group, round_lines, start_client, start_server, wait_for
from safetensors.torch import load_file

from fedsms.checkpoint import load_checkpoint
from fedsms.data import load_dataset
from fedsms.evaluate import evaluate
from fedsms.masks import prunable_names
from fedsms.models import build_for
from fedsms_flower.deployment import free_port

pytestmark = pytest.mark.slow

TARGET = 0.8  # the JOB's target sparsity


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    port, out = free_port(), tmp_path / "out"
    processes = [start_server(tmp_path, port, out), *(start_client(tmp_path, port, i, 3) for i in range(3))]
    return processes, finish(processes, timeout=600), out


def test_server_and_three_clients_run_two_phases(uninterrupted, flwr_home):
    (server, *clients), (server_out, *client_outs), out = uninterrupted
    assert server.returncode == 0, server_out
    for client, text in zip(clients, client_outs):
        assert client.returncode == 0, text
        assert "job finished" in text
    assert str(out) in server_out

    rounds = round_lines(out)
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in rounds] == [0, 1, 1, 2, 2]
    for r in rounds:
        assert r["accepted"] == 3 and not r["rejected"]
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
        assert {"accuracy", "ood_accuracy", "ece"} <= set(r["central_eval"])
        assert {"accuracy", "loss"} <= set(r["federated_eval"])
    assert rounds[-1]["sparsity"] == pytest.approx(TARGET, abs=1e-4)

    splits = load_dataset("digits")
    model = build_for("cnn", splits)
    state = load_file(out / "final_model.safetensors")
    model.load_state_dict(state)  # plain load_state_dict, as any PyTorch user would
    params = dict(model.named_parameters())
    # Global magnitude pruning hits the exact count; a trained weight that is zero by
    # chance could add at most a few, hence one weight of slack per tensor.
    total = sum(params[n].numel() for n in prunable_names(model))
    nonzero = sum(int(torch.count_nonzero(params[n])) for n in prunable_names(model))
    assert abs((total - nonzero) - round(TARGET * total)) <= len(prunable_names(model))
    accuracy = evaluate(model, splits.test)["accuracy"]
    assert accuracy > 0.5, accuracy  # chance is 0.1


def test_server_killed_mid_phase_resumes_to_the_same_model(uninterrupted, tmp_path, flwr_home):
    *_, reference_out = uninterrupted
    port, out = free_port(), tmp_path / "out"
    # Federated evaluation does not shape the soup, so it is off here to save time.
    server = start_server(tmp_path, port, out, "--fraction-evaluate", "0")
    clients = [start_client(tmp_path, port, i, 3) for i in range(3)]
    try:
        wait_for(lambda: len(round_lines(out)) >= 2, 400, "round 2 (phase 1, round 1) to finish")
    finally:
        for process in [server, *clients]:  # the server host dies; its clients give up
            kill_group(process)
    crashed_after = len(round_lines(out))
    assert crashed_after < 5

    resumed = start_server(tmp_path, port, out, "--fraction-evaluate", "0", "--resume")
    clients = [start_client(tmp_path, port, i, 3, home=f"client{i}-again") for i in range(3)]
    server_out, *client_outs = finish([resumed, *clients], timeout=600)
    assert resumed.returncode == 0, server_out
    assert f"resumed after round {crashed_after}" in server_out
    assert all(c.returncode == 0 for c in clients), client_outs

    rounds = round_lines(out)
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5]  # each round once: nothing lost or redone twice
    reference = load_file(reference_out / "final_model.safetensors")
    final = load_file(out / "final_model.safetensors")
    # CPU training is deterministic and the server averages in candidate order, so the
    # resumed job ends with the uninterrupted job's model, bit for bit.
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert (
        load_checkpoint(out / "checkpoints" / "soup").metadata["mask_digest"]
        == load_checkpoint(reference_out / "checkpoints" / "soup").metadata["mask_digest"]
    )
