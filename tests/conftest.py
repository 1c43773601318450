import os
from pathlib import Path

import pytest


@pytest.fixture
def flwr_home(tmp_path, monkeypatch) -> Path:
    """A private FLWR_HOME, and no telemetry, update checks or runtime installs."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return home


def venv_bin(name: str) -> str:
    import sys

    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture
def one_thread():
    """One torch thread: the models in the fast tests are tiny, and on a shared machine one
    thread beats several by far."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
