"""Where the soup pays: a regime map of SMS against IMP, IMP m×, IMP best-of-m, the greedy
soup and the candidates' ensemble, across retraining budget, number of phases and
retraining learning rate, at several target sparsities, over several seeds.

    python bench/regimes.py --data-dir runs/data          # the map (defaults below), 2 processes
    python bench/regimes.py --tiny --out /tmp/regimes     # smoke size (figures mean nothing)
    python bench/regimes.py --table results/regimes       # train nothing: tabulate the finished cells

The cells, each run for every seed from that seed's one dense model:

- *budget*: every ``--sparsities`` × every ``--budgets`` (retraining epochs per candidate
  and phase), at the first ``--phase-counts`` and the first ``--lrs``;
- *phases*: the highest sparsity, every other ``--phase-counts``, at ``--phase-budget`` epochs;
- *lr*: the highest sparsity, every other ``--lrs`` (the default 0.05 is the pretraining peak,
  what the reference code's LLR retrains at; 0.2 the bench's usual), at ``--reference-budget``.

Every cell runs ``--methods`` (default IMP, IMP m× and SMS; the ensemble comes with SMS);
the cells at ``--reference-budget`` of the budget axis also run ``--extra-methods`` (IMP
best-of-m, the greedy soup), which cost as much as SMS each. The soup is the plain uniform
one (``soup-guard = off``): the map measures what averaging does, not the guard.

Each (seed, cell, method) is one task of ``fedsms.local`` in a pool of ``--jobs`` processes,
the most telling cells first; a finished task's rows are kept in ``OUT/cells/``, so a run
that is stopped and started again with the same ``--out`` trains only what is missing, and
``--table`` tabulates whatever has finished. Per cell the table prints each method's
final-phase test accuracy (mean ± std over seeds), SMS − IMP and SMS − IMP m× (mean ± std
of the paired per-seed differences: each seed's methods share its dense model and split),
and the last phase's soup diagnostics (gain over the best candidate, the candidates'
barrier); ``OUT/regimes.json`` holds every row, ``OUT/gain_vs_steps.png`` the gain against
retraining steps per candidate and phase (the budget axis).

Cost on the 2-core VM (cnn1d on MNIST-1D 5,000, one thread per process): about 0.45 s per
candidate epoch; the default map is about 5,500 candidate epochs per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from common import machine

from fedsms import FedSMSError
from fedsms.config import RunConfig
from fedsms.local import run_local

FINAL_METHODS = ("imp", "imp-long", "imp-best", "sms", "sms-greedy", "ensemble")
LABELS = {"imp-long": "IMP m×", "imp-best": "IMP best", "sms-greedy": "greedy", "ensemble": "ensemble"}


@dataclass(frozen=True)
class Cell:
    """One point of the map: where it sits and what runs there."""

    axis: str
    target: float
    budget: int
    phases: int
    lr: float
    methods: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"s{round(100 * self.target)}-e{self.budget}-p{self.phases}-lr{self.lr:g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--dataset", default="mnist1d-5000")
    p.add_argument("--model", default="cnn1d")
    p.add_argument("--data-dir", default="", help="data folder (MNIST-1D's .npz cache)")
    p.add_argument("--seeds", default="11,12,13", help="seeds the bench was not tuned on")
    p.add_argument("--sparsities", default="0.95,0.98")
    p.add_argument("--budgets", default="5,10,20,40", help="retraining epochs per candidate and phase")
    p.add_argument("--budgets-below-highest", default="5,10,20", help="the budgets at the lower sparsities")
    p.add_argument("--phase-counts", default="3,5,8", help="the first is the budget axis's P")
    p.add_argument("--phase-budget", type=int, default=5, help="epochs per phase on the phases axis")
    p.add_argument("--lrs", default="0.2,0.05", help="retraining peak lr; the first is the budget axis's")
    p.add_argument("--reference-budget", type=int, default=10, help="budget of the lr axis and the extra methods")
    p.add_argument("--methods", default="imp,imp-long,sms")
    p.add_argument("--extra-methods", default="imp-best,sms-greedy")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=60)
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ood-examples", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="tasks run in this many processes")
    p.add_argument("--out", default="results/regimes")
    p.add_argument("--table", metavar="OUT", help="train nothing: tabulate the finished cells of OUT")
    p.add_argument("--tiny", action="store_true", help="smoke size: one budget, two phase counts, 1-epoch phases")
    args = p.parse_args(argv)
    if args.tiny:
        args.sparsities, args.budgets, args.budgets_below_highest = "0.9", "1", "1"
        args.phase_counts, args.phase_budget, args.lrs, args.reference_budget = "2,3", 1, "0.2,0.05", 1
        args.candidates, args.pretrain_epochs, args.ood_examples = 2, 1, 50
    return args


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cells(args: argparse.Namespace) -> list[Cell]:
    """The map's cells, in the order they are run (see the module's docstring)."""
    targets = sorted(floats(args.sparsities), reverse=True)
    phase_counts, lrs = ints(args.phase_counts), floats(args.lrs)
    methods = tuple(args.methods.split(","))
    extra = tuple(m for m in args.extra_methods.split(",") if m)
    found = []
    for target in targets:
        for budget in ints(args.budgets if target == targets[0] else args.budgets_below_highest):
            more = extra if budget == args.reference_budget else ()
            found.append(Cell("budget", target, budget, phase_counts[0], lrs[0], methods + more))
    found += [Cell("lr", targets[0], args.reference_budget, phase_counts[0], lr, methods) for lr in lrs[1:]]
    found += [Cell("phases", targets[0], args.phase_budget, p, lrs[0], methods) for p in phase_counts[1:]]
    return found


def base_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        candidates=args.candidates,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_lr=args.pretrain_lr,
        batch_size=args.batch_size,
        merge="uniform",
        soup_guard="off",
        ood_examples=args.ood_examples,
        device=args.device,
    )


def dense_path(out: Path, seed: int) -> Path:
    return out / "dense" / f"seed{seed}" / "checkpoints" / f"seed{seed}-dense"


def task_file(out: Path, cell: Cell, seed: int, method: str) -> Path:
    return out / "cells" / cell.name / f"seed{seed}-{method}.json"


def train_dense(out: Path, config: RunConfig, seed: int, threads: int) -> dict:
    """Each seed's dense model, once for every cell. ``fedsms.local`` always runs a method
    after dense: one 1-epoch IMP phase, whose row is dropped."""
    torch.set_num_threads(threads)
    done = out / "dense" / f"seed{seed}.json"
    if done.exists():
        return json.loads(done.read_text())
    folder = out / "dense" / f"seed{seed}"
    settings = {"seed": seed, "methods": "imp", "phases": 1, "retrain_epochs": 1, "out_dir": str(folder)}
    [row] = [r for r in run_local(RunConfig.from_mapping(settings, base=config), log=lambda _: None) if r["phase"] == 0]
    done.write_text(json.dumps(row))
    return row


def train_task(out: Path, config: RunConfig, cell: Cell, seed: int, method: str, threads: int) -> str:
    """One method of one cell for one seed from the seed's dense model; its rows go to a file."""
    torch.set_num_threads(threads)
    done = task_file(out, cell, seed, method)
    if done.exists():
        return str(done)
    settings = {
        "seed": seed,
        "target_sparsity": cell.target,
        "phases": cell.phases,
        "retrain_epochs": cell.budget,
        "lr": cell.lr,
        "methods": method,
        "init_checkpoint": str(dense_path(out, seed)),
        "out_dir": str(done.parent / f"seed{seed}-{method}"),
    }
    started = time.perf_counter()
    rows = run_local(RunConfig.from_mapping(settings, base=config), log=lambda _: None)
    task = {"seconds": round(time.perf_counter() - started, 1), "rows": [r for r in rows if r["method"] != "dense"]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(task))
    return str(done)


