"""A client's own exception reaches the server's stop sentence in a real simulation (Ray
between them), and a round every client fails alike is not retried."""

import json
import textwrap

import pytest
from processes import flwr_run

from fedsms_flower.deployment import SERVER_APP

pytestmark = pytest.mark.slow


def test_a_failing_clients_exception_is_in_the_stop_sentence(tmp_path, flwr_home):
    app = tmp_path / "app"
    app.mkdir()
    (app / "failing_client.py").write_text(
        textwrap.dedent(
            """
            from fedsms_client.app import make_client_app

            def model_fn(run, splits):
                raise ValueError("shard 3 of 'digits' is empty")

            app = make_client_app(model_fn=model_fn)
            """
        )
    )
    (app / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "failing-app"
            version = "1.0.0"
            description = "a ClientApp that always fails"
            license = "Apache-2.0"
            dependencies = []

            [tool.setuptools]
            py-modules = ["failing_client"]

            [tool.flwr.app]
            publisher = "tests"

            [tool.flwr.app.components]
            serverapp = "{SERVER_APP}"
            clientapp = "failing_client:app"

            [tool.flwr.app.config]
            model = "mlp"
            phases = 1
            pretrain-rounds = 1
            min-train-clients = 2
            min-available-clients = 2
            round-retries = 2
            ood = false
            out-dir = "runs/failing"
            """
        )
    )
    out = tmp_path / "out"
    result = flwr_run(app, tmp_path, flwr_home, f"out-dir='{out}'", 2, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["stopped"]
    assert "the client failed: ValueError: shard 3 of 'digits' is empty" in stopped, (stopped, log[-3000:])
    assert "after 0 retries" in stopped and "retrying" not in log, log[-3000:]
    assert "ValueError: shard 3 of 'digits' is empty" in log  # the console says it too
    assert "RayTaskError" not in stopped and "ClientAppException" not in stopped
