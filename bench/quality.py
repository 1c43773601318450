"""The paper table: dense, IMP, IMP with m × the retraining epochs, IMP best-of-m, SMS
(uniform and greedy soup) and the prediction ensemble of the SMS candidates at several
target sparsities over several seeds: mean ± std of test accuracy, OOD accuracy (mean over
corruptions × severities 1-5) and ECE, SMS minus each baseline (paired per seed), and the
soup diagnostics of every phase (gain over the best candidate, barriers, spread).

    python bench/quality.py                      # MNIST-1D (5,000), cnn1d, 90/95/98 %, 5 seeds, 2 processes
    python bench/quality.py --dataset cifar10 --model resnet20 --data-dir D --pretrain-epochs 160
    python bench/quality.py --merge A B --out C  # one table from runs over disjoint seeds

Every method runs through ``fedsms.local`` with the same P, m and retraining epochs per
candidate (``imp-long``: m × as many, in one model). Candidates differ by their seed (batch
order and augmentation draws) unless ``--recipe`` varies more. Per seed the dense model is
trained once and shared by every target sparsity. ``--jobs N`` runs the seeds in N
processes (``OUT/jobs/K``) and merges them. Writes ``OUT/quality.json`` (config, every row,
the final-phase table, the checks, the diagnostics table), per-sparsity ``results.jsonl``
and checkpoints, and PNG plots (accuracy vs sparsity, ID vs OOD, diagnostics per phase).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import metric_cells, seed_summary

from fedsms import FedSMSError
from fedsms.config import RunConfig
from fedsms.local import run_local
from fedsms.plots import plot_diagnostics, plot_results
from fedsms.report import methods_in

METHODS = "imp,imp-long,imp-best,sms,sms-greedy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d-5000")
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--data-dir", default="", help="data folder (CIFAR files; MNIST-1D's .npz cache)")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98", help="comma list of target sparsities")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=60)
    parser.add_argument("--retrain-epochs", type=int, default=20, help="20: see BENCHMARKS.md, Quality: regime map")
    parser.add_argument("--pretrain-lr", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.2, help="retraining learning rate (unless the recipe sets it)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--recipe",
        default="",
        help="how the m candidates differ besides their seed (batch order), e.g. 'weight_decay=1e-4,1e-3'",
    )
    parser.add_argument(
        "--soup-guard", default="greedy", choices=("greedy", "best", "off"), help="fedsms's soup-guard setting"
    )
    parser.add_argument("--soup-guard-tolerance", type=float, default=0.01)
    parser.add_argument("--methods", default=METHODS, help="local methods to run besides dense")
    parser.add_argument("--ood-examples", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small models on a shared machine)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="seeds run in this many processes side by side, then one merged table"
    )
    parser.add_argument("--out", default="results/quality")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN_OUT",
        help="train nothing: tabulate the rows of these finished (or partial) runs together",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "quality.json").exists():
        raise FedSMSError(f"{out / 'quality.json'} already exists; pass another --out or remove it")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    base = RunConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        phases=args.phases,
        candidates=args.candidates,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_lr=args.pretrain_lr,
        retrain_epochs=args.retrain_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        recipe=args.recipe,
        methods=args.methods,
        merge="uniform",
        soup_guard=args.soup_guard,
        soup_guard_tolerance=args.soup_guard_tolerance,
        ood_examples=args.ood_examples,
        device=args.device,
    )
    started = time.perf_counter()
    rows = []
    for seed in seeds:
        dense = ""  # the first sparsity trains the dense model; the others start from its checkpoint
        for target in sparsities:
            run_dir = out / f"s{round(100 * target)}"
            config = RunConfig.from_mapping(
                {"seed": seed, "target_sparsity": target, "out_dir": str(run_dir), "init_checkpoint": dense}, base=base
            )
            log(f"== seed {seed}, target sparsity {target:.0%} ==")
            rows += [{**row, "target_sparsity": target} for row in run_local(config, log=log)]
            dense = str(run_dir / "checkpoints" / f"seed{seed}-dense")
        # Written after every seed, so a long run that is stopped keeps the seeds it finished.
        table = final_rows(rows)
        result = {
            "config": vars(args),
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "table": table,
            "checks": checks(rows),
            "diagnostics": diagnostics_table(rows),
            "rows": rows,
        }
        (out / "partial.json").write_text(json.dumps(result, indent=2))
    (out / "partial.json").rename(out / "quality.json")
    result["plots"] = plots(rows, sparsities, out)
    return result


def plots(rows: list[dict], sparsities: list[float], out: Path) -> list[str]:
    """Accuracy vs sparsity and ID vs OOD over every method, and per target sparsity the
    diagnostics' interpolation lines (``diagnostics-sNN/diagnostics_<method>.png``)."""
    paths = plot_results(plot_rows(rows, sparsities), out, point_label="target sparsity #")
    for target in sparsities:
        mine = [r for r in rows if r["target_sparsity"] == target]
        paths += plot_diagnostics(mine, out / f"diagnostics-s{round(100 * target)}")
    return [str(p) for p in paths]


