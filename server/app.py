"""The fedsms ServerApp: builds the model and the strategy from the run config, runs every
phase, then exports the final soup, the per-phase results and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsms import FedSMSError
from fedsms.checkpoint import check_compatible, export_model, load_checkpoint
from fedsms.config import FederationConfig, RunConfig, split_config
from fedsms.data import load_dataset
from fedsms.models import build_for
from fedsms.plots import plot_results
from fedsms.report import final_table, phase_table

from fedsms_server.strategy import RoundFailed, SparseSoupStrategy



def build_strategy(run: RunConfig, fed: FederationConfig, log=print) -> SparseSoupStrategy:
    """The strategy, starting from the init checkpoint or a seeded fresh model that the
    dense pretraining rounds train; or, with ``resume``, from the last round checkpoint."""
    splits = load_dataset(run.dataset, data_dir=run.data_dir or None, heldout_fraction=run.heldout_fraction, seed=run.seed)
    torch.manual_seed(run.seed)
    model = build_for(run.model, splits)
    if run.init_checkpoint:
        checkpoint = load_checkpoint(run.init_checkpoint)
        check_compatible(checkpoint, model)
        model.load_state_dict(checkpoint.state)
    elif fed.pretrain_rounds == 0:
        raise FedSMSError("pretrain-rounds is 0 and no init-checkpoint was given; set one of them")
    strategy = SparseSoupStrategy(run, fed, model, server_data=splits if fed.server_data else None,
                                  out_dir=run.out_dir, log=log)
    if fed.resume:
        strategy.restore(load_checkpoint(Path(run.out_dir) / "checkpoints" / "soup"))
    return strategy


def phase_rows(strategy: SparseSoupStrategy) -> list[dict]:
    """The last round of every phase as a result row, in the local driver's format."""
    rows = []
    for log in strategy.rounds:
        if strategy.ends_phase(log.server_round):
            metrics = log.central_eval or log.federated_eval
            gmp = "-gmp" if strategy.fed.pruning_schedule == "gmp" else ""
            rows.append({"method": "fed-dense" if log.phase == 0 else f"fed-{strategy.fed.mode}{gmp}",
                         "seed": strategy.run.seed, "phase": log.phase, "sparsity": log.sparsity,
                         **{k: metrics[k] for k in ("accuracy", "loss", "ece", "ood_accuracy") if k in metrics}})
    return rows


def write_outputs(strategy: SparseSoupStrategy, stopped: str = "") -> Path:
    out = Path(strategy.run.out_dir)
    strategy.model.load_state_dict(strategy.soup)
    final = export_model(out / "final_model", strategy.model)
    rows = phase_rows(strategy)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if rows and all("accuracy" in r for r in rows):
        plot_results(rows, out)
        print(phase_table(rows))
        print(final_table(rows))
    (out / "summary.json").write_text(json.dumps({
        "config": {**strategy.run.to_dict(), **strategy.fed.__dict__},
        "phases": rows,
        "bytes_down": sum(r.bytes_down for r in strategy.rounds),
        "bytes_up": sum(r.bytes_up for r in strategy.rounds),
        "final_model": str(final),
        "stopped": stopped,  # why the job ended early; empty when every round ran
    }, indent=2))
    return out


def make_server_app(defaults: Mapping | None = None) -> ServerApp:
    """A fedsms ServerApp; ``defaults`` are run-config values the run's own config overrides."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run, fed = split_config({**defaults, **dict(context.run_config)})
        strategy = build_strategy(run, fed)
        stopped = ""
        try:
            strategy.start(
                grid=grid, initial_arrays=ArrayRecord(strategy.soup), num_rounds=strategy.rounds_left,
                timeout=fed.round_timeout, evaluate_fn=strategy.evaluate_round,
            )
        except RoundFailed as error:  # the completed rounds stay checkpointed; --resume continues
            stopped = str(error)
            print(f"fedsms: job stopped: {stopped}")
        out = write_outputs(strategy, stopped)
        print(f"fedsms: job {'stopped' if stopped else 'finished'}; results in {out.resolve()}")

    return app


app = make_server_app()
