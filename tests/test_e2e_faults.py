"""Real processes on 127.0.0.1 over TLS with Flower's node authentication: a client without
a registered key never takes part; a client killed mid-round is left out of that round,
the job still ends at the exact target sparsity, and the client, started again, rejoins
at the current phase."""

import pytest
from processes import (
    finish,
    kill_group,
    round_lines,
    start_client,
    start_server,
    wait_for,
    write_client_key,
    write_test_certificates,
)

from fedsms_flower.deployment import free_port

pytestmark = pytest.mark.slow


def test_authenticated_tls_job_survives_a_client_killed_mid_round_that_comes_back(tmp_path, flwr_home):
    ca, cert, key = write_test_certificates(tmp_path / "certs")
    keys = [write_client_key(tmp_path / "keys", f"client{i}") for i in range(3)]
    intruder_key, _ = write_client_key(tmp_path / "keys", "intruder")  # never registered
    server_security = ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key, "--enable-supernode-auth"]
    for _, public in keys:
        server_security += ["--authorized-key", public]

    def client_security(private_key):
        return ("--root-certificates", ca, "--auth-key", private_key)

    port, out = free_port(), tmp_path / "out"
    server = start_server(
        tmp_path, port, out, "--round-timeout", "120", "--fraction-evaluate", "0", clients=2, security=server_security
    )
    clients = [start_client(tmp_path, port, i, 3, security=client_security(keys[i][0])) for i in range(3)]
    intruder = start_client(
        tmp_path, port, 0, 3, "intruder-home", client_security(intruder_key), "--connect-timeout", "30"
    )
    try:
        # Round 3 (phase 1, round 2) has just been sent to all three: kill client 2 while it trains.
        wait_for(lambda: len(round_lines(out)) >= 2, 400, "round 2 to finish")
        kill_group(clients[2])
        wait_for(lambda: len(round_lines(out)) >= 3, 400, "round 3 to finish without client 2")
        comeback = start_client(tmp_path, port, 2, 3, home="client2-again-home", security=client_security(keys[2][0]))
        outputs = finish([server, clients[0], clients[1], comeback, intruder], timeout=600)
    finally:
        for process in [server, *clients, intruder]:
            if process.poll() is None:
                kill_group(process)

    server_out, *client_outs, comeback_out, intruder_out = outputs
    assert server.returncode == 0, server_out
    assert "without TLS" not in server_out
    for process, text in zip([clients[0], clients[1], comeback], [*client_outs, comeback_out]):
        assert process.returncode == 0, text
        assert "job finished" in text
    assert "handled round 5" in comeback_out  # the client that came back took part again
    assert intruder.returncode == 1 and "handled round" not in intruder_out, intruder_out
    assert "is its public key registered" in intruder_out

    rounds = round_lines(out)
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r["clients"] <= 4 for r in rounds)  # the intruder was never sampled
    assert rounds[2]["accepted"] == 2 and len(rounds[2]["rejected"]) == 1  # the killed client, with its reason
    assert rounds[4]["accepted"] == 3 and rounds[4]["phase"] == 2
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
