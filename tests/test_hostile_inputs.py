"""Settings, flags and signals that must not take a job down (issue 12, points 6, 11, 12):
security flags that cannot take effect are refused, SIGTERM stops every child process as
SIGINT does, and absurd settings are refused by the schema before anything runs."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedsms import FedSMSError
from fedsms.config import FederationConfig, RunConfig
from fedsms_server import launch as server_launch


@pytest.mark.parametrize(
    "extra", [["--enable-supernode-auth"], ["--enable-supernode-auth", "--authorized-key", "k.pub"]]
)
def test_server_refuses_node_authentication_without_tls(extra):
    args = server_launch.build_parser().parse_args(["--insecure", *extra])
    with pytest.raises(FedSMSError, match="need TLS"):
        server_launch.security_flags(args)


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    from fedsms.cli import run_command
    from fedsms_flower.deployment import stop

    def serve(args):
        # a 'SuperLink' in its own session that starts an 'app process' of its own, as Flower's does
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); print(p.pid, flush=True); time.sleep(300)"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:  # the stop is armed before anyone learns the pids
            print(child.pid, child.stdout.readline().strip(), flush=True)
            time.sleep(300)
        finally:
            stop(child, grace=5)
        return 0

    sys.exit(run_command("fake-server", serve, None))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigterm_stops_every_child_like_sigint():
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = launcher.stdout.readline().split()
    superlink, app = int(line[0]), int(line[1])
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 130
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (alive(superlink) or alive(app)):
        time.sleep(0.1)
    assert not alive(superlink) and not alive(app), "a child process outlived SIGTERM"


@pytest.mark.parametrize(
    "bad",
    [
        dict(round_timeout=float("inf")),
        dict(client_wait=float("nan")),
        dict(clients_per_round=10**12),
    ],
)
def test_absurd_federation_settings_are_refused_by_the_schema(bad):
    with pytest.raises(FedSMSError):
        FederationConfig(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=float("inf")),
        dict(lr=float("nan")),
        dict(seed=2**63 - 1),
        dict(phases=10**9),
        dict(candidates=10**8),
    ],
)
def test_absurd_run_settings_are_refused_by_the_schema(bad):
    with pytest.raises(FedSMSError):
        RunConfig(**bad)


def test_an_absurd_model_width_is_refused_before_allocating():
    from helpers import digits

    from fedsms.models import build_for

    with pytest.raises(FedSMSError, match="width"):
        build_for("mlp-4000000000", digits())


def test_a_6x40_recipe_grid_is_indexed_not_enumerated():
    run = RunConfig(
        candidates=4,
        recipe=";".join(
            f"{key}={','.join(str(0.01 * (i + 1)) for i in range(40))}"
            for key in ("lr", "weight_decay", "label_smoothing", "lr", "lr", "lr")
        ),
    )
    started = time.perf_counter()
    try:
        configs = run.candidate_configs()
    except FedSMSError:  # refused in one sentence is fine too
        configs = None
    assert (configs is None or len(configs) == 4) and time.perf_counter() - started < 5
