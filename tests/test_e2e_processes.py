"""A whole federated job with real processes on 127.0.0.1: fedsms-server (Flower SuperLink)
and 3 fedsms-client processes (Flower SuperNodes), 2 phases on digits."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fedsms.data import load_dataset
from fedsms.evaluate import evaluate
from fedsms.masks import prunable_names
from fedsms.models import build_for
from fedsms_server.deployment import free_port

from conftest import venv_bin

pytestmark = pytest.mark.slow

TARGET = 0.8


def test_server_and_three_clients_run_two_phases(tmp_path, flwr_home):
    port = free_port()
    out = tmp_path / "out"
    server = subprocess.Popen(
        [venv_bin("fedsms-server"), "--insecure", "--port", str(port), "--clients", "3",
         "--flwr-home", str(tmp_path / "server-home"), "--out-dir", str(out),
         "--model", "cnn", "--phases", "2", "--target-sparsity", str(TARGET), "--pretrain-rounds", "1",
         "--pretrain-epochs", "3", "--retrain-epochs", "1", "--ood-examples", "100", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    clients = [
        subprocess.Popen(
            [venv_bin("fedsms-client"), "--insecure", "--server", f"127.0.0.1:{port}", "--partition-id", str(i),
             "--num-partitions", "3", "--flwr-home", str(tmp_path / f"client{i}-home")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(3)
    ]
    try:
        server_out, _ = server.communicate(timeout=480)
        client_outs = [c.communicate(timeout=120)[0] for c in clients]
    finally:
        for process in [server, *clients]:
            process.kill()
    assert server.returncode == 0, server_out
    for client, text in zip(clients, client_outs):
        assert client.returncode == 0, text
        assert "job finished" in text
    assert str(out) in server_out

    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["server_round"] for r in rounds] == [1, 2, 3]
    assert [r["phase"] for r in rounds] == [0, 1, 2]
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