def run_parallel(args: argparse.Namespace, argv: list[str], log=print) -> dict:
    """The seeds split over ``--jobs`` child processes of this script (``OUT/jobs/K``), then
    merged into one table; a child that fails stops the run with its log's last lines."""
    out = Path(args.out)
    if (out / "quality.json").exists():
        raise FedSMSError(f"{out / 'quality.json'} already exists; pass another --out or remove it")
    seeds = args.seeds.split(",")
    groups = [seeds[k :: args.jobs] for k in range(min(args.jobs, len(seeds)))]
    children = []
    for k, group in enumerate(groups):
        folder = out / "jobs" / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        child_argv = [*argv, "--seeds", ",".join(group), "--out", str(folder), "--jobs", "1"]  # later flags win
        logfile = open(folder / "log.txt", "w")  # noqa: SIM115 - closed when the child ends
        children.append(
            (subprocess.Popen([sys.executable, __file__, *child_argv], stdout=logfile, stderr=logfile), logfile)
        )
        log(f"seeds {','.join(group)}: process {children[-1][0].pid}, log {folder / 'log.txt'}")
    failed = []
    for k, (child, logfile) in enumerate(children):
        if child.wait() != 0:
            failed.append(k)
        logfile.close()
    if failed:
        tails = "; ".join(f"job {k}: " + (out / "jobs" / str(k) / "log.txt").read_text()[-300:] for k in failed)
        raise FedSMSError(f"seed process(es) {failed} failed: {tails}")
    return merge(
        argparse.Namespace(**{**vars(args), "merge": [str(out / "jobs" / str(k)) for k in range(len(groups))]})
    )


