"""The Flower app config in pyproject.toml lists exactly the keys fedsms declares, with their defaults."""

import tomllib
from pathlib import Path

import pytest

from fedsms import FedSMSError
from fedsms.config import app_config_table, flower_app_config, split_config, write_app_config_table

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_is_the_one_generated_from_the_schema():
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)
    assert project["tool"]["flwr"]["app"]["config"] == flower_app_config(), (
        "pyproject.toml and fedsms/schema.py disagree; run `python -m fedsms.config --pyproject`"
    )
    assert app_config_table() in text  # same order and spelling as the generator writes
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedsms_server.app:app",
        "clientapp": "fedsms_client.app:app",
    }
    split_config(project["tool"]["flwr"]["app"]["config"])  # the shipped values are valid


def test_the_generator_rewrites_only_the_app_config_table(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[tool.flwr.app]\npublisher = "x"\n\n[tool.flwr.app.config]\nlr = 0.1\nold-key = 1\n\n'
        "[tool.other]\nkeep = true\n"
    )
    assert write_app_config_table(path) is True
    project = tomllib.loads(path.read_text())
    assert project["tool"]["flwr"]["app"]["config"] == flower_app_config()
    assert project["tool"]["other"] == {"keep": True} and project["tool"]["flwr"]["app"]["publisher"] == "x"
    assert write_app_config_table(path) is False  # idempotent


def test_split_config_routes_keys_and_names_bad_ones():
    run, fed = split_config({"target-sparsity": "0.5", "mode": "data", "rounds-per-phase": 2, "server-data": "false"})
    assert run.target_sparsity == 0.5 and fed.mode == "data" and fed.rounds_per_phase == 2 and fed.server_data is False
    with pytest.raises(FedSMSError, match="unknown config key 'rounds'"):
        split_config({"rounds": 3})
    with pytest.raises(FedSMSError, match="'mode' must be one of hyperparameter, data"):
        split_config({"mode": "model"})
    with pytest.raises(FedSMSError, match="'value-dtype'"):
        split_config({"value-dtype": "int8"})
    with pytest.raises(FedSMSError, match="'min-train-clients' must be an int"):
        split_config({"min-train-clients": "two"})
