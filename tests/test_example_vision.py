"""examples/vision: the user's own CNN (with BatchNorm) on the user's own PNG images through
fedsms's built-in trainer, run as real processes on 127.0.0.1: ``fedsms-server --app
examples/vision`` (Flower SuperLink + the app's ServerApp) and two ``fedsms-client
--data-dir`` (SuperNodes running the app's ClientApp); and Flower's own refusal of a run
config key the app does not declare."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import venv_bin
from processes import finish, round_lines, start
from safetensors.torch import load_file

from fedsms import FedSMSError
from fedsms.config import toml_value
from fedsms.masks import prunable_names
from fedsms_flower.deployment import (
    flower_bin,
    flower_env,
    free_port,
    stop,
    submit_run,
    wait_until_reachable,
    write_connection,
)

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vision"
TARGET = 0.8  # the app's target-sparsity (examples/vision/pyproject.toml)
CLIENTS = 2


def example_modules():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_images
        import vision_task
    finally:
        sys.path.remove(str(EXAMPLE))
    return make_images, vision_task


def test_vision_example_with_server_and_two_clients(tmp_path, flwr_home):
    make_images, vision_task = example_modules()
    data = tmp_path / "images"
    make_images.main([str(data), "--train-per-class", "100", "--test-per-class", "25", "--seed", "0"])
    port, out = free_port(), tmp_path / "out"
    started = time.monotonic()
    server = start(
        [
            venv_bin("fedsms-server"),
            "--insecure",
            "--port",
            str(port),
            "--app",
            str(EXAMPLE),
            "--out-dir",
            str(out),
            "--flwr-home",
            str(tmp_path / "server-home"),
            "--run-config",
            f"data-dir={toml_value(str(data))}",
        ]
    )
    clients = [
        start(
            [
                venv_bin("fedsms-client"),
                "--insecure",
                "--server",
                f"127.0.0.1:{port}",
                "--partition-id",
                str(i),
                "--num-partitions",
                str(CLIENTS),
                "--data-dir",
                str(data),
                "--connect-timeout",
                "600",
                "--flwr-home",
                str(tmp_path / f"client{i}-home"),
            ]
        )
        for i in range(CLIENTS)
    ]
    server_out, *client_outs = finish([server, *clients], timeout=900)
    print(f"vision example: server and clients done in {time.monotonic() - started:.0f} s")
    assert server.returncode == 0, server_out[-4000:] + "".join(text[-1500:] for text in client_outs)
    assert f"completed; results in {out}" in server_out
    for client, text in zip(clients, client_outs):
        assert client.returncode == 0, text[-3000:]
        assert "job finished" in text

    rounds = round_lines(out)
    assert [r["phase"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert r["accepted"] == CLIENTS and not r["rejected"], r
        assert "accuracy" in r["central_eval"] and "accuracy" in r["federated_eval"], r
    assert json.loads((out / "summary.json").read_text())["stopped"] == ""

    # The user's view: their own class, a plain strict load_state_dict, their own test loop.
    model = vision_task.PatternNet(num_classes=4)
    model.load_state_dict(load_file(out / "final_model.safetensors"), strict=True)
    weights = dict(model.named_parameters())
    names = prunable_names(model)
    assert names == ["features.0.weight", "features.4.weight", "head.weight"]
    total = sum(weights[n].numel() for n in names)
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    assert zeros == round(TARGET * total), (zeros, total)  # one global mask over all prunable weights

    test, classes = vision_task.read_image_folder(data / "test")
    assert classes == list(make_images.CLASSES) and len(test) == 100
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test.images.float() / 255).argmax(1) == test.labels).float().mean())
    assert accuracy > 0.6, accuracy  # chance is 0.25
    assert rounds[-1]["central_eval"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    print(f"vision example: sparsity {zeros / total:.4f} of {total} prunable weights, test accuracy {accuracy:.4f}")


def test_flower_refuses_an_undeclared_run_config_key_quickly(tmp_path, flwr_home):
    """fedsms-server names such a key before it starts anything (see test_launch_app); this is
    the refusal behind that check: Flower's SuperLink turns the run down, and ``submit_run``
    ends in one sentence, not a hang."""
    home, port = tmp_path / "home", free_port()
    env = flower_env(home)
    write_connection(home, f"127.0.0.1:{port}", None)
    with open(tmp_path / "superlink.log", "w") as log:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_until_reachable("127.0.0.1", port, 60, "the SuperLink")
        started = time.monotonic()
        with pytest.raises(FedSMSError) as refused:
            submit_run(EXAMPLE, ["phasez=3"], env)
        assert time.monotonic() - started < 30
    finally:
        stop(superlink)
    said = str(refused.value)
    assert "Invalid run configuration" in said and str(EXAMPLE / "pyproject.toml") in said, said
    assert "phasez" in (tmp_path / "superlink.log").read_text()  # Flower names the key only in its log
