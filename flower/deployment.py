"""Driving Flower's own processes (SuperLink, SuperNode, the ``flwr`` CLI) for
``fedsms-server`` and ``fedsms-client``: environment, app folder, connections, ports,
waiting, and every exchange with Flower that goes through its command line or its logs.

Why logs and ``flwr ls``: Flower 1.41 has no Python API for a launcher to submit a run to a
SuperLink, learn when it has ended, or learn why a SuperNode was turned away. So the server
launcher submits with ``flwr run --format json``, polls ``flwr ls --format json`` for the
run's status and streams ``flwr log``, and the client launcher reads the SuperNode's log for
its refusal code. Those exchanges live only here (``flwr``, ``submit_run``, ``run_status``,
``stream_log``, ``register_supernode``, ``refused_admission``) so they can be replaced in
one place once Flower offers an API for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedsms import FedSMSError
from fedsms.config import app_config_table, toml_value

CONNECTION = "fedsms"
# The installed apps, named as Flower loads them (strings: this package imports neither).
SERVER_APP = "fedsms_server.app:app"
CLIENT_APP = "fedsms_client.app:app"


def flower_bin(name: str) -> str:
    """Flower's executables live next to this interpreter (the virtual environment)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedSMSError(f"{path} is missing; install fedsms with its Flower dependency (make setup)")
    return str(path)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment every Flower process gets: our venv first on PATH (SuperLink and
    SuperNode spawn ``flower-superexec``/``flwr-*app`` by name), no runtime installs of
    dependencies (they would download torch again), no telemetry, no Ray warning."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        # Ray's own choice for CPU-only clients, said so it stops warning that it will change
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    return env


def scratch_home(prefix: str, work: Callable[[Path], int], given: str | Path | None = None) -> int:
    """Run ``work(home)`` in a new temporary Flower home, removed when ``work`` returns 0.

    A failed run (nonzero, an error or an interrupt) keeps the folder for its logs and names
    it on stderr. A folder the user ``given`` is theirs: it is used and never removed.

    Parameters
    ----------
    prefix : str
        Start of the temporary folder's name (e.g. ``"fedsms-simulation-"``).
    work : callable
        Receives the folder; returns an exit code.
    given : str or Path, optional
        A folder to use instead (e.g. ``--flwr-home``).

    Returns
    -------
    int
        What ``work`` returned.
    """
    if given:
        return work(Path(given))
    home = Path(tempfile.mkdtemp(prefix=prefix))
    code = 1
    try:
        code = work(home)
        return code
    finally:
        if code == 0:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"Flower's files and logs of this run are kept in {home}", file=sys.stderr)


