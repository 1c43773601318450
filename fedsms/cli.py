"""The ``fedsms`` command: ``local``, ``simulate``, ``soup`` and ``inspect``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from fedsms import FedSMSError

def add_config_options(parser: argparse.ArgumentParser, defaults) -> None:
    """One ``--key`` option per key declared on ``defaults``' class; unset options keep the defaults.

    Help, metavar and default come from the declaration (:mod:`fedsms.schema`); values are
    parsed and checked when the config is built, so a bad one is refused naming its key.
    """
    from fedsms.schema import declared

    for field, spec in declared(defaults):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        # A bare boolean flag (``--resume``) means true; ``--ood false`` still works.
        switch = {"nargs": "?", "const": "true"} if field.type == "bool" else {}
        choices = spec.choices and not spec.many
        metavar = "{" + ",".join(spec.choices) + "}" if choices else field.type.upper()
        rule = "" if choices else spec.rule()
        text = f"{spec.help}{'; ' + rule if rule else ''} (default: {default!r})"
        parser.add_argument(flag, dest=field.name, default=None, metavar=metavar, **switch,
                            help=text.replace("%", "%%"))


def config_overrides(args: argparse.Namespace, defaults) -> dict:
    """The keys of ``defaults``' class that were given on the command line, with their (text) values."""
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
    # The ServerApp runs in the SuperLink's own folder: paths are made absolute here.
    overrides["out_dir"] = str(Path(overrides.get("out_dir", "runs/simulate")).resolve())
    if overrides.get("data_dir"):
        overrides["data_dir"] = str(Path(overrides["data_dir"]).resolve())
    _, fed = split_config(overrides)
    check_out_dir(Path(overrides["out_dir"]), fed.resume)
    # Flower is imported only here: the library itself never needs it.
    from fedsms_flower.simulation import simulate

    simulate(overrides, args.num_clients, cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client)
    summary = Path(overrides["out_dir"]) / "summary.json"
    if not summary.is_file():
        raise FedSMSError(f"the job ended without writing {summary}; its log is printed above")
    stopped = json.loads(summary.read_text()).get("stopped")
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
    from fedsms.engine import SoupEngine, values_under_mask
    from fedsms.masks import mask_digest
    from fedsms.soup import SoupError, check_shares_mask

    checkpoints = [load_checkpoint(p) for p in args.checkpoints]
    digests = [mask_digest(c.mask) for c in checkpoints]
    for path, digest in zip(args.checkpoints, digests):
        if digest != digests[0]:
            raise SoupError(
                f"{path} has mask {digest[:12]} but {args.checkpoints[0]} has {digests[0][:12]}; "
                "soup only candidates retrained under the same mask"
            )
    metadata = {k: v for k, v in checkpoints[0].metadata.items() if k in ("model", "dataset", "phase", "config")}
    metadata["soup_of"] = [str(p) for p in args.checkpoints]
    hooks = soup_hooks(metadata, args.data_dir) if args.recalibrate else None
    engine = SoupEngine(checkpoints[0].state, checkpoints[0].mask, hooks=hooks)
    merge = engine.merge("weighted" if args.weighted else "uniform")
    for path, checkpoint in zip(args.checkpoints, checkpoints):
        check_shares_mask(checkpoint.state, engine.mask, path)
        examples = checkpoint.metadata.get("num_examples", 1)
        if args.weighted and not (isinstance(examples, int) and examples > 0):
            raise SoupError(f"{path} has num_examples {examples!r} in its metadata; drop --weighted or fix the metadata")
        merge.add(values_under_mask(checkpoint.state, engine.mask), examples)
    engine.end_round(merge)
    phase = metadata.get("phase")
    engine.end_phase(phase if isinstance(phase, int) else 0, merge)  # the phase seeds the recalibration subset
    path = save_checkpoint(args.output, engine.state, engine.mask, metadata)
    print(f"soup of {len(checkpoints)} candidates (mask {digests[0][:12]}) written to {path}")
    return 0


def soup_hooks(metadata: dict, data_dir: str | None):
    """Recalibration on the training data the checkpoints' metadata names."""
    from fedsms.data import load_dataset
    from fedsms.engine import data_hooks
    from fedsms.models import build_for

    if "model" not in metadata or "dataset" not in metadata:
        raise FedSMSError("--recalibrate needs checkpoints whose metadata names the model and dataset; drop --recalibrate")
    splits = load_dataset(metadata["dataset"], data_dir=data_dir)
    return data_hooks(build_for(metadata["model"], splits), splits, fraction=0.2, seed=0)


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
    """Run ``command(args)``: a user's mistake ends in one sentence and exit code 2, not a traceback.
    SIGTERM ends it as SIGINT does, so every child process is stopped on the way out."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return command(args)
    except FedSMSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; results and checkpoints written so far are kept", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("fedsms", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