def run(args: argparse.Namespace, log=print) -> float:
    """Train every missing task; returns the wall seconds."""
    out, config, seeds = Path(args.out), base_config(args), ints(args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(vars(args), indent=2))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        list(pool.map(train_dense, [out] * len(seeds), [config] * len(seeds), seeds, [args.threads] * len(seeds)))
        log(f"dense models ready ({time.perf_counter() - started:.0f} s)")
        tasks = [(cell, seed, m) for cell in cells(args) for seed in seeds for m in cell.methods if m != "ensemble"]
        missing = [t for t in tasks if not task_file(out, *t).exists()]
        futures = [pool.submit(train_task, out, config, *t, args.threads) for t in missing]
        for k, future in enumerate(futures, 1):
            log(f"[{k}/{len(futures)}] {future.result()} ({time.perf_counter() - started:.0f} s)")
    return time.perf_counter() - started


def load_tasks(out: Path) -> tuple[list[dict], float]:
    """Every finished task's rows (tagged with their cell) and the tasks' seconds in all."""
    rows, seconds = [], 0.0
    for path in sorted((out / "cells").glob("*/*.json")):
        task = json.loads(path.read_text())
        rows += [{**r, "cell": path.parent.name} for r in task["rows"]]
        seconds += task["seconds"]
    return rows, seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell_summary(cell: Cell, rows: list[dict], steps_per_epoch: float) -> dict | None:
    """Final-phase accuracy of each method, the paired gaps and the last phase's diagnostics."""
    mine = [r for r in rows if r["cell"] == cell.name and r["phase"] == cell.phases]
    final = {(r["method"], r["seed"]): r for r in mine}
    if not final:
        return None
    summary = {**asdict(cell), "name": cell.name, "steps": round(cell.budget * steps_per_epoch)}
    for method in FINAL_METHODS:
        scores = [100 * r["accuracy"] for (m, _), r in final.items() if m == method]
        if scores:
            summary[method] = (*mean_std(scores), len(scores))
    for base in ("imp", "imp-long"):
        paired = [s for (m, s) in final if m == "sms" and (base, s) in final]
        if paired:
            diffs = [100 * (final[("sms", s)]["accuracy"] - final[(base, s)]["accuracy"]) for s in paired]
            summary[f"sms-minus-{base}"] = (*mean_std(diffs), len(diffs))
    diagnosed = [r["diagnostics"] for (m, _), r in final.items() if m == "sms" and "diagnostics" in r]
    if diagnosed:
        summary["gain"] = mean_std([d["gain"] for d in diagnosed])
        summary["candidate_barrier"] = mean_std([d["lines"]["candidates"]["barrier"] for d in diagnosed])
    return summary


