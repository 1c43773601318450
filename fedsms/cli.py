"""The ``fedsms`` command: ``local``, ``simulate``, ``soup`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from fedsms import FedSMSError

CONFIG_HELP = {
    "dataset": "digits (embedded), mnist1d or mnist1d-N (generated), cifar10, cifar100, mnist or fashion-mnist",
    "data_dir": "folder holding the torchvision data sets' files",
    "model": "mlp, mlp-WIDTH, cnn, resnet20, resnet56, wrn-D-K or tv:TORCHVISION_NAME",
    "target_sparsity": "final fraction of prunable weights that are zero",
    "phases": "prune-retrain phases P",
    "candidates": "candidates m retrained per phase",
    "gmp_updates": "mask updates of gmp/gmp-soup within the phases × retrain-epochs budget (0: one per phase)",
    "gmp_initial_sparsity": "sparsity where the cubic GMP schedule starts (the dense model's step)",
    "pruning": "global (magnitude over all layers), uniform (per layer) or random",
    "keep_first_dense": "never prune the first prunable layer",
    "keep_last_dense": "never prune the last prunable layer",
    "pretrain_epochs": "dense pretraining epochs (0 with --init-checkpoint)",
    "pretrain_lr": "peak learning rate of dense pretraining",
    "retrain_epochs": "epochs each candidate retrains per phase",
    "lr": "peak retraining learning rate",
    "weight_decay": "retraining weight decay (Nesterov momentum when > 0)",
    "batch_size": "training batch size",
    "label_smoothing": "label smoothing of the training loss",
    "lr_schedule": "linear (warm-up then decay to 0), cosine or constant",
    "warmup_fraction": "fraction of the steps spent warming up",
    "augment": "random translation (and flips where they fit) during training",
    "recipe": "how candidates differ, e.g. 'weight_decay=1e-4,5e-4;lr=0.05,0.1' (seeds always differ)",
    "merge": "uniform, weighted (by examples) or greedy (held-out accuracy) soup",
    "recalibration_fraction": "fraction of training data for norm-statistics recalibration",
    "heldout_fraction": "fraction of the training data held out (seeded) for greedy/best-of-m",
    "methods": "comma list of imp, imp-best, imp-avg, sms, sms-greedy, gmp, gmp-soup (dense always runs)",
    "ood": "evaluate under corruptions at severities 1-5",
    "ood_examples": "test examples used for the OOD evaluation",
    "seed": "base seed",
    "device": "auto, cpu or cuda[:N]",
    "workers": "candidates trained in parallel worker processes",
    "out_dir": "where results, checkpoints and plots go",
    "init_checkpoint": "start from this dense checkpoint instead of pretraining",
    "mode": "hyperparameter (clients differ by recipe) or data (clients differ by shard)",
    "pretrain_rounds": "dense federated rounds before phase 1",
    "rounds_per_phase": "federated rounds in each prune-retrain phase",
    "pruning_schedule": "imp (prune at each phase start) or gmp (cubic schedule, mask updated at round boundaries)",
    "partitioning": "iid, dirichlet or shards (data mode)",
    "dirichlet_alpha": "label-skew concentration of the dirichlet partitioning",
    "min_train_clients": "valid replies a round needs to update the soup",
    "min_available_clients": "clients to wait for before a round starts",
    "fraction_evaluate": "fraction of clients asked for federated evaluation",
    "value_dtype": "fp32, fp16 or bf16 values on the wire",
    "recalibration": "norm statistics re-estimated on the server's data or by the clients",
    "server_data": "the server holds the data set (central evaluation, recalibration, greedy)",
    "round_timeout": "seconds to wait for the replies of a round",
    "round_retries": "times a round is sent again when too few valid replies came back",
    "resume": "continue from the last round checkpoint in --out-dir",
}


def add_config_options(parser: argparse.ArgumentParser, defaults) -> None:
    """One ``--key`` option per run-config field; unset options keep the defaults."""
    for field in fields(defaults):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        # A bare boolean flag (``--resume``) means true; ``--ood false`` still works.
        switch = {"nargs": "?", "const": "true"} if field.type == "bool" else {}
        parser.add_argument(flag, dest=field.name, default=None, metavar=field.type.upper(), **switch,
                            help=f"{CONFIG_HELP.get(field.name, '')} (default: {default!r})")


def config_overrides(args: argparse.Namespace, defaults) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(defaults) if getattr(args, f.name) is not None}


def cmd_local(args: argparse.Namespace) -> int:
    from fedsms.config import RunConfig
    from fedsms.local import run_local
    from fedsms.plots import plot_results
    from fedsms.report import by_schedule, final_table, phase_table, summary

    config = RunConfig.from_mapping(config_overrides(args, RunConfig()))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    out = Path(config.out_dir)
    if (out / "results.jsonl").exists():
        raise FedSMSError(f"{out / 'results.jsonl'} already exists; pass another --out-dir or remove it")
    rows = run_local(config, seeds)
    (out / "summary.json").write_text(json.dumps({"config": config.to_dict(), "seeds": seeds or [config.seed],
                                                  "results": summary(rows)}, indent=2))
    plots = plot_results(rows, out)
    for part in by_schedule(rows):
        print()
        print(phase_table(part))
    print()
    print(f"final phase of each method, target sparsity {config.target_sparsity:.0%}:")
    print(final_table(rows))
    print(f"\nresults: {out / 'results.jsonl'}, {out / 'summary.json'}; plots: {', '.join(str(p) for p in plots)}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedsms.config import FederationConfig, RunConfig, split_config

    overrides = config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig())
    overrides.setdefault("out_dir", "runs/simulate")
    _, fed = split_config(overrides)
    check_out_dir(Path(overrides["out_dir"]), fed.resume)
    # Flower is imported only here: the library itself never needs it.
    from fedsms_flower.simulation import simulate

    simulate(overrides, args.num_clients, cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client)
    stopped = json.loads((Path(overrides["out_dir"]) / "summary.json").read_text()).get("stopped")
    if stopped:
        raise FedSMSError(f"the job stopped early: {stopped}")
    if args.baselines:
        compare_with_local(overrides, args.baselines)
    return 0


def check_out_dir(out: Path, resume: bool) -> None:
    """A new job must not mix its results with an old one's; a resumed job needs one."""
    if resume and not (out / "checkpoints" / "soup.json").is_file():
        raise FedSMSError(f"--resume needs a round checkpoint in {out / 'checkpoints'}; pass the --out-dir of the interrupted job")
    if not resume and (out / "rounds.jsonl").exists():
        raise FedSMSError(f"{out / 'rounds.jsonl'} already exists; pass another --out-dir, remove it, or add --resume")


