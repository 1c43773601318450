"""The ``fedsms`` command: ``local``, ``simulate``, ``prune``, ``retrain``, ``soup``, ``inspect`` and ``export``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
from dataclasses import fields
from pathlib import Path

from fedsms import FedSMSError

# The run keys the decentralized steps offer as options (the rest comes from the checkpoint).
PRUNE_KEYS = (
    "dataset",
    "data_dir",
    "model",
    "target_sparsity",
    "phases",
    "gmp_updates",
    "gmp_initial_sparsity",
    "pruning",
    "keep_first_dense",
    "keep_last_dense",
    "retrain_epochs",
    "seed",
)
RETRAIN_KEYS = (
    "dataset",
    "data_dir",
    "model",
    "heldout_fraction",
    "candidates",
    "recipe",
    "retrain_epochs",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "label_smoothing",
    "lr_schedule",
    "warmup_fraction",
    "augment",
    "seed",
    "device",
)
SOUP_KEYS = ("merge", "recalibration_fraction", "heldout_fraction", "data_dir", "device")


def add_config_options(parser, defaults, keys=None, aliases=None, skip: tuple[str, ...] = ()) -> None:
    """One ``--key`` option per key declared on ``defaults``' class on ``parser`` (or an
    argument group); unset options keep the defaults.

    Help, metavar and default come from the declaration (:mod:`fedsms.schema`); values are
    parsed and checked when the config is built, so a bad one is refused naming its key.
    ``keys`` limits the options to those keys; ``skip`` leaves out keys the caller declares
    itself; ``aliases`` maps a key to a shorter flag offered before its own
    (``{"pruning_schedule": "--schedule"}``).
    """
    from fedsms.schema import declared

    for field, spec in declared(defaults):
        if (keys is not None and field.name not in keys) or field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        flags = [aliases[field.name], flag] if aliases and field.name in aliases else [flag]
        default = getattr(defaults, field.name)
        # A bare boolean flag (``--resume``) means true; ``--ood false`` still works.
        switch = {"nargs": "?", "const": "true"} if field.type == "bool" else {}
        choices = spec.choices and not spec.many
        metavar = "{" + ",".join(spec.choices) + "}" if choices else field.type.upper()
        rule = "" if choices else spec.rule()
        text = f"{spec.help}{'; ' + rule if rule else ''} (default: {default!r})"
        parser.add_argument(
            *flags, dest=field.name, default=None, metavar=metavar, **switch, help=text.replace("%", "%%")
        )


def config_overrides(args: argparse.Namespace, defaults) -> dict:
    """The keys of ``defaults``' class that were given on the command line, with their (text) values."""
    return {f.name: getattr(args, f.name) for f in fields(defaults) if getattr(args, f.name, None) is not None}


