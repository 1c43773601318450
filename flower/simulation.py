"""``fedsms simulate``: the whole federated job with N virtual clients on this machine,
through Flower's simulation runtime (Ray), from the same ServerApp and ClientApp code."""

from __future__ import annotations

from typing import Mapping

from fedsms.config import split_config


def simulate(config: Mapping, num_clients: int, *, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> None:
    """Run a federated SMS job with ``num_clients`` virtual SuperNodes; ``config`` holds
    run-config values (validated here, before anything starts)."""
    from flwr.simulation import run_simulation

    # The apps are imported here, not at module level: this shared package sits below both.
    from fedsms_client.app import make_client_app
    from fedsms_server.app import make_server_app

    split_config(config)  # a bad key fails now, in one sentence, not inside a Ray worker
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}}
    run_simulation(
        server_app=make_server_app(config),
        client_app=make_client_app(config),
        num_supernodes=num_clients,
        backend_config=backend,
    )
