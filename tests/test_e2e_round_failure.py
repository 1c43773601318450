"""A round whose clients all fail is sent again, then the job stops with one clear sentence,
keeping every completed round; ``resume`` then finishes the job (Flower simulation)."""

import json

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedsms_client.app import make_client_app
from fedsms_server.app import make_server_app

pytestmark = pytest.mark.slow


def failing_from_phase_1(config: dict) -> ClientApp:
    """The fedsms ClientApp, except that training crashes once pruning has started."""
    fedsms_app, app = make_client_app(config), ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if int(message.content["config"]["phase"]) >= 1:
            raise RuntimeError("the GPU fell off the bus")
        return fedsms_app(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return fedsms_app(message, context)

    return app


def simulate(config: dict, client_app: ClientApp) -> None:
    run_simulation(server_app=make_server_app(config), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


def test_failed_round_retries_then_stops_and_resume_finishes(tmp_path, flwr_home, capsys):
    config = {"model": "mlp", "phases": 2, "target-sparsity": 0.8, "pretrain-epochs": 2, "retrain-epochs": 1,
              "ood": False, "out-dir": str(tmp_path), "fraction-evaluate": 0.0, "round-retries": 1}
    simulate(config, failing_from_phase_1(config))

    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"].startswith("round 2 got 0 valid replies after 1 retries")
    assert "--resume" in summary["stopped"] and "job stopped" in printed
    assert "retrying (1 of 1)" in printed and "the GPU fell off the bus" in printed
    assert [json.loads(line)["server_round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1]

    simulate({**config, "resume": True}, make_client_app(config))
    assert "resumed after round 1" in capsys.readouterr().out
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["server_round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == ""
