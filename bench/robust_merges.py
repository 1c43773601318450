"""Robust merges under attack: the defence matrix (attack x defence, accuracy), seeded.

    python bench/robust_merges.py [--seeds 0] [--out results/robust_merges.json] [--tiny]

A data soup over 7 clients (IID shards of the embedded digits, the `mlp`), 2 dense rounds
then one phase to 50 % sparsity of 2 rounds, in this process (``fedsms_flower.local_grid``).
Attacked clients train honestly, then send ``soup + scale x (trained - soup)`` through the
client toolkit (a valid compact reply: the gate cannot tell it from an honest one):

- ``sign-flip x3``: 2 of 7 clients, scale -3 (a direction attack with a large norm);
- ``sign-flip x1``: 2 of 7 clients, scale -1 (the same direction attack at an honest norm);
- ``scaled x50``: 1 of 7 clients, scale 50 (a magnitude attack).

Seven clients, because Multi-Krum's guarantee needs n > 2f + 2 (f = 2 attackers).

Defences: the plain ``uniform`` merge, ``update-norm-bound 3``, ``median``,
``trimmed-mean`` (trim-fraction 0.3: two of 7 cut at each end), ``multi-krum``
(krum-malicious 2). Accuracy is the central test accuracy of the final soup; the ``none``
row is each defence's clean accuracy.
"""

from __future__ import annotations

import tempfile

import torch
from common import parser, report
from flwr.clientapp import ClientApp

from fedsms import codec
from fedsms.config import FederationConfig, RunConfig
from fedsms.data import load_dataset
from fedsms.models import build_for
from fedsms.report import mean_std
from fedsms_client import toolkit
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import LocalGrid, partitions
from fedsms_flower.records import METRICS_KEY, NUM_EXAMPLES, UPDATE_KEY, payload_of
from fedsms_server.strategy import JobStopped, SparseSoupStrategy

CLIENTS = 7
ATTACKS = {"none": (0, 1.0), "sign-flip x3": (2, -3.0), "sign-flip x1": (2, -1.0), "scaled x50": (1, 50.0)}
DEFENCES = {
    "uniform": {"merge": "uniform"},
    "norm-bound 3": {"merge": "uniform", "update_norm_bound": 3.0},
    "median": {"merge": "median"},
    "trimmed-mean 0.3": {"merge": "trimmed-mean", "trim_fraction": 0.3},
    "multi-krum f=2": {"merge": "multi-krum", "krum_malicious": 2},
}


def attacked_app(attackers: int, scale: float) -> ClientApp:
    """The built-in ClientApp; the first ``attackers`` partitions scale their update by ``scale``."""
    honest = make_client_app()
    app = ClientApp()
    app.query("identity")(toolkit.identity)

    @app.train()
    def train(message, context):
        reply = honest(message, context)
        if int(context.node_config["partition-id"]) >= attackers or reply.has_error():
            return reply
        model = build_for("mlp", load_dataset("digits"))
        soup = toolkit.receive(message, model)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trained = codec.decode(
            payload_of(reply.content[UPDATE_KEY]), expected_mask=soup.mask, expected_digest=None, template=start
        ).to_state_dict(start)
        sent = {
            k: start[k] + scale * (trained[k] - start[k]) if v.is_floating_point() else v for k, v in trained.items()
        }
        return soup.reply(sent, int(reply.content[METRICS_KEY][NUM_EXAMPLES]))

    @app.evaluate()
    def evaluate(message, context):
        return honest(message, context)

    return app


def run(attack: str, defence: str, seed: int, tiny: bool) -> float:
    attackers, scale = ATTACKS[attack]
    data = load_dataset("digits")
    with tempfile.TemporaryDirectory() as out:
        run_config = RunConfig(
            model="mlp", phases=1, target_sparsity=0.5, pretrain_epochs=1 if tiny else 2, retrain_epochs=1,
            batch_size=32, lr=0.05, pretrain_lr=0.05, augment=False, ood=False, diagnostics=False, seed=seed,
            out_dir=out, **DEFENCES[defence],
        )  # fmt: skip
        fed = FederationConfig(
            mode="data", pretrain_rounds=1 if tiny else 2, rounds_per_phase=1 if tiny else 2,
            min_train_clients=3, min_available_clients=CLIENTS, fraction_evaluate=0.0, round_retries=0,
        )  # fmt: skip
        torch.manual_seed(seed)
        strategy = SparseSoupStrategy(run_config, fed, build_for("mlp", data), server_data=data, log=lambda _: None)
        try:
            strategy.start(LocalGrid(attacked_app(attackers, scale), partitions(CLIENTS)))
        except JobStopped:
            return float("nan")  # the job stopped: no soup to score
        return strategy.rounds[-1].central_eval["accuracy"]


def main() -> None:
    p = parser(__doc__, "results/robust_merges.json", repeats=1)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for attack in ATTACKS:
        row = {"attack": attack}
        for defence in DEFENCES:
            mean, std = mean_std([100 * run(attack, defence, seed, args.tiny) for seed in seeds])
            row[defence] = f"{mean:.1f}" if len(seeds) == 1 else f"{mean:.1f} ± {std:.1f}"
        rows.append(row)
        print(row, flush=True)
    columns = [("attack", "attack", "s")] + [(d, d, "s") for d in DEFENCES]
    report(args.out, rows, columns, seeds=seeds, clients=CLIENTS)


if __name__ == "__main__":
    main()
