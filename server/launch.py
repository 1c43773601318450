"""``fedsms-server``: start Flower's SuperLink, submit the fedsms job (or, with ``--app DIR``,
any Flower app) to it, follow it to the end, shut the SuperLink down and say where the
results are.

Clients join with ``fedsms-client --server HOST:PORT --partition-id i --num-partitions n``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedsms import FedSMSError
from fedsms.cli import add_config_options, check_out_dir, config_overrides, run_command
from fedsms.config import FederationConfig, RunConfig, absolute_paths, split_config, toml_value
from fedsms_flower.deployment import (
    app_config_keys,
    flower_bin,
    flower_env,
    parse_run_config,
    register_supernode,
    run_status,
    scratch_home,
    stop,
    stream_log,
    submit_run,
    undeclared_keys,
    wait_until_reachable,
    write_app_dir,
    write_connection,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsms-server",
        description="Run a federated Sparse Model Soups job: starts a Flower SuperLink, runs the "
        "SparseSoupStrategy ServerApp on it (or your own Flower app, --app) and exits when the job is done.",
        epilog="With --app, only the options above the 'built-in app' group apply, plus --out-dir; the app's "
        "own settings go in --run-config.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the SuperLink listens on (0.0.0.0 for remote clients)"
    )
    parser.add_argument("--port", type=int, default=9092, help="SuperLink port (default: 9092)")
    parser.add_argument(
        "--app",
        metavar="DIR",
        help="run this Flower app folder (pyproject.toml with [tool.flwr.app]) instead of the built-in "
        "fedsms app; clients run the ClientApp it ships",
    )
    parser.add_argument(
        "--run-config",
        metavar="'KEY=VALUE ...'",
        action="append",
        default=[],
        help="with --app: the app's run-config overrides, as for `flwr run` (keys its pyproject.toml "
        "declares; give paths absolute, the ServerApp runs in the SuperLink's folder)",
    )
    security = parser.add_argument_group("transport security (one of --insecure or the three certificate files)")
    security.add_argument("--insecure", action="store_true", help="no TLS: only on a trusted network")
    security.add_argument("--ssl-ca-certfile", help="CA certificate (PEM)")
    security.add_argument("--ssl-certfile", help="server certificate (PEM)")
    security.add_argument("--ssl-keyfile", help="server private key (PEM)")
    security.add_argument(
        "--enable-supernode-auth",
        action="store_true",
        help="only registered clients may join (register keys with --authorized-key)",
    )
    security.add_argument(
        "--authorized-key",
        action="append",
        default=[],
        help="public key file (OpenSSH ecdsa, e.g. from ssh-keygen -t ecdsa -b 384) of a client "
        "allowed to join; repeat per client",
    )
    parser.add_argument("--flwr-home", help="Flower state folder (default: a fresh temporary one)")
    parser.add_argument(
        "--out-dir",
        dest="out_dir",
        metavar="DIR",
        help="where the job's results go (default: runs/server). With --app: where the app writes "
        "its fedsms summary.json, passed to it as its out-dir key if it declares one; without "
        "it, only Flower's run status is reported",
    )
    builtin = parser.add_argument_group("built-in app (not with --app)")
    builtin.add_argument("--clients", type=int, help="clients to wait for before each round (default: 2)")
    add_config_options(builtin, RunConfig(), skip=("out_dir",))
    add_config_options(builtin, FederationConfig())
    return parser


def security_flags(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """SuperLink flags and the CA file the ``flwr`` CLI needs (None when insecure)."""
    certs = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if args.insecure and any(certs):
        raise FedSMSError("--insecure and certificate files exclude each other; pass one or the other")
    if args.insecure and (args.enable_supernode_auth or args.authorized_key):  # fail closed, never drop them
        raise FedSMSError(
            "--enable-supernode-auth and --authorized-key need TLS (the SuperLink ignores them with "
            "--insecure); pass the three certificate files, or drop the authentication flags"
        )
    if args.insecure:
        print(
            "fedsms-server: WARNING: running without TLS (--insecure); traffic is readable and clients are not verified",
            file=sys.stderr,
        )
        return ["--insecure"], None
    if not all(certs):
        raise FedSMSError("pass --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile for TLS, or --insecure explicitly")
    for path in certs:
        if not Path(path).is_file():
            raise FedSMSError(f"certificate file {path} does not exist; pass the right path")
    certs = [str(Path(path).resolve()) for path in certs]  # the SuperLink runs in its own folder
    flags = ["--ssl-ca-certfile", certs[0], "--ssl-certfile", certs[1], "--ssl-keyfile", certs[2]]
    if args.authorized_key and not args.enable_supernode_auth:
        raise FedSMSError("--authorized-key needs --enable-supernode-auth; add it, or drop the keys")
    for key in args.authorized_key:
        if not Path(key).is_file():
            raise FedSMSError(f"key file {key} does not exist; pass the right path")
    if args.enable_supernode_auth:
        flags.append("--enable-supernode-auth")
    return flags, certs[0]


@dataclass
class Job:
    """What is submitted: the app folder, its ``--run-config`` values and where its summary lands."""

    app: Path | None  # None: the built-in app, written into the Flower home folder once there is one
    run_config: dict | list[str]
    out_dir: Path | None


def check_out_dir_travels(out_dir: Path) -> None:
    """Refuse, before anything starts, an output folder whose name cannot travel in Flower's
    run config (a quote, backslash, newline or other control character)."""
    bad = next((c for c in str(out_dir) if c in "\"'\\" or not c.isprintable()), None)
    if bad is not None:
        raise FedSMSError(
            f"--out-dir {str(out_dir)[:80]!r} holds {bad!r}, which Flower's run config cannot carry; "
            "pass a folder name without quotes, backslashes or control characters"
        )


def built_in_job(args: argparse.Namespace) -> Job:
    """The fedsms app, configured by fedsms-server's own flags."""
    if args.run_config:
        raise FedSMSError(
            "--run-config sets the keys of an --app; the built-in app takes fedsms-server's own flags (see --help)"
        )
    overrides = config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig())
    clients = 2 if args.clients is None else args.clients
    overrides.setdefault("min_available_clients", clients)
    overrides.setdefault("min_train_clients", clients)
    overrides = absolute_paths(overrides, "runs/server")
    _, fed = split_config(overrides)
    check_out_dir_travels(Path(overrides["out_dir"]))
    check_out_dir(Path(overrides["out_dir"]), fed.resume)
    return Job(None, overrides, Path(overrides["out_dir"]))