def compare_with_local(overrides: dict, methods: str) -> None:
    """Run the local baselines with the same config and print them beside the federated job."""
    from fedsms.config import RunConfig, split_config
    from fedsms.local import run_local
    from fedsms.plots import plot_results
    from fedsms.report import by_schedule, final_table, phase_table, read_rows

    out = Path(overrides["out_dir"])
    run, _ = split_config(overrides)
    local = RunConfig.from_mapping({"methods": methods, "out_dir": str(out / "local")}, base=run)
    print(f"\nlocal baselines ({methods}) with the same config:")
    rows = read_rows(out / "results.jsonl") + run_local(local)
    plot_results(rows, out / "comparison")
    for part in by_schedule(rows):
        print()
        print(phase_table(part))
    print()
    print(final_table(rows))
    print(f"\nfederated results: {out}; local baselines: {out / 'local'}; plots: {out / 'comparison'}")


def cmd_soup(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint, save_checkpoint
    from fedsms.masks import mask_digest
    from fedsms.soup import SoupError, average

    checkpoints = [load_checkpoint(p) for p in args.checkpoints]
    digests = [mask_digest(c.mask) for c in checkpoints]
    for path, digest in zip(args.checkpoints, digests):
        if digest != digests[0]:
            raise SoupError(
                f"{path} has mask {digest[:12]} but {args.checkpoints[0]} has {digests[0][:12]}; "
                "soup only candidates retrained under the same mask"
            )
    weights = [c.metadata.get("num_examples", 1) for c in checkpoints] if args.weighted else None
    soup = average([c.state for c in checkpoints], checkpoints[0].mask, weights)
    metadata = {k: v for k, v in checkpoints[0].metadata.items() if k in ("model", "dataset", "phase", "config")}
    metadata["soup_of"] = [str(p) for p in args.checkpoints]
    if args.recalibrate:
        soup = recalibrated_soup(soup, metadata, args.data_dir)
    path = save_checkpoint(args.output, soup, checkpoints[0].mask, metadata)
    print(f"soup of {len(checkpoints)} candidates (mask {digests[0][:12]}) written to {path}")
    return 0


def recalibrated_soup(soup: dict, metadata: dict, data_dir: str | None) -> dict:
    """Re-estimate the soup's norm statistics on the training data its metadata names."""
    from fedsms.candidates import cpu_state
    from fedsms.data import load_dataset
    from fedsms.models import build_for
    from fedsms.norms import recalibrate_norms

    if "model" not in metadata or "dataset" not in metadata:
        raise FedSMSError("--recalibrate needs checkpoints whose metadata names the model and dataset; drop --recalibrate")
    splits = load_dataset(metadata["dataset"], data_dir=data_dir)
    model = build_for(metadata["model"], splits)
    model.load_state_dict(soup)
    recalibrate_norms(model, splits.train)
    return cpu_state(model)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint
    from fedsms.masks import format_report, sparsity_report

    checkpoint = load_checkpoint(args.checkpoint)
    print(format_report(sparsity_report(checkpoint.mask)))
    print()
    print(json.dumps({k: v for k, v in checkpoint.metadata.items() if k != "config"}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedsms.config import FederationConfig, RunConfig

    parser = argparse.ArgumentParser(prog="fedsms", description="Sparse Model Soups, local or federated with Flower.")
    commands = parser.add_subparsers(dest="command", required=True)

    local = commands.add_parser("local", help="run dense → P × (prune → retrain m → merge) and the baselines on this machine",
                                description="Run the Sparse Model Soups pipeline and its baselines (IMP, IMP best-of-m, "
                                            "IMP-AVG, prediction ensemble) on one machine.")
    add_config_options(local, RunConfig())
    local.add_argument("--seeds", help="comma list of seeds to repeat the run with (tables show mean ± std)")
    local.set_defaults(func=cmd_local)

    sim = commands.add_parser("simulate", help="run the federated job with N virtual Flower clients on this machine",
                              description="Run Sparse Model Soups as a Flower simulation: a SparseSoupStrategy server "
                                          "and N virtual clients, each retraining its own candidate or data shard.")
    add_config_options(sim, RunConfig())
    add_config_options(sim, FederationConfig())
    sim.add_argument("--num-clients", type=int, default=4, help="virtual clients (default: 4)")
    sim.add_argument("--cpus-per-client", type=float, default=1.0, help="CPU cores Ray reserves per client (default: 1)")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share Ray reserves per client (default: 0)")
    sim.add_argument("--baselines", default="",
                     help="also run these local methods with the same config and print them alongside (e.g. imp,imp-best,sms)")
    sim.set_defaults(func=cmd_simulate)

    soup = commands.add_parser("soup", help="average candidate checkpoints that share a mask",
                               description="Average candidate checkpoints retrained anywhere under the same mask.")
    soup.add_argument("checkpoints", nargs="+", help="candidate checkpoints (X or X.safetensors)")
    soup.add_argument("-o", "--output", required=True, help="path of the soup checkpoint")
    soup.add_argument("--weighted", action="store_true", help="weight by each checkpoint's num_examples metadata")
    soup.add_argument("--recalibrate", action="store_true",
                      help="re-estimate norm statistics on the training data named in the metadata")
    soup.add_argument("--data-dir", help="data folder for --recalibrate with torchvision data sets")
    soup.set_defaults(func=cmd_soup)

    inspect = commands.add_parser("inspect", help="per-layer sparsity and metadata of a checkpoint",
                                  description="Print per-layer sparsity and the metadata of a checkpoint.")
    inspect.add_argument("checkpoint")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def run_command(prog: str, command, args: argparse.Namespace) -> int:
    """Run ``command(args)``: a user's mistake ends in one sentence and exit code 2, not a traceback."""
    try:
        return command(args)
    except FedSMSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; results and checkpoints written so far are kept", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("fedsms", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
