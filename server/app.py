"""The fedsms ServerApp: builds the model and the strategy from the run config and runs the
job; the strategy writes the final soup, the per-phase results and the plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsms import FedSMSError
from fedsms.checkpoint import check_compatible, load_checkpoint
from fedsms.config import FederationConfig, RunConfig, split_config
from fedsms.data import load_dataset
from fedsms.models import build_for
from fedsms_server.strategy import JobStopped, SparseSoupStrategy


def build_strategy(run: RunConfig, fed: FederationConfig, log=print) -> SparseSoupStrategy:
    """The strategy, starting from the init checkpoint or a seeded fresh model that the
    dense pretraining rounds train; or, with ``resume``, from the last round checkpoint.

    The server loads the job's data set itself; it is handed to the strategy as server data
    (central evaluation, recalibration, greedy held-out split) when ``server-data`` is on.

    Parameters
    ----------
    run : RunConfig
        The soup's settings (data set, model, ``init-checkpoint``, seed, ``out-dir``...).
    fed : FederationConfig
        The federation's settings (``pretrain-rounds``, ``server-data``, ``resume``...).
    log : callable, optional
        Receives the strategy's lines (default: ``print``).

    Returns
    -------
    SparseSoupStrategy
        Ready for ``start``.

    Raises
    ------
    FedSMSError
        Neither ``init-checkpoint`` nor dense pretraining rounds are set, the data set
        cannot be loaded, or a checkpoint does not fit the model or the settings.
    """
    splits = load_dataset(
        run.dataset, data_dir=run.data_dir or None, heldout_fraction=run.heldout_fraction, seed=run.seed
    )
    torch.manual_seed(run.seed)
    model = build_for(run.model, splits)
    if run.init_checkpoint:
        checkpoint = load_checkpoint(run.init_checkpoint)
        check_compatible(checkpoint, model)
        model.load_state_dict(checkpoint.state)
    elif fed.pretrain_rounds == 0:
        raise FedSMSError("pretrain-rounds is 0 and no init-checkpoint was given; set one of them")
    strategy = SparseSoupStrategy(
        run, fed, model, server_data=splits if fed.server_data else None, out_dir=run.out_dir, log=log
    )
    if fed.resume:
        strategy.restore(load_checkpoint(Path(run.out_dir) / "checkpoints" / "soup"))
    return strategy


def make_server_app(defaults: Mapping | None = None) -> ServerApp:
    """A fedsms ServerApp; ``defaults`` are run-config values the run's own config overrides.

    Its main function builds the strategy (``build_strategy``) and runs every round; a job
    that stops early (``JobStopped``) is reported, not raised, its outputs already written.

    Parameters
    ----------
    defaults : mapping, optional
        Run-config values (run-config names) used where the run's config sets none.

    Returns
    -------
    flwr.serverapp.ServerApp
        The ServerApp, for ``flwr run`` or a SuperLink.
    """
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run, fed = split_config(
            {**defaults, **dict(context.run_config)}, strict=False
        )  # the app's own keys are its own
        strategy = build_strategy(run, fed)
        try:
            strategy.start(grid)
        except JobStopped as error:  # outputs are written; the completed rounds stay checkpointed
            print(f"fedsms: job stopped at the last completed round: {error}")
        # A finished job needs no line here: the strategy logs "job finished; results in ...".

    return app


app = make_server_app()


def __getattr__(name: str):
    # Removed in an earlier release; a user's app may still import it.
    if name == "write_outputs":
        raise AttributeError(
            "fedsms_server.app.write_outputs was removed: the strategy writes its outputs at the end of start(); "
            "call SparseSoupStrategy.write_outputs() to write them yourself"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