def app_job(args: argparse.Namespace) -> Job:
    """A user's Flower app, configured by its own run-config keys."""
    app = Path(args.app).resolve()
    declared = app_config_keys(app)
    given = config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig())
    given.pop("out_dir", None)
    if args.clients is not None:
        given["clients"] = args.clients
    if given:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise FedSMSError(
            f"{flag} configures the built-in app only; with --app, set the app's own keys with "
            f'--run-config "key=value ..." (the keys its pyproject.toml declares)'
        )
    run_config = list(args.run_config)
    overrides = parse_run_config(run_config)  # a malformed value fails here, in one sentence
    # Flower refuses a run that sets an undeclared key, but without naming it: name it now.
    if unknown := undeclared_keys(app, overrides):
        raise FedSMSError(
            f"run-config key {', '.join(map(repr, unknown))} is not declared in [tool.flwr.app.config] "
            f"of {app / 'pyproject.toml'}, so Flower would refuse the job; fix its spelling or declare "
            f"it there (declared: {', '.join(sorted(declared)) or 'none'})"
        )
    out_dir = Path(args.out_dir).resolve() if args.out_dir else None
    if out_dir is not None:
        check_out_dir_travels(out_dir)
    if out_dir is not None and "out-dir" in declared:
        if "out-dir" in overrides:
            raise FedSMSError("give the output folder once: --out-dir or out-dir in --run-config")
        run_config.append(f"out-dir={toml_value(str(out_dir))}")
    return Job(app, run_config, out_dir)


def serve(args: argparse.Namespace) -> int:
    job = app_job(args) if args.app else built_in_job(args)
    return scratch_home("fedsms-server-", lambda home: serve_in(home, job, args), args.flwr_home)


def serve_in(home: Path, job: Job, args: argparse.Namespace) -> int:
    """Start the SuperLink with its files in ``home``, run ``job`` on it, stop it; the exit code."""
    flags, root_cert = security_flags(args)
    if job.app is None:
        job.app = write_app_dir(home / "app")
    env = flower_env(home)
    write_connection(home, f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}", root_cert)
    log_path = home / "superlink.log"
    print(f"fedsms-server: starting the SuperLink on {args.host}:{args.port} (log: {log_path})")
    with open(log_path, "w") as log:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), *flags, "--host", args.host, "--port", str(args.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,  # stop() ends its whole process group
        )
    try:
        wait_until_reachable(
            "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port, 60, "the SuperLink"
        )
        for key in args.authorized_key:
            register_supernode(key, env)
        return follow(job, env, superlink)
    finally:
        stop(superlink)


def follow(job: Job, env: dict, superlink: subprocess.Popen) -> int:
    submitted_at = time.time()
    run_id = submit_run(job.app, job.run_config, env)
    print(f"fedsms-server: job {run_id} submitted; waiting for clients (fedsms-client --server HOST:PORT ...)")
    # `flwr log --stream` shows the ServerApp's progress; the status decides the end.
    logs = stream_log(run_id, env)
    try:
        while not (status := run_status(run_id, env)).get("status", "").startswith("finished"):
            if superlink.poll() is not None:
                raise FedSMSError(
                    f"the SuperLink exited with code {superlink.returncode}; see its log in {env['FLWR_HOME']}"
                )
            time.sleep(2)
    finally:
        time.sleep(1)
        logs.terminate()
    # A summary from before this job (an app's out-dir used again) says nothing about it.
    stopped = stop_reason(job.out_dir, since=submitted_at) if job.out_dir is not None else ""
    if status["status"] != "finished:completed":
        details = status.get("status-details", "")
        print(
            f"fedsms-server: job {run_id} ended as {status['status']}: {details}"
            + (f"; {stopped}" if stopped and stopped not in details else ""),
            file=sys.stderr,
        )
        return 1
    if stopped:
        print(f"fedsms-server: job {run_id} stopped early: {stopped}", file=sys.stderr)
        return 1
    where = f"; results in {job.out_dir}" if job.out_dir is not None else ""
    print(f"fedsms-server: job {run_id} completed{where}")
    return 0


def stop_reason(out_dir: Path, since: float = 0.0) -> str:
    """Why the ServerApp ended the job early (its summary, written after ``since``, says), or
    "" when it ran to the end."""
    summary = out_dir / "summary.json"
    try:
        if summary.stat().st_mtime < since:
            return f"the job wrote no summary.json to {out_dir}"
        return json.loads(summary.read_text()).get("stopped", "")
    except (OSError, ValueError):
        return f"the job wrote no summary.json to {out_dir}"


def main(argv: list[str] | None = None) -> int:
    return run_command("fedsms-server", serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