def table(args: argparse.Namespace) -> dict:
    """Tabulate (and plot) what has finished under ``args.table or args.out``."""
    out = Path(args.table or args.out)
    if not (out / "settings.json").exists():
        raise FedSMSError(f"{out} holds no regime map; pass the --out folder of a regimes.py run")
    settings = argparse.Namespace(**json.loads((out / "settings.json").read_text()))
    denses = [json.loads(p.read_text()) for p in sorted((out / "dense").glob("seed*.json"))]
    if not denses:
        raise FedSMSError(f"{out} holds no finished dense model; run the map first (without --table)")
    steps_per_epoch = statistics.fmean(d["steps"] / settings.pretrain_epochs for d in denses)
    rows, seconds = load_tasks(out)
    summaries = [s for s in (cell_summary(c, rows, steps_per_epoch) for c in cells(settings)) if s]
    result = {
        "settings": vars(settings),
        "machine": machine(),
        "dense_accuracy": mean_std([100 * d["accuracy"] for d in denses]),
        "cells": summaries,
        "task_seconds": round(seconds, 1),
        "rows": rows,
    }
    (out / "regimes.json").write_text(json.dumps(result, indent=2))
    result["plot"] = plot(summaries, out)
    return result


def format_table(result: dict) -> str:
    def cell(value) -> str:
        return f"{value[0]:6.2f} ± {value[1]:<5.2f}" if value else f"{'':>6}   {'':<5}"

    def gap(value) -> str:
        return f"{value[0]:+6.2f} ± {value[1]:<5.2f}" if value else f"{'':>6}   {'':<5}"

    names = [LABELS.get(m, m.upper()) for m in FINAL_METHODS]
    header = (
        f"{'axis':>6} {'target':>6} {'P':>2} {'epochs':>6} {'steps':>5} {'lr':>5} {'seeds':>5}  "
        + "  ".join(f"{n:>14}" for n in names)
        + f"  {'SMS-IMP':>14}  {'SMS-IMP m×':>14}  {'gain/best':>14}  {'cand. barrier':>14}"
    )
    lines = [header, "-" * len(header)]
    for s in result["cells"]:
        seeds = s.get("sms", s.get("imp", (0, 0, 0)))[2]
        lines.append(
            f"{s['axis']:>6} {s['target']:>6.0%} {s['phases']:>2} {s['budget']:>6} {s['steps']:>5} {s['lr']:>5g} "
            f"{seeds:>5}  "
            + "  ".join(cell(s.get(m)) for m in FINAL_METHODS)
            + f"  {gap(s.get('sms-minus-imp'))}  {gap(s.get('sms-minus-imp-long'))}"
            + f"  {gap(s.get('gain'))}  {cell(s.get('candidate_barrier'))}"
        )
    return "\n".join(lines)


def plot(summaries: list[dict], out: Path) -> str:
    """SMS − IMP and SMS − IMP m× against retraining steps per candidate and phase (budget axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    budget = [s for s in summaries if s["axis"] == "budget"]
    for target in sorted({s["target"] for s in budget}):
        line = [s for s in budget if s["target"] == target]
        for key, style in (("sms-minus-imp", "-o"), ("sms-minus-imp-long", "--s")):
            points = [s for s in line if key in s]
            if points:
                ax.errorbar(
                    [s["steps"] for s in points],
                    [s[key][0] for s in points],
                    yerr=[s[key][1] for s in points],
                    fmt=style,
                    capsize=3,
                    label=f"{target:.0%}: SMS − {'IMP m×' if key.endswith('long') else 'IMP'}",
                )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("retraining steps per candidate and phase")
    ax.set_ylabel("test accuracy gain (points, paired over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gain_vs_steps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wall = None if args.table else run(args)
        result = table(args)
    except FedSMSError as error:
        print(f"regimes: error: {error}", file=sys.stderr)
        return 2
    s = result["settings"]
    print(
        f"\n{s['dataset']} / {s['model']}, m = {s['candidates']}, seeds {s['seeds']}, dense "
        f"{result['dense_accuracy'][0]:.2f} ± {result['dense_accuracy'][1]:.2f} %; "
        f"{result['task_seconds']:.0f} s of tasks" + (f", {wall:.0f} s wall" if wall is not None else "")
    )
    print("final-phase test accuracy % (mean ± std over seeds); gaps: paired per-seed differences in points")
    print(format_table(result))
    print(f"\nresults: {Path(args.table or args.out) / 'regimes.json'}; plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