def merge(args: argparse.Namespace) -> dict:
    """One table from runs with the same settings over different seeds (e.g. run side by side)."""
    out = Path(args.out)
    if (out / "quality.json").exists():
        raise FedSMSError(f"{out / 'quality.json'} already exists; pass another --out or remove it")
    results = []
    for folder in map(Path, args.merge):
        found = [folder / n for n in ("quality.json", "partial.json") if (folder / n).exists()]
        if not found:
            raise FedSMSError(f"{folder} holds no quality.json or partial.json; pass the --out folder of a quality run")
        results.append(json.loads(found[0].read_text()))
    settings = [
        {k: v for k, v in r["config"].items() if k not in ("seeds", "out", "merge", "data_dir", "jobs", "merged_from")}
        for r in results
    ]
    if any(s != settings[0] for s in settings):
        raise FedSMSError("the runs to merge differ in settings other than seeds; merge only runs of one command")
    rows = [row for r in results for row in r["rows"]]
    seeds = sorted({r["seed"] for r in rows})
    if len(rows) != len({(r["seed"], r["target_sparsity"], r["method"], r["phase"]) for r in rows}):
        raise FedSMSError("the runs to merge share seeds; merge runs over disjoint seeds")
    table = final_rows(rows)
    result = {
        "config": {
            **results[0]["config"],
            "seeds": ",".join(map(str, seeds)),
            "out": str(out),
            "merged_from": args.merge,
        },
        "seconds": sum(r["seconds"] for r in results),
        "torch": torch.__version__,
        "table": table,
        "checks": checks(rows),
        "diagnostics": diagnostics_table(rows),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    result["plots"] = plots(rows, sorted({r["target_sparsity"] for r in rows}), out)
    return result


def final_rows(rows: list[dict]) -> list[dict]:
    """One row per (target sparsity, method): its last phase (dense: phase 0), mean/std over seeds."""
    last = max(r["phase"] for r in rows)
    table = []
    for target in sorted({r["target_sparsity"] for r in rows}):
        mine = [r for r in rows if r["target_sparsity"] == target]
        for method in methods_in(mine):
            done = [r for r in mine if r["method"] == method and r["phase"] == (0 if method == "dense" else last)]
            table.append({"target_sparsity": target, "method": method, **seed_summary(done)})
    return table


BASELINES = ("imp", "imp-long", "imp-best")


def checks(rows: list[dict]) -> dict:
    """Per target sparsity: SMS (uniform, greedy) minus each baseline that ran, in points of
    test and OOD accuracy, as mean ± std over seeds of the per-seed differences (each seed's
    methods share its dense model and data split, so the pairs are what to compare)."""
    last = max(r["phase"] for r in rows)
    final = {(r["target_sparsity"], r["method"], r["seed"]): r for r in rows if r["phase"] == last}
    out = {}
    for target in sorted({r["target_sparsity"] for r in rows}):
        gaps = {}
        for sms in ("sms", "sms-greedy"):
            for base in BASELINES:
                seeds = [s for (t, m, s) in final if t == target and m == sms and (t, base, s) in final]
                if not seeds:
                    continue
                for metric, prefix in (("accuracy", ""), ("ood_accuracy", "ood-")):
                    if metric not in final[(target, sms, seeds[0])]:
                        continue
                    diffs = [100 * (final[(target, sms, s)][metric] - final[(target, base, s)][metric]) for s in seeds]
                    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                    gaps[f"{prefix}{sms}-minus-{base}"] = {
                        "mean": round(statistics.fmean(diffs), 3),
                        "std": round(std, 3),
                    }
        met = all(g["mean"] >= 0 for k, g in gaps.items() if not k.startswith("ood-"))
        out[f"{target:g}"] = {"gaps": gaps, "target_met": met}
    return out


DIAGNOSED = {
    "gain": lambda d: d["gain"],
    "best_candidate": lambda d: 100 * d["best_candidate"],
    "soup": lambda d: 100 * d["soup"]["test_accuracy"],
    "ensemble": lambda d: 100 * d["ensemble"]["accuracy"],
    "barrier": lambda d: d["lines"]["soup"]["barrier"],
    "candidate_barrier": lambda d: d["lines"]["candidates"]["barrier"],
    "spread": lambda d: d["spread"],
}


def diagnostics_table(rows: list[dict]) -> list[dict]:
    """Per (target sparsity, soup method, phase): the soup diagnostics, mean ± std over seeds
    (accuracies and the gain in points)."""
    diagnosed = [r for r in rows if "diagnostics" in r]
    table = []
    for key in sorted({(r["target_sparsity"], r["method"], r["phase"]) for r in diagnosed}):
        mine = [r["diagnostics"] for r in diagnosed if (r["target_sparsity"], r["method"], r["phase"]) == key]
        entry = {"target_sparsity": key[0], "method": key[1], "phase": key[2], "seeds": len(mine)}
        for name, read in DIAGNOSED.items():
            values = [read(d) for d in mine]
            entry[name] = round(statistics.fmean(values), 3)
            entry[f"{name}_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def format_diagnostics(table: list[dict]) -> str:
    if not table:
        return "no soup diagnostics (diagnostics off)"
    names = list(DIAGNOSED)
    header = f"{'target':>6}  {'method':>10}  {'phase':>5}  " + "  ".join(f"{n:>17}" for n in names)
    lines = ["Soup diagnostics per phase (test accuracy and gain in points; mean ± std over seeds):", header]
    for r in table:
        cells = "  ".join(f"{r[n]:>9.2f} ± {r[n + '_std']:<5.2f}" for n in names)
        lines.append(f"{r['target_sparsity']:>6.0%}  {r['method']:>10}  {r['phase']:>5}  {cells}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], sparsities: list[float]) -> list[dict]:
    """Final-phase rows keyed by target-sparsity index, so the plots draw one point per target."""
    last = max(r["phase"] for r in rows)
    picked = [r for r in rows if r["method"] == "dense" and r["target_sparsity"] == sparsities[0]]
    picked += [
        {**r, "phase": sparsities.index(r["target_sparsity"]) + 1}
        for r in rows
        if r["method"] != "dense" and r["phase"] == last
    ]
    return picked


def format_table(table: list[dict]) -> str:
    width = max(len(r["method"]) for r in table)
    header = f"{'target':>6}  {'method':>{width}}  {'sparsity':>8}  {'test acc %':>14}  {'OOD acc %':>14}  {'ECE %':>13}  seeds"
    lines = [header, "-" * len(header)]
    for r in table:
        cells = metric_cells(r)
        lines.append(
            f"{r['target_sparsity']:>6.0%}  {r['method']:>{width}}  {100 * r['sparsity']:7.2f}%  "
            f"{cells[0]:>14}  {cells[1]:>14}  {cells[2]:>13}  {r['seeds']}"
        )
    return "\n".join(lines)


def format_checks(result_checks: dict) -> str:
    lines = ["SMS minus baseline (points; mean ± std over seeds of the per-seed differences):"]
    for target, check in result_checks.items():
        lines.append(f"  {float(target):.0%}: {'SMS >= every baseline' if check['target_met'] else 'target missed'}")
        for key, gap in check["gaps"].items():
            lines.append(f"    {key:<28} {gap['mean']:+6.2f} ± {gap['std']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.merge:
            result = merge(args)
        else:
            result = run_parallel(args, sys.argv[1:] if argv is None else argv) if args.jobs > 1 else run(args)
    except FedSMSError as error:
        print(f"quality: error: {error}", file=sys.stderr)
        return 2
    print()
    config = result["config"]
    print(
        f"{config['dataset']} / {config['model']}, P={config['phases']}, m={config['candidates']}, "
        f"{config['retrain_epochs']} retraining epochs per candidate and phase, seeds {config['seeds']}, "
        f"{result['seconds']:.0f} s of training"
    )
    print(format_table(result["table"]))
    print()
    print(format_checks(result["checks"]))
    print()
    print(format_diagnostics(result["diagnostics"]))
    print(f"\nresults: {Path(args.out) / 'quality.json'}; plots: {', '.join(result['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
