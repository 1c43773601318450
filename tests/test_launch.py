"""fedsms-server and fedsms-client refuse unsafe or wrong set-ups before starting anything."""

import argparse
import json
import socket
import threading
import time

import pytest

from fedsms_client import launch as client_launch
from fedsms_server import launch as server_launch


def test_server_requires_insecure_to_be_asked_for(capsys):
    assert server_launch.main(["--port", "1"]) == 2
    assert "--insecure explicitly" in capsys.readouterr().err


def test_server_refuses_missing_certificates_and_bad_config(capsys, tmp_path):
    assert server_launch.main(["--ssl-ca-certfile", "a", "--ssl-certfile", "b", "--ssl-keyfile", "c"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert server_launch.main(["--insecure", "--target-sparsity", "2"]) == 2
    assert "'target-sparsity' must be in [0, 1)" in capsys.readouterr().err


def test_server_checks_node_authentication_and_resume(capsys, tmp_path):
    for name in ("ca.crt", "server.pem", "server.key", "client.pub"):
        (tmp_path / name).write_text("x")
    tls = [
        "--ssl-ca-certfile",
        str(tmp_path / "ca.crt"),
        "--ssl-certfile",
        str(tmp_path / "server.pem"),
        "--ssl-keyfile",
        str(tmp_path / "server.key"),
    ]
    assert server_launch.main([*tls, "--authorized-key", str(tmp_path / "client.pub")]) == 2
    assert "--authorized-key needs --enable-supernode-auth" in capsys.readouterr().err
    assert server_launch.main([*tls, "--enable-supernode-auth", "--authorized-key", str(tmp_path / "nope.pub")]) == 2
    assert "key file" in capsys.readouterr().err
    assert server_launch.main(["--insecure", "--resume", "--out-dir", str(tmp_path / "fresh")]) == 2
    assert "--resume needs a round checkpoint" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rounds.jsonl").write_text("{}\n")
    assert server_launch.main(["--insecure", "--out-dir", str(tmp_path / "old")]) == 2
    assert "or add --resume" in capsys.readouterr().err


def test_client_checks_its_arguments(capsys):
    base = ["--server", "127.0.0.1:1", "--num-partitions", "2"]
    assert client_launch.main([*base, "--partition-id", "0"]) == 2
    assert "--insecure explicitly" in capsys.readouterr().err
    assert client_launch.main([*base, "--partition-id", "5", "--insecure"]) == 2
    assert "--partition-id 5 must be in [0, 2)" in capsys.readouterr().err
    assert client_launch.main(["--server", "nohost", "--num-partitions", "2", "--partition-id", "0", "--insecure"]) == 2
    assert "not HOST:PORT" in capsys.readouterr().err
    assert client_launch.main([*base, "--partition-id", "0", "--insecure", "--auth-key", "missing.key"]) == 2
    assert "--auth-key needs TLS" in capsys.readouterr().err  # before the key file is looked for


def test_client_gives_up_on_an_absent_server(capsys):
    code = client_launch.main(
        [
            "--server",
            "127.0.0.1:9",
            "--num-partitions",
            "1",
            "--partition-id",
            "0",
            "--insecure",
            "--connect-timeout",
            "1",
        ]
    )
    assert code == 2 and "did not answer" in capsys.readouterr().err


@pytest.mark.parametrize("module", [server_launch, client_launch])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--insecure" in capsys.readouterr().out


class RunningNode:
    returncode = None

    def poll(self):
        return None


def test_client_survives_a_status_file_caught_mid_rewrite(tmp_path, capsys):
    """The ClientApp rewrites its status file after each message; a read between the truncate
    and the write finds an empty file, which must not end the client while the job runs."""
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"server-round": 4, "last-round": False}))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def job():
            time.sleep(1.5)
            status.write_text("")  # mid-rewrite
            time.sleep(1.5)
            status.write_text(json.dumps({"server-round": 5, "last-round": True}))
            time.sleep(1.5)
            server.close()  # the server shuts down after the last round

        threading.Thread(target=job, daemon=True).start()
        args = argparse.Namespace(partition_id=0, server=f"127.0.0.1:{port}")
        assert client_launch.watch(RunningNode(), status, "127.0.0.1", port, args) == 0
    out = capsys.readouterr().out
    assert "handled round 4" in out and "handled round 5" in out and "job finished" in out


def test_relative_paths_reach_the_server_app_as_the_user_meant_them(tmp_path, monkeypatch):
    """The ServerApp runs in the SuperLink's own folder, so every path flag is made absolute
    against the folder the user typed it in (a relative --init-checkpoint once failed there)."""
    monkeypatch.chdir(tmp_path)
    args = server_launch.build_parser().parse_args(
        ["--insecure", "--init-checkpoint", "ck/dense", "--data-dir", "data", "--out-dir", "out"]
    )
    job = server_launch.built_in_job(args)
    for key, name in (("init_checkpoint", "ck/dense"), ("data_dir", "data"), ("out_dir", "out")):
        assert job.run_config[key] == str(tmp_path / name), key


def test_a_client_prints_its_own_failure_as_the_server_quotes_it(tmp_path, capsys):
    """The built-in ClientApp writes the exception that failed a round to the node's status
    file; fedsms-client prints it on the client's console before the server goes away."""
    from helpers import RecordingGrid, make_strategy

    from fedsms_client.app import make_client_app
    from fedsms_server.strategy import RoundFailed

    status = tmp_path / "status.json"
    app = make_client_app(model_fn=lambda run, splits: (_ for _ in ()).throw(ValueError("no GPU on this node")))
    nodes = [{"partition-id": i, "num-partitions": 2, "status-file": str(status)} for i in range(2)]
    with pytest.raises(RoundFailed, match="ValueError: no GPU on this node"):
        make_strategy(tmp_path / "job").start(RecordingGrid(app, nodes))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]  # bound, not listening: the server is gone
        args = argparse.Namespace(partition_id=0, server=f"127.0.0.1:{port}")
        assert client_launch.watch(RunningNode(), status, "127.0.0.1", port, args) == 1
    err = capsys.readouterr().err
    assert "round 1 failed on this client: ValueError: no GPU on this node" in err and "went away" in err
