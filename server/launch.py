"""``fedsms-server``: start Flower's SuperLink, submit the fedsms job to it, follow it to the
end, shut the SuperLink down and say where the results are.

Clients join with ``fedsms-client --server HOST:PORT --partition-id i --num-partitions n``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsms import FedSMSError
from fedsms.cli import add_config_options, check_out_dir, config_overrides, run_command
from fedsms.config import FederationConfig, RunConfig, split_config

from fedsms_flower.deployment import (
    flower_bin, flower_env, register_supernode, run_status, stop, stream_log, submit_run, wait_until_reachable,
    write_app_dir, write_connection,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsms-server",
        description="Run a federated Sparse Model Soups job: starts a Flower SuperLink, runs the "
                    "SparseSoupStrategy ServerApp on it and exits when the job is done.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (0.0.0.0 for remote clients)")
    parser.add_argument("--port", type=int, default=9092, help="SuperLink port (default: 9092)")
    parser.add_argument("--clients", type=int, default=2, help="clients to wait for before each round (default: 2)")
    security = parser.add_argument_group("transport security (one of --insecure or the three certificate files)")
    security.add_argument("--insecure", action="store_true", help="no TLS: only on a trusted network")
    security.add_argument("--ssl-ca-certfile", help="CA certificate (PEM)")
    security.add_argument("--ssl-certfile", help="server certificate (PEM)")
    security.add_argument("--ssl-keyfile", help="server private key (PEM)")
    security.add_argument("--enable-supernode-auth", action="store_true",
                          help="only registered clients may join (register keys with --authorized-key)")
    security.add_argument("--authorized-key", action="append", default=[],
                          help="public key file (OpenSSH ecdsa, e.g. from ssh-keygen -t ecdsa -b 384) of a client "
                               "allowed to join; repeat per client")
    parser.add_argument("--flwr-home", help="Flower state folder (default: a fresh temporary one)")
    add_config_options(parser, RunConfig())
    add_config_options(parser, FederationConfig())
    return parser


def security_flags(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """SuperLink flags and the CA file the ``flwr`` CLI needs (None when insecure)."""
    certs = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if args.insecure and any(certs):
        raise FedSMSError("--insecure and certificate files exclude each other; pass one or the other")
    if args.insecure and (args.enable_supernode_auth or args.authorized_key):  # fail closed, never drop them
        raise FedSMSError("--enable-supernode-auth and --authorized-key need TLS (the SuperLink ignores them with "
                          "--insecure); pass the three certificate files, or drop the authentication flags")
    if args.insecure:
        print("fedsms-server: WARNING: running without TLS (--insecure); traffic is readable and clients are not verified",
              file=sys.stderr)
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


def serve(args: argparse.Namespace) -> int:
    overrides = config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig())
    overrides.setdefault("min_available_clients", args.clients)
    overrides.setdefault("min_train_clients", args.clients)
    overrides["out_dir"] = str(Path(overrides.get("out_dir", "runs/server")).resolve())  # the ServerApp runs elsewhere
    if overrides.get("data_dir"):
        overrides["data_dir"] = str(Path(overrides["data_dir"]).resolve())
    _, fed = split_config(overrides)
    check_out_dir(Path(overrides["out_dir"]), fed.resume)
    flags, root_cert = security_flags(args)
    home = Path(args.flwr_home or tempfile.mkdtemp(prefix="fedsms-server-"))
    env = flower_env(home)
    write_connection(home, f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}", root_cert)
    app = write_app_dir(home / "app")
    log_path = home / "superlink.log"
    print(f"fedsms-server: starting the SuperLink on {args.host}:{args.port} (log: {log_path})")
    with open(log_path, "w") as log:
        superlink = subprocess.Popen(
            [flower_bin("flower-superlink"), *flags, "--host", args.host, "--port", str(args.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home,
            start_new_session=True,  # stop() ends its whole process group
        )
    try:
        wait_until_reachable("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port, 60, "the SuperLink")
        for key in args.authorized_key:
            register_supernode(key, env)
        return follow(app, overrides, env, superlink)
    finally:
        stop(superlink)


def follow(app: Path, overrides: dict, env: dict, superlink: subprocess.Popen) -> int:
    run_id = submit_run(app, overrides, env)
    print(f"fedsms-server: job {run_id} submitted; waiting for clients (fedsms-client --server HOST:PORT ...)")
    # `flwr log --stream` shows the ServerApp's progress; the status decides the end.
    logs = stream_log(run_id, env)
    try:
        while not (status := run_status(run_id, env)).get("status", "").startswith("finished"):
            if superlink.poll() is not None:
                raise FedSMSError(f"the SuperLink exited with code {superlink.returncode}; see its log in {env['FLWR_HOME']}")
            time.sleep(2)
    finally:
        time.sleep(1)
        logs.terminate()
    out_dir = overrides["out_dir"]
    if status["status"] != "finished:completed":
        print(f"fedsms-server: job {run_id} ended as {status['status']}: {status.get('status-details', '')}", file=sys.stderr)
        return 1
    stopped = stop_reason(Path(out_dir))
    if stopped:
        print(f"fedsms-server: job {run_id} stopped early: {stopped}", file=sys.stderr)
        return 1
    print(f"fedsms-server: job {run_id} completed; results in {out_dir}")
    return 0


def stop_reason(out_dir: Path) -> str:
    """Why the ServerApp ended the job early (its summary says), or "" when it ran to the end."""
    try:
        return json.loads((out_dir / "summary.json").read_text()).get("stopped", "")
    except (OSError, ValueError):
        return "the job wrote no summary.json"


def main(argv: list[str] | None = None) -> int:
    return run_command("fedsms-server", serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
