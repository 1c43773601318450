"""The Flower app config in pyproject.toml lists exactly the run-config keys fedsms knows."""

import tomllib
from pathlib import Path

import pytest

from fedsms import FedSMSError
from fedsms.config import split_config
from fedsms_flower.deployment import app_config_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_matches_fedsms_config():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = project["tool"]["flwr"]["app"]["config"]
    defaults = app_config_defaults()
    assert set(config) == set(defaults)
    assert {k: v for k, v in config.items() if k != "out-dir"} == {k: v for k, v in defaults.items() if k != "out-dir"}
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedsms_server.app:app", "clientapp": "fedsms_client.app:app"}
    split_config(config)  # the shipped values are valid


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
