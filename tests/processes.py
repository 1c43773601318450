"""Helpers for the end-to-end tests that run real fedsms-server / fedsms-client processes."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from conftest import venv_bin

# A small job: dense round, then 2 phases of 2 rounds each to 80 % sparsity on digits.
JOB = [
    "--model",
    "cnn",
    "--phases",
    "2",
    "--target-sparsity",
    "0.8",
    "--pretrain-rounds",
    "1",
    "--rounds-per-phase",
    "2",
    "--pretrain-epochs",
    "3",
    "--retrain-epochs",
    "1",
    "--ood-examples",
    "100",
    "--device",
    "cpu",
]


def start(command: list[str]) -> subprocess.Popen:
    # A session of its own: killing the group takes the SuperLink / SuperNode with it, as a
    # crash of the whole host would.
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def start_server(
    tmp_path: Path, port: int, out: Path, *extra: str, clients: int = 3, security=("--insecure",)
) -> subprocess.Popen:
    return start(
        [
            venv_bin("fedsms-server"),
            *security,
            "--port",
            str(port),
            "--clients",
            str(clients),
            "--flwr-home",
            str(tmp_path / "server-home"),
            "--out-dir",
            str(out),
            *JOB,
            *extra,
        ]
    )


def start_client(
    tmp_path: Path, port: int, index: int, total: int, home: str = "", security=("--insecure",), *extra: str
) -> subprocess.Popen:
    return start(
        [
            venv_bin("fedsms-client"),
            *security,
            "--server",
            f"127.0.0.1:{port}",
            "--partition-id",
            str(index),
            "--num-partitions",
            str(total),
            "--flwr-home",
            str(tmp_path / (home or f"client{index}-home")),
            *extra,
        ]
    )


def kill_group(process: subprocess.Popen) -> None:
    """A machine dying: the launcher and every process under it, the SuperLink or SuperNode
    included (the launchers start those in a session of their own)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for pid in [process.pid, *(child.pid for child in children)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    process.wait()


def finish(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once it exits (all are killed if one overruns)."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                kill_group(p)


def round_lines(out: Path) -> list[dict]:
    path = out / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def write_client_key(folder: Path, name: str) -> tuple[str, str]:
    """A SuperNode's key pair for Flower's node authentication, in OpenSSH format (what
    ``ssh-keygen -t ecdsa -b 384`` writes): (private key file, public key file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return str(private), str(public)


def write_test_certificates(folder: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (PEM files):
    the same files the README's openssl commands make."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, key, signer, ca: bool, san=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("fedsms test CA", None, ca_key, ca_key, ca=True)
    server_cert = build(
        "127.0.0.1",
        ca_cert.subject,
        server_key,
        ca_key,
        ca=False,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tuple(str(p) for p in paths)


def stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its managed SuperLink running (in a session of its own); stop it by
    its process id, found by the log file it was started with, which lies in our FLWR_HOME."""
    marker = str(flwr_home / "local-superlink")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(marker) for arg in argv):
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGTERM)


def flwr_run(app: Path, cwd: Path, flwr_home: Path, overrides: str, supernodes: int, timeout: float = 400):
    """`flwr run APP --stream` in local simulation with ``supernodes`` virtual clients, on
    free ports, its managed SuperLink stopped afterwards; the finished process."""
    from fedsms_flower.deployment import free_port

    env = {
        **os.environ,
        "PATH": f"{Path(venv_bin('python')).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    command = [venv_bin("flwr"), "run", str(app), "--stream", "--run-config", overrides]
    command += ["--federation-config", f"num-supernodes={supernodes}"]
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_local_superlink(flwr_home)
