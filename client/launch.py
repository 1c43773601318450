"""``fedsms-client``: join a fedsms job as one Flower SuperNode and exit when it is over.

The SuperNode runs the fedsms ClientApp for every message; the ClientApp notes each
message it handled in a status file, and once the last round has been handled and the
server has shut its SuperLink down, the SuperNode is stopped and this exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fedsms import FedSMSError
from fedsms.cli import run_command
from fedsms_flower.deployment import (
    flower_bin,
    flower_env,
    free_port,
    reachable,
    refused_admission,
    scratch_home,
    split_address,
    stop,
    toml_value,
    wait_until_reachable,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsms-client",
        description="Join a federated Sparse Model Soups job as one client (a Flower SuperNode).",
    )
    parser.add_argument("--server", required=True, help="HOST:PORT of fedsms-server")
    parser.add_argument("--partition-id", type=int, required=True, help="this client's index, 0..num-partitions-1")
    parser.add_argument("--num-partitions", type=int, required=True, help="number of clients in the job")
    parser.add_argument(
        "--data-dir",
        help="this machine's data folder, the node's data-dir: the built-in app's torchvision "
        "data sets, or what your app's ClientApp reads",
    )
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: the job's setting)")
    parser.add_argument("--port", type=int, help="local port of the SuperNode's app API (default: a free one)")
    parser.add_argument(
        "--connect-timeout", type=float, default=120, help="seconds to wait for the server (default: 120)"
    )
    security = parser.add_argument_group("transport security (one of --insecure or --root-certificates)")
    security.add_argument("--insecure", action="store_true", help="no TLS: only on a trusted network")
    security.add_argument("--root-certificates", help="CA certificate (PEM) that signed the server's certificate")
    security.add_argument(
        "--auth-key", help="this client's private key (OpenSSH ecdsa) when the server authenticates clients"
    )
    parser.add_argument("--flwr-home", help="Flower state folder (default: a fresh temporary one)")
    return parser


def node_config(args: argparse.Namespace, status_file: Path) -> str:
    if not 0 <= args.partition_id < args.num_partitions:
        raise FedSMSError(
            f"--partition-id {args.partition_id} must be in [0, {args.num_partitions}); fix one of the two"
        )
    values = {"partition-id": args.partition_id, "num-partitions": args.num_partitions, "status-file": str(status_file)}
    if args.data_dir:
        values["data-dir"] = str(Path(args.data_dir).resolve())
    if args.device:
        values["device"] = args.device
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def security_flags(args: argparse.Namespace) -> list[str]:
    if args.insecure and args.root_certificates:
        raise FedSMSError("--insecure and --root-certificates exclude each other; pass one")
    if args.insecure and args.auth_key:
        raise FedSMSError(
            "--auth-key needs TLS (Flower authenticates clients only over TLS); pass --root-certificates "
            "instead of --insecure"
        )
    if args.insecure:
        print("fedsms-client: WARNING: connecting without TLS (--insecure)", file=sys.stderr)
        flags = ["--insecure"]
    elif args.root_certificates:
        if not Path(args.root_certificates).is_file():
            raise FedSMSError(f"certificate file {args.root_certificates} does not exist; pass the right path")
        flags = [
            "--root-certificates",
            str(Path(args.root_certificates).resolve()),
        ]  # the SuperNode runs in its own folder
    else:
        raise FedSMSError("pass --root-certificates CA.pem for TLS, or --insecure explicitly")
    if args.auth_key:
        if not Path(args.auth_key).is_file():
            raise FedSMSError(f"key file {args.auth_key} does not exist; pass the right path")
        flags += ["--auth-supernode-private-key", str(Path(args.auth_key).resolve())]
    return flags


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def join(args: argparse.Namespace) -> int:
    return scratch_home(f"fedsms-client{args.partition_id}-", lambda home: join_from(home, args), args.flwr_home)


def join_from(home: Path, args: argparse.Namespace) -> int:
    """Run this client's SuperNode with its files in ``home`` until the job ends; the exit code."""
    host, port = split_address(args.server)
    flags = security_flags(args)
    home.mkdir(parents=True, exist_ok=True)
    status_file, log_path = home / "status.json", home / "supernode.log"
    config = node_config(args, status_file)
    wait_until_reachable(host, port, args.connect_timeout, "fedsms-server")
    print(f"fedsms-client {args.partition_id}: joining {args.server} (log: {log_path})")
    # With node authentication the server registers the clients' keys just after its
    # SuperLink opens, so a client that is quicker than that is refused at first: retry.
    deadline = time.monotonic() + args.connect_timeout
    while True:
        logged_before = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as log:
            supernode = subprocess.Popen(
                [
                    flower_bin("flower-supernode"),
                    *flags,
                    "--superlink",
                    args.server,
                    "--port",
                    str(args.port or free_port()),
                    "--node-config",
                    config,
                    "--max-wait-time",
                    str(args.connect_timeout),
                ],
                env=flower_env(home),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=home,
                start_new_session=True,  # stop() ends its whole process group
            )
        try:
            code = watch(supernode, status_file, host, port, args)
        finally:
            stop(supernode)
        if code is not None:
            return code
        if not refused_admission(log_path, logged_before):
            print(
                f"fedsms-client {args.partition_id}: the SuperNode exited with code {supernode.returncode}; "
                f"see {log_path}",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() > deadline:
            print(
                f"fedsms-client {args.partition_id}: the server refused this client for {args.connect_timeout:g} s; "
                "is its public key registered with --authorized-key?",
                file=sys.stderr,
            )
            return 1
        time.sleep(2)


def watch(supernode: subprocess.Popen, status_file: Path, host: str, port: int, args: argparse.Namespace) -> int | None:
    """Until the server is gone: then 0 if the last round was handled, else 1. None when
    the SuperNode exited before handling any round."""
    seen_round, seen_error, status = 0, "", {}
    while True:
        # The ClientApp rewrites the file after every message; a read that catches it
        # mid-write finds no JSON: keep the last status read.
        status = read_status(status_file) or status
        if status.get("error") and status["error"] != seen_error:
            seen_error = status["error"]
            print(
                f"fedsms-client {args.partition_id}: round {status.get('server-round', 0)} failed on this client: "
                f"{seen_error}",
                file=sys.stderr,
            )
        elif status.get("server-round", 0) != seen_round and not status.get("error"):
            seen_round = status["server-round"]
            print(f"fedsms-client {args.partition_id}: handled round {seen_round}")
        if not reachable(host, port):
            if status.get("last-round"):
                print(
                    f"fedsms-client {args.partition_id}: job finished; results are on the server in {status.get('out-dir')}"
                )
                return 0
            print(
                f"fedsms-client {args.partition_id}: the server at {args.server} went away before the last round "
                f"(last handled: round {seen_round})",
                file=sys.stderr,
            )
            return 1
        if supernode.poll() is not None:
            if not seen_round:
                return None
            print(
                f"fedsms-client {args.partition_id}: the SuperNode exited with code {supernode.returncode} after "
                f"round {seen_round}; see {status_file.parent / 'supernode.log'}",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    return run_command("fedsms-client", join, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