def cmd_local(args: argparse.Namespace) -> int:
    from fedsms.config import RunConfig
    from fedsms.local import run_local
    from fedsms.plots import write_plots
    from fedsms.report import by_schedule, final_table, phase_table, summary

    config = RunConfig.from_mapping(config_overrides(args, RunConfig()))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    out = Path(config.out_dir)
    if (out / "results.jsonl").exists():
        raise FedSMSError(f"{out / 'results.jsonl'} already exists; pass another --out-dir or remove it")
    rows = run_local(config, seeds)
    (out / "summary.json").write_text(
        json.dumps({"config": config.to_dict(), "seeds": seeds or [config.seed], "results": summary(rows)}, indent=2)
    )
    plots = write_plots(rows, out)
    for part in by_schedule(rows):
        print()
        print(phase_table(part))
    print()
    print(f"final phase of each method, target sparsity {config.target_sparsity:.0%}:")
    print(final_table(rows))
    print(f"\nresults: {out / 'results.jsonl'}, {out / 'summary.json'}; plots: {', '.join(str(p) for p in plots)}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedsms.config import FederationConfig, RunConfig, absolute_paths, split_config

    overrides = config_overrides(args, RunConfig()) | config_overrides(args, FederationConfig())
    overrides = absolute_paths(overrides, "runs/simulate")
    _, fed = split_config(overrides)
    check_out_dir(Path(overrides["out_dir"]), fed.resume)
    baselines = run_baselines(overrides, args.baselines) if args.baselines else None
    if baselines is not None:
        overrides = same_start(overrides)
    # Flower is imported only here: the library itself never needs it.
    from fedsms_flower.simulation import simulate

    simulate(overrides, args.num_clients, cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client)
    summary = Path(overrides["out_dir"]) / "summary.json"
    if not summary.is_file():
        raise FedSMSError(f"the job ended without writing {summary}; its log is printed above")
    stopped = json.loads(summary.read_text()).get("stopped")
    if stopped:
        raise FedSMSError(f"the job stopped early: {stopped}")
    if baselines is not None:
        print_comparison(Path(overrides["out_dir"]), baselines)
    return 0


def check_out_dir(out: Path, resume: bool) -> None:
    """A new job must not mix its results with an old one's; a resumed job needs one."""
    if resume and not (out / "checkpoints" / "soup.json").is_file():
        raise FedSMSError(
            f"--resume needs a round checkpoint in {out / 'checkpoints'}; pass the --out-dir of the interrupted job"
        )
    if not resume and ((out / "rounds.jsonl").exists() or (out / "rounds.jsonl").is_symlink()):  # dangling too
        raise FedSMSError(f"{out / 'rounds.jsonl'} already exists; pass another --out-dir, remove it, or add --resume")


def run_baselines(overrides: dict, methods: str) -> list[dict]:
    """Run the local ``methods`` with the federated job's config, before it, into ``OUT/local``.

    Their dense model becomes the federated job's start (``same_start``), so every method of
    the comparison prunes the same model. Returns the rows of the dense model and of the
    methods asked for (not the ensemble ``sms`` also reports).
    """
    from fedsms.config import RunConfig, split_config
    from fedsms.local import run_local
    from fedsms.plots import write_plots

    if "pretrain_rounds" in overrides:
        raise FedSMSError(
            "--baselines starts the federated job from the baselines' dense model, so it runs no dense "
            "rounds; drop --pretrain-rounds or --baselines"
        )
    run, _ = split_config(overrides)
    local = RunConfig.from_mapping({"methods": methods, "out_dir": str(Path(run.out_dir) / "local")}, base=run)
    print(f"local baselines ({methods}) first; the federated job then starts from their dense model")
    rows = run_local(local)
    write_plots(rows, local.out_dir)
    return [r for r in rows if r["method"] in {"dense", *local.method_list()}]


def same_start(overrides: dict) -> dict:
    """``overrides`` for a federated job that starts from the local baselines' dense model."""
    from fedsms.config import split_config
    from fedsms.local import checkpoint_path

    run, _ = split_config(overrides)
    dense = checkpoint_path(Path(run.out_dir) / "local", run.seed, "dense")
    return {**overrides, "init_checkpoint": str(dense), "pretrain_rounds": 0}


def print_comparison(out: Path, baselines: list[dict]) -> None:
    """Print the federated job beside the local baselines, plot them together and say how to read it."""
    from fedsms.plots import plot_results
    from fedsms.report import by_schedule, comparison_note, final_table, phase_table, read_rows

    rows = baselines + read_rows(out / "results.jsonl")
    plots = plot_results(rows, out / "comparison")
    for part in by_schedule(rows):
        print()
        print(phase_table(part))
    print()
    print(final_table(rows))
    print()
    print(textwrap.fill(comparison_note(rows), 100))
    print(f"\nfederated results: {out}; local baselines: {out / 'local'}; plots: {', '.join(map(str, plots))}")


def cmd_prune(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint
    from fedsms.config import FederationConfig, RunConfig
    from fedsms.decentral import prune_checkpoint

    schedule = config_overrides(args, FederationConfig()).get("pruning_schedule")
    if schedule is not None:
        schedule = FederationConfig.from_mapping({"pruning_schedule": schedule}).pruning_schedule
    path = prune_checkpoint(
        args.checkpoint, args.phase, args.output, schedule=schedule, overrides=config_overrides(args, RunConfig())
    )
    meta = load_checkpoint(path).metadata
    print(
        f"phase {args.phase} ({meta['schedule']}): pruned to {meta['sparsity']:.4%} sparsity "
        f"(mask {meta['mask_digest'][:12]}), written to {path}"
    )
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint
    from fedsms.config import RunConfig
    from fedsms.decentral import retrain_checkpoint

    path = retrain_checkpoint(
        args.checkpoint, args.candidate, args.output, overrides=config_overrides(args, RunConfig())
    )
    meta = load_checkpoint(path).metadata
    print(
        f"candidate {args.candidate} of phase {meta['phase']} (mask {meta['mask_digest'][:12]}) retrained on "
        f"{meta['num_examples']} examples, loss {meta['metrics']['train_loss']:.4f}, written to {path}"
    )
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint
    from fedsms.config import RunConfig
    from fedsms.decentral import soup_checkpoints
    from fedsms.masks import mask_digest

    overrides = config_overrides(args, RunConfig())
    rule = overrides.pop("merge", None)
    if rule is not None:
        rule = RunConfig.from_mapping({"merge": rule}).merge
    if args.weighted and rule not in (None, "weighted"):
        raise FedSMSError(f"--weighted and --merge {rule} contradict each other; pass one of them")
    rule = "weighted" if args.weighted else (rule or "uniform")
    path, chosen = soup_checkpoints(
        args.checkpoints, args.output, rule=rule, recalibrate=args.recalibrate, overrides=overrides
    )
    digest = mask_digest(load_checkpoint(path).mask)
    kept = f" ({rule}: kept {chosen})" if rule == "greedy" else ""
    print(f"soup of {len(args.checkpoints)} candidates{kept} (mask {digest[:12]}) written to {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedsms.inspection import describe

    print(describe(args.checkpoint))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedsms.checkpoint import load_checkpoint
    from fedsms.compact import compact_bound, export_compact, load_compact

    checkpoint = load_checkpoint(args.checkpoint, dense_ok=True)
    plan = measure_plan(checkpoint, args.plan_batch, args.device) if args.plan_batch else None
    path = export_compact(checkpoint, args.output, value_dtype=args.value_dtype, plan=plan)
    written = load_compact(path)
    size, dense = path.stat().st_size, sum(t.numel() * t.element_size() for t in checkpoint.state.values())
    print(
        f"compact model ({written.metadata['compact']['value_dtype']} values, sparsity {written.metadata['sparsity']:.2%}) "
        f"written to {path}: {size:,} bytes, {size / dense:.3f} x the dense {dense:,}; "
        f"raw content {compact_bound(written.state, written.mask, args.value_dtype):,}"
    )
    return 0


def measure_plan(checkpoint, batch_size: int, device: str) -> dict:
    """The sparse-inference plan of a checkpoint's model, measured here at ``batch_size``."""
    import torch

    from fedsms.checkpoint import check_compatible
    from fedsms.decentral import job_config
    from fedsms.local import job_splits
    from fedsms.models import build_for
    from fedsms.sparse_inference import format_plan, sparsify

    config = job_config(checkpoint.metadata, {})
    splits = job_splits(config)
    model = build_for(config.model, splits)
    check_compatible(checkpoint, model)
    model.load_state_dict(checkpoint.state, strict=True)
    model.to(device)
    plan = sparsify(model, torch.rand(batch_size, *splits.input_shape, device=device))
    print(format_plan(plan))
    return plan.to_dict()


def build_parser() -> argparse.ArgumentParser:
    from fedsms.config import FederationConfig, RunConfig

    parser = argparse.ArgumentParser(prog="fedsms", description="Sparse Model Soups, local or federated with Flower.")
    commands = parser.add_subparsers(dest="command", required=True)

    local = commands.add_parser(
        "local",
        help="run dense → P × (prune → retrain m → merge) and the baselines on this machine",
        description="Run the Sparse Model Soups pipeline and its baselines (IMP, IMP best-of-m, "
        "IMP-AVG, prediction ensemble) on one machine.",
    )
    add_config_options(local, RunConfig())
    local.add_argument("--seeds", help="comma list of seeds to repeat the run with (tables show mean ± std)")
    local.set_defaults(func=cmd_local)

    sim = commands.add_parser(
        "simulate",
        help="run the federated job with N virtual Flower clients on this machine",
        description="Run Sparse Model Soups as a Flower simulation: a SparseSoupStrategy server "
        "and N virtual clients, each retraining its own candidate or data shard.",
    )
    add_config_options(sim, RunConfig())
    add_config_options(sim, FederationConfig())
    sim.add_argument("--num-clients", type=int, default=4, help="virtual clients (default: 4)")
    sim.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="CPU cores Ray reserves per client (default: 1)"
    )
    sim.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPU share Ray reserves per client (default: 0)"
    )
    sim.add_argument(
        "--baselines",
        default="",
        help="also run these local methods with the same config and print them alongside (e.g. imp,imp-best,sms)",
    )
    sim.set_defaults(func=cmd_simulate)

    prune = commands.add_parser(
        "prune",
        help="prune a dense model or a phase's soup to the next phase's mask",
        description="Prune a checkpoint for phase p: exactly the mask fedsms local computes "
        "for that phase (never regrowing the input's mask). The job's config is "
        "read from the checkpoint; options override it.",
    )
    prune.add_argument("checkpoint", help="dense model (with or without a mask file) or the soup of phase p-1")
    prune.add_argument("--phase", type=int, required=True, help="the prune step p, 1-based (IMP phase or GMP update)")
    prune.add_argument("-o", "--output", required=True, help="path of the pruned checkpoint")
    add_config_options(
        prune, FederationConfig(), keys=("pruning_schedule",), aliases={"pruning_schedule": "--schedule"}
    )
    add_config_options(prune, RunConfig(), keys=PRUNE_KEYS)
    prune.set_defaults(func=cmd_prune)

    retrain = commands.add_parser(
        "retrain",
        help="retrain one candidate of a pruned checkpoint under its mask",
        description="Retrain candidate i of a pruned checkpoint's phase under its mask, as "
        "fedsms local retrains it. The job's config is read from the "
        "checkpoint; options override it.",
    )
    retrain.add_argument("checkpoint", help="a checkpoint written by fedsms prune")
    retrain.add_argument("--candidate", type=int, required=True, help="candidate index i, 0-based (< --candidates)")
    retrain.add_argument("-o", "--output", required=True, help="path of the candidate checkpoint")
    add_config_options(retrain, RunConfig(), keys=RETRAIN_KEYS)
    retrain.set_defaults(func=cmd_retrain)

    soup = commands.add_parser(
        "soup",
        help="average candidate checkpoints that share a mask",
        description="Average candidate checkpoints retrained anywhere under the same mask and "
        "in the same phase; this closes the phase.",
    )
    soup.add_argument("checkpoints", nargs="+", help="candidate checkpoints (X or X.safetensors)")
    soup.add_argument("-o", "--output", required=True, help="path of the soup checkpoint")
    soup.add_argument(
        "--weighted",
        action="store_true",
        help="weight by each checkpoint's num_examples metadata (same as --merge weighted)",
    )
    soup.add_argument(
        "--recalibrate",
        action="store_true",
        help="re-estimate norm statistics on the training data named in the metadata",
    )
    add_config_options(soup, RunConfig(), keys=SOUP_KEYS)
    soup.set_defaults(func=cmd_soup)

    inspect = commands.add_parser(
        "inspect",
        help="per-layer sparsity and metadata of a checkpoint or model; tables of a results file; a folder's contents",
        description="Print per-layer sparsity and the metadata of a checkpoint or of a model without a mask "
        "(final_model: the mask is read off its zeros), the tables of a results.jsonl, the rounds of a "
        "rounds.jsonl, or the checkpoints, models and results files in a folder.",
    )
    inspect.add_argument("checkpoint", help="a checkpoint, model, results.jsonl, rounds.jsonl or folder")
    inspect.set_defaults(func=cmd_inspect)

    export = commands.add_parser(
        "export",
        help="write the compact model file: values under the mask + mask bits",
        description="Write a checkpoint, final_model or plain .safetensors state dict as a compact "
        "file (values under the mask, packed mask bits, dense extras, metadata); "
        "fedsms.compact.load_compact_into restores it bit for bit.",
    )
    export.add_argument("checkpoint", help="a checkpoint X, final_model.safetensors or a .safetensors state dict")
    export.add_argument("-o", "--output", required=True, help="the compact file (e.g. model.sparse.safetensors)")
    export.add_argument(
        "--value-dtype",
        choices=("fp32", "fp16", "bf16"),
        help="store the values in this dtype (default: exact, in the tensors' own dtype)",
    )
    export.add_argument(
        "--plan-batch",
        type=int,
        metavar="B",
        help="also measure which layers run faster sparse at batch size B here and record the plan "
        "(needs the checkpoint's model and data set)",
    )
    export.add_argument("--device", default="cpu", help="device the plan is measured on (default: cpu)")
    export.set_defaults(func=cmd_export)
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
    except OSError as error:  # a path the user gave: too long, unreadable, on a full disk
        name = str(error.filename or "")
        name = name if len(name) <= 100 else f"{name[:60]}…{name[-30:]} ({len(name)} characters)"
        print(f"{prog}: error: {error.strerror or error}: {name}; check the path", file=sys.stderr)
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
