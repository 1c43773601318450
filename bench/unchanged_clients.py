"""Unchanged Flower ClientApps against the client toolkit: accuracy and bytes per round.

    python bench/unchanged_clients.py [--seeds 0,1,2] [--out results/unchanged_clients.json]

The same job twice per seed: a data soup over 4 clients, 2 phases to 90 % sparsity, each
client 2 local epochs of SGD on its partition of the synthetic data of
``examples/quickstart/task.py``. Once with ``examples/quickstart/client_app.py`` (Flower's
quickstart layout, ``client-protocol = flower``: the dense model both ways, nothing keeps
pruned weights at zero during local training) and once with ``toolkit_client_app.py`` (the
same loop through fedsms's toolkit, ``client-protocol = compact``). The clients run in
this process (``fedsms_flower.local_grid``), so only the federation's logic differs.
Accuracy: the clients' federated evaluation of the final soup on the shared test data.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import parser, report

from fedsms.config import FederationConfig, RunConfig
from fedsms.report import mean_std
from fedsms_flower.local_grid import LocalGrid, partitions
from fedsms_server.strategy import SparseSoupStrategy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
VARIANTS = {
    "flower (unchanged client)": ("client_app", "flower"),
    "compact (toolkit)": ("toolkit_client_app", "compact"),
}


def run(client_module: str, protocol: str, seed: int, phases: int) -> dict:
    sys.path.insert(0, str(EXAMPLE))
    client, task = importlib.import_module(client_module), importlib.import_module("task")
    sys.path.remove(str(EXAMPLE))
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        run_config = RunConfig(target_sparsity=0.9, phases=phases, lr=0.05, pretrain_lr=0.05, seed=seed, out_dir=out)
        fed = FederationConfig(mode="data", client_protocol=protocol, min_train_clients=4, min_available_clients=4)
        strategy = SparseSoupStrategy(run_config, fed, task.Net(), log=lambda _: None)
        strategy.start(LocalGrid(client.app, partitions(4), run_config={"local-epochs": 2}))
        rounds = [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]
    return {
        "accuracy": last["federated_eval"]["accuracy"],
        "sparsity": last["sparsity"],
        # per client and round, in the last (sparsest) round: training down + evaluation down, and up
        "down": last["bytes_down"] / (2 * last["clients"]),
        "up": last["bytes_up"] / last["accepted"],
    }


def main() -> None:
    p = parser(__doc__, "results/unchanged_clients.json", repeats=1)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.tiny else None]
    rows = []
    for name, (module, protocol) in VARIANTS.items():
        runs = [run(module, protocol, seed, phases=1 if args.tiny else 2) for seed in seeds]
        mean, std = mean_std([r["accuracy"] * 100 for r in runs])
        rows.append(
            {
                "layout": name,
                "accuracy": f"{mean:.2f} ± {std:.2f}",
                "sparsity": runs[0]["sparsity"],
                "down": runs[0]["down"],
                "up": runs[0]["up"],
                "runs": runs,
            }
        )
    report(
        args.out,
        rows,
        [
            ("layout", "client layout", ""),
            ("accuracy", "accuracy %", ""),
            ("sparsity", "sparsity", ".4f"),
            ("down", "B down/client/msg", ",.0f"),
            ("up", "B up/client", ",.0f"),
        ],
        seeds=seeds,
    )


if __name__ == "__main__":
    main()