def write_app_dir(folder: Path) -> Path:
    """A Flower app folder whose components are the installed fedsms apps."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedsms-job"\nversion = "1.0.0"\n'
        'description = "A fedsms job: Sparse Model Soups with the installed fedsms apps"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedsms"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{SERVER_APP}"\nclientapp = "{CLIENT_APP}"\n\n' + app_config_table()
    )
    return folder


def write_connection(flwr_home: Path, address: str, root_certificates: str | None) -> None:
    """The ``flwr`` CLI's connection to our SuperLink, in ``$FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {toml_value(root_certificates)}" if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def run_config_arg(values: dict) -> str:
    """``--run-config`` text: space-separated TOML assignments."""
    return " ".join(f"{key.replace('_', '-')}={toml_value(value)}" for key, value in values.items())


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until_reachable(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not reachable(host, port):
        if time.monotonic() > deadline:
            raise FedSMSError(
                f"{what} at {host}:{port} did not answer within {timeout:.0f} s; check the address and that it is running"
            )
        time.sleep(0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedSMSError(f"server address {address!r} is not HOST:PORT; write e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds. A process
    started with ``start_new_session=True`` is stopped with its whole process group (the
    app processes a SuperLink or SuperNode started), as a terminal's Ctrl-C would."""
    group = process.pid if process.poll() is None and _leads_group(process.pid) else None
    if group is None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
        return
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        if not _signal_group(group, 0):  # the whole group has exited
            return
        time.sleep(0.1)
    _signal_group(group, signal.SIGKILL)
    process.wait()


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal_group(group: int, signum: int) -> bool:
    """Signal a process group; False when no process of it is left."""
    try:
        os.killpg(group, signum)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only a zombie is left
        return False


# ---- the ``flwr`` CLI and Flower's logs (no API for these in Flower 1.41) ----------------


def flwr(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``args`` and capture its output."""
    return subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=True, text=True, **kwargs)


def register_supernode(key: str, env: dict) -> None:
    """Register a client's public key file with the SuperLink (``flwr supernode register``)."""
    registered = flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], env)
    if registered.returncode != 0:
        said = registered.stdout.strip() or registered.stderr.strip()
        raise FedSMSError(f"could not register client key {key}: {said}")


def app_config_keys(app: Path) -> set[str]:
    """The run-config keys a Flower app folder declares (its ``[tool.flwr.app.config]``, flattened)."""
    import tomllib

    from flwr.common.config import flatten_dict

    try:
        project = tomllib.loads((app / "pyproject.toml").read_text())
        config = project["tool"]["flwr"]["app"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        raise FedSMSError(
            f"{app} is not a Flower app folder (a pyproject.toml with [tool.flwr.app]); "
            "pass the folder that holds the app's pyproject.toml"
        ) from None
    return set(flatten_dict(config.get("config") or {}))


def parse_run_config(texts: list[str]) -> dict:
    """``--run-config`` values as ``flwr run`` reads them (``"k=v k2=v2"`` TOML assignments, or
    one ``.toml`` file), flattened."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(texts)
    except (click.ClickException, ValueError, OSError) as error:
        said = error.format_message() if isinstance(error, click.ClickException) else str(error)
        raise FedSMSError(f"--run-config {' '.join(texts)!r} cannot be read: {said}") from None


def submit_run(app: Path, run_config: dict | list[str], env: dict) -> str:
    """Submit the app folder as a run; ``run_config`` is a dict of overrides (written as
    ``--run-config`` text here) or ``--run-config`` values passed as they are. Returns the run id.

    Raises
    ------
    FedSMSError
        If the SuperLink refuses the run, e.g. for a run-config key the app does not declare.
    """
    texts = [run_config_arg(run_config)] if isinstance(run_config, dict) else list(run_config)
    submitted = flwr(
        ["run", str(app), CONNECTION, *(a for t in texts for a in ("--run-config", t)), "--format", "json"], env
    )
    try:
        return str(json.loads(submitted.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FedSMSError(refusal(app, submitted.stdout.strip() or submitted.stderr.strip())) from None


def undeclared_keys(app: Path, overrides: dict) -> list[str]:
    """Keys of ``overrides`` that the app does not declare: the SuperLink refuses a run that
    has one (``flwr run`` then says only "Invalid run configuration", naming no key)."""
    declared = app_config_keys(app)
    return [key for key in overrides if key not in declared]


def refusal(app: Path, said: str) -> str:
    """One sentence for the SuperLink's (or ``flwr run``'s) refusal of a run."""
    said = " ".join(
        line.strip() for line in said.splitlines() if line.strip() and not line.startswith("Using SuperLink")
    )
    if "Invalid run configuration" in said:  # Flower 1.41: an override of a key the app does not declare
        return (
            f"Flower refused the run config ({said}); every --run-config key must be declared in "
            f"[tool.flwr.app.config] of {app / 'pyproject.toml'}"
        )
    return f"the SuperLink refused the job: {said}"


def run_status(run_id: str, env: dict) -> dict:
    """The run's entry of ``flwr ls`` (``status`` is e.g. ``"running"`` or ``"finished:completed"``),
    or ``{}`` when it cannot be read."""
    result = flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    try:
        return json.loads(result.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return {}


def stream_log(run_id: str, env: dict) -> subprocess.Popen:
    """``flwr log --stream``: the ServerApp's output on this terminal until terminated."""
    return subprocess.Popen([flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"], env=env)


# What Flower's SuperNode logs when the SuperLink refuses to activate it (its process exit
# status does not carry the code).
NOT_ADMITTED = "Exit Code: 305"


def refused_admission(log_path: Path, since: int = 0) -> bool:
    """Whether the SuperNode log at ``log_path``, past offset ``since`` (its size before this
    attempt), says the SuperLink refused to admit the node (e.g. its key is not registered yet)."""
    return NOT_ADMITTED in log_path.read_text(errors="replace")[since:]
