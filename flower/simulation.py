"""``fedsms simulate``: a federated job with N virtual clients on this machine, through
Flower's supported simulation path (``flwr run`` against a SuperLink in simulation mode).

The SuperLink is our own: it runs in a private ``FLWR_HOME`` on a free loopback port and is
stopped when the run ends, so nothing is left running (``flwr run`` with the ``local``
connection would leave its managed SuperLink behind).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fedsms import FedSMSError
from fedsms.config import split_config
from fedsms_flower.deployment import (
    CONNECTION,
    flower_bin,
    flower_env,
    free_port,
    run_config_arg,
    scratch_home,
    stop,
    wait_until_reachable,
    write_app_dir,
    write_connection,
)

# Lines of Flower's simulation log that say nothing about a fedsms job: a default that
# fedsms never uses (it always sets the SuperNode count, which the next line states) and a
# resize command for Flower's own federations.
FLOWER_NOISE = (
    "default simulated SuperNodes changed from",
    "To change federation size, use the following command",
    "flwr federation simulation-config",
)


def simulate(
    config: Mapping,
    num_clients: int,
    *,
    app_dir: str | Path | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
) -> None:
    """Run a Flower app with ``num_clients`` virtual SuperNodes and wait for it to end.

    Parameters
    ----------
    config : mapping
        Run-config values for the app (for the built-in app they are validated here,
        before anything starts).
    num_clients : int
        Virtual SuperNodes.
    app_dir : str or Path, optional
        A Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``); default: the
        built-in fedsms apps.
    cpus_per_client, gpus_per_client : float
        Resources Ray reserves for each virtual client.

    Raises
    ------
    FedSMSError
        If the SuperLink does not start or ``flwr run`` fails; the message names the log,
        whose temporary folder is then kept (it is removed after a run that succeeds).
    """
    if app_dir is None:
        split_config(config)  # a bad key fails now, in one sentence, not inside the simulation

    def run(home: Path) -> int:
        _run_in(home, config, num_clients, app_dir, cpus_per_client, gpus_per_client)
        return 0

    scratch_home("fedsms-simulation-", run)


def _run_in(
    home: Path, config: Mapping, num_clients: int, app_dir, cpus_per_client: float, gpus_per_client: float
) -> None:
    """Start a simulation SuperLink in ``home``, run the app against it, stop the SuperLink."""
    env = flower_env(home)
    port = free_port()
    write_connection(home, f"127.0.0.1:{port}", None)
    app = Path(app_dir).resolve() if app_dir is not None else write_app_dir(home / "app")
    log_path = home / "superlink.log"
    with open(log_path, "w") as log:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,  # stop() ends its whole process group
        )
    try:
        wait_until_reachable("127.0.0.1", port, 60, "the simulation SuperLink")
        federation = (
            f"num-supernodes={num_clients} client-resources-num-cpus={cpus_per_client:g} "
            f"client-resources-num-gpus={gpus_per_client:g}"
        )
        command = [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream"]
        command += ["--run-config", run_config_arg(dict(config)), "--federation-config", federation]
        code = stream_without_noise(command, env)
        if code != 0:
            raise FedSMSError(f"flwr run failed (exit code {code}); see the SuperLink log {log_path}")
    finally:
        stop(superlink)


def stream_without_noise(command: list[str], env: dict) -> int:
    """Run ``command``, copying its output here line by line except ``FLOWER_NOISE``.

    Parameters
    ----------
    command : list of str
        The command (``flwr run ... --stream``).
    env : dict
        Its environment.

    Returns
    -------
    int
        Its exit code.
    """
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    ) as process:
        for line in process.stdout:
            if not any(noise in line for noise in FLOWER_NOISE):
                sys.stdout.write(line)
                sys.stdout.flush()
    return process.returncode
