"""Private data soups: accuracy, ε and exact sparsity of a differentially private data soup,
beside Flower's own DP wrapper around masked FedAvg at the same noise.

    python bench/private_soups.py --clients 20 --per-round 10 --noise 0,0.5,1,2 --out results/private_soups.json

Both federations run in this process over an in-process grid (``fedsms_flower.local_grid``)
on the embedded digits data, split among ``--clients`` clients IID and Dirichlet(0.3), with
``--per-round`` clients drawn per round, a fixed clipping norm ``--clip`` and δ = 1e-5:

- *fedsms*: ``SparseSoupStrategy`` in data mode with ``dp = "server-fixed"``, 2 dense rounds
  then 2 phases × 2 rounds to 90 % sparsity: every round's update clipped, noised under the
  mask, ε accounted with ``dp-sampling = "without-replacement"`` (the sampler's fixed-size draw).
- *Flower*: ``DifferentialPrivacyServerSideFixedClipping`` around Flower's ``FedAvg``, for as
  many rounds, with clients that train under fedsms's final 90 % mask of the noiseless run
  (masked FedAvg) and report equal weights (the wrapper's accounted mode needs them); its
  accountant is Flower's, which supports only ``no-amplification`` for this wrapper.

Prints accuracy (%), ε at δ = 1e-5 and the sparsity of the released model (the share of the
prunable weights that are exactly zero). One seed: the accuracies carry the noise of one draw.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedsms.config import FederationConfig, RunConfig
from fedsms.data import load_dataset
from fedsms.data.partition import partition
from fedsms.evaluate import evaluate
from fedsms.models import build_for
from fedsms.schedule import round_candidate
from fedsms.training import train_candidate
from fedsms_client.app import make_client_app
from fedsms_flower.local_grid import LocalGrid, partitions
from fedsms_server.strategy import SparseSoupStrategy

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
DELTA = 1e-5
ROUNDS = dict(pretrain_rounds=2, rounds_per_phase=2)  # + 2 phases: 6 rounds


def run_config(out_dir: Path) -> RunConfig:
    return RunConfig(
        dataset="digits",
        model="mlp",
        phases=2,
        target_sparsity=0.9,
        pretrain_epochs=5,
        retrain_epochs=3,
        batch_size=16,
        lr=0.3,
        ood=False,
        diagnostics=False,
        device="cpu",
        out_dir=str(out_dir),
    )


def zeros_share(state: dict, names) -> float:
    total = sum(state[n].numel() for n in names)
    return 1 - sum(int(torch.count_nonzero(state[n])) for n in names) / total


def fedsms_soup(splits, scheme: str, noise: float, args, out_dir: Path) -> tuple[dict, dict]:
    """The private data soup's row and its final mask."""
    run = run_config(out_dir)
    fed = FederationConfig(
        mode="data",
        partitioning=scheme,
        dirichlet_alpha=0.3,
        clients_per_round=args.per_round,
        min_train_clients=args.per_round,
        min_available_clients=args.clients,
        fraction_evaluate=0.0,
        dp="server-fixed",
        dp_noise_multiplier=noise,
        dp_clipping_norm=args.clip,
        dp_delta=DELTA,
        **ROUNDS,
    )
    torch.manual_seed(0)
    strategy = SparseSoupStrategy(run, fed, build_for("mlp", splits), server_data=splits, out_dir=out_dir)
    strategy.start(LocalGrid(make_client_app(data_fn=lambda *_: splits), partitions(args.clients)))
    summary = json.loads((out_dir / "summary.json").read_text())
    row = {
        "accuracy": summary["phases"][-1]["accuracy"],
        "epsilon": summary["privacy"]["epsilon"],
        "sparsity": zeros_share(strategy.soup, strategy.mask),
        "rounds": len(strategy.rounds),
    }
    return row, dict(strategy.mask)


def flower_fedavg(splits, scheme: str, noise: float, mask: dict, rounds: int, args) -> dict:
    """Flower's server-side fixed-clipping DP wrapper around FedAvg, clients under ``mask``."""
    run = run_config(Path("unused"))
    parts = partition(splits.train.labels, scheme, args.clients, seed=run.seed, alpha=0.3)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        model = build_for("mlp", splits)
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        server_round = int(message.content["config"]["server-round"])
        # Masked training zeroes the pruned entries of the received (noisy, dense) model first.
        train_candidate(
            model, mask, splits.train.subset(parts[pid]), round_candidate(run, "data", pid, 1, server_round)
        )
        metrics = MetricRecord({"num-examples": 1})  # equal weights: the accounted wrapper needs them
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=message)

    accountant = RdpAccountant(
        PrivacyConfig(DELTA, args.clients, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    fedavg = FedAvg(
        fraction_train=args.per_round / args.clients,
        fraction_evaluate=0.0,
        min_train_nodes=args.per_round,
        min_available_nodes=args.clients,
    )
    wrapped = DifferentialPrivacyServerSideFixedClipping(
        fedavg, noise, args.clip, args.per_round, accountant=accountant if noise else None
    )
    torch.manual_seed(0)
    start = build_for("mlp", splits)
    state = {k: v * mask[k] if k in mask else v for k, v in start.state_dict().items()}
    result = wrapped.start(
        LocalGrid(app, partitions(args.clients)), initial_arrays=ArrayRecord(state), num_rounds=rounds
    )
    final = result.arrays.to_torch_state_dict()
    start.load_state_dict(final)
    return {
        "accuracy": evaluate(start, splits.test)["accuracy"],
        "epsilon": wrapped.privacy_spent().epsilon if noise else None,
        "sparsity": zeros_share(final, mask),
    }


def table(rows: list[dict]) -> str:
    def eps(value):
        return "inf" if value is None else f"{value:.3g}"

    head = (
        f"{'partitioning':<13}{'noise':>6}  {'fedsms acc %':>12}{'fedsms eps':>11}{'sparsity':>10}"
        f"  {'Flower DP acc %':>15}{'Flower eps':>11}{'sparsity':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        f, w = r["fedsms"], r["flower"]
        lines.append(
            f"{r['partitioning']:<13}{r['noise']:>6g}  {100 * f['accuracy']:>12.1f}{eps(f['epsilon']):>11}"
            f"{f['sparsity']:>10.2%}  {100 * w['accuracy']:>15.1f}{eps(w['epsilon']):>11}{w['sparsity']:>10.2%}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--noise", default="0,0.5,1,2", help="comma list of noise multipliers")
    p.add_argument("--clip", type=float, default=1.0, help="clipping norm of each update")
    p.add_argument("--partitionings", default="iid,dirichlet")
    p.add_argument("--out", default="results/private_soups.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    splits = load_dataset("digits")
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.partitionings.split(","):
            mask = None
            for noise in [float(z) for z in args.noise.split(",")]:
                row, final_mask = fedsms_soup(splits, scheme, noise, args, Path(tmp) / f"{scheme}-{noise:g}")
                mask = mask or final_mask  # the first (noiseless when listed first) run's mask
                flower = flower_fedavg(splits, scheme, noise, mask, row["rounds"], args)
                rows.append({"partitioning": scheme, "noise": noise, "fedsms": row, "flower": flower})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(
        f"\n{args.clients} clients, {args.per_round} per round, clipping norm {args.clip:g}, delta {DELTA:g}, "
        f"{rows[0]['fedsms']['rounds']} rounds; fedsms eps: without-replacement sampling; Flower eps: its "
        f"wrapper's no-amplification accounting ({time.perf_counter() - started:.0f} s)\n"
    )
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
