"""The single-machine driver: dense → steps of (prune → retrain candidates → merge → evaluate).

Every method drives the same ``SoupEngine`` through the same loop and differs only in its
prune schedule and in how a step turns its retrained candidates into the next state:

- ``imp``: one candidate per phase (candidate 0 of the recipe).
- ``imp-long``: one candidate per phase retrained m × the epochs: the compute of m
  candidates in one model (the comparison the SMS paper makes).
- ``imp-best``: m candidates, keep the best on the held-out split, no averaging.
- ``imp-avg``: one-phase soup: IMP for phases 1..P-1, m candidates averaged in phase P only.
- ``sms``: m candidates averaged under the mask in every phase (the merge rule decides
  uniform, weighted or greedy), and the soup starts the next phase. The prediction
  ensemble of the same candidates is reported as ``ensemble`` (an upper reference).
- ``sms-greedy``: ``sms`` with the greedy soup whatever the merge rule, so one run can
  report both soups side by side.
- ``gmp`` and ``gmp-soup``: ``imp`` and ``sms`` on the gradual (cubic) schedule of
  ``fedsms.schedule``, within the same epoch budget.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedsms import FedSMSError
from fedsms.candidates import CandidateTrainer
from fedsms.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedsms.config import RunConfig
from fedsms.data import DatasetSplits, load_dataset
from fedsms.diagnostics import describe, soup_diagnostics
from fedsms.engine import PhaseHooks, SoupEngine, SoupGuard, State, cpu_state, data_hooks, values_under_mask
from fedsms.evaluate import ensemble_metrics, evaluate, evaluate_ood
from fedsms.masks import Mask, dense_mask, mask_digest, prunable_names, sparsity
from fedsms.safefile import append_line
from fedsms.schedule import PruneStep, prune_steps, step_candidate
from fedsms.task import CLASSIFICATION
from fedsms.training import resolve_device

Log = Callable[[str], None]


@dataclass(frozen=True)
class Method:
    """How a local method runs the loop.

    Parameters
    ----------
    schedule : str
        ``imp`` (prune at each phase) or ``gmp`` (cubic schedule of mask updates).
    candidates : str
        ``one`` (candidate 0 of the recipe), ``all`` (m candidates) or ``last`` (m in the
        last step only, one before: IMP-AVG).
    rule : str or None
        Merge rule of a step with m candidates; None takes the config's ``merge``.
    ensemble : bool
        Also report the prediction ensemble of the step's candidates.
    long : bool
        Retrain the one candidate m × the step's epochs (SMS's compute in one model).
    """

    schedule: str
    candidates: str
    rule: str | None = None
    ensemble: bool = False
    long: bool = False


METHOD_SPECS = {
    "imp": Method("imp", "one"),
    "imp-long": Method("imp", "one", long=True),
    "imp-best": Method("imp", "all", "best"),
    "imp-avg": Method("imp", "last"),
    "sms": Method("imp", "all", ensemble=True),
    "sms-greedy": Method("imp", "all", "greedy"),
    "gmp": Method("gmp", "one"),
    "gmp-soup": Method("gmp", "all"),
}


def job_splits(config: RunConfig) -> DatasetSplits:
    """The data of a job: its train / held-out (seeded by the job's seed) / test splits.

    Parameters
    ----------
    config : RunConfig
        The job's settings: data set, ``data-dir``, ``heldout-fraction`` and seed.

    Returns
    -------
    DatasetSplits
        What ``fedsms.data.load_dataset`` returns for them.
    """
    return load_dataset(
        config.dataset, data_dir=config.data_dir or None, heldout_fraction=config.heldout_fraction, seed=config.seed
    )


def job_hooks(
    config: RunConfig, model: torch.nn.Module, splits: DatasetSplits, device: torch.device | str
) -> PhaseHooks:
    """Recalibration and held-out scores of a job, as every phase of it ends them.

    Parameters
    ----------
    config : RunConfig
        The job's settings (``recalibration-fraction`` and seed).
    model : torch.nn.Module
        A model of the job's architecture, used to evaluate states.
    splits : DatasetSplits
        The job's data: training data recalibrates norms, the held-out split scores.
    device : torch.device or str
        Where the hooks run the model.

    Returns
    -------
    PhaseHooks
        The hooks a ``SoupEngine`` calls at the end of every phase.
    """
    return data_hooks(model, splits, fraction=config.recalibration_fraction, seed=config.seed, device=device)


class LocalRun:
    """One seed of the whole pipeline for every configured method.

    Parameters
    ----------
    config : RunConfig
        The run's settings (data, model, schedule, recipe, methods, output folder).
    log : callable
        Receives progress lines (default: ``print``).
    """

    def __init__(self, config: RunConfig, log: Log = print) -> None:
        self.config, self.log = config, log
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.splits = job_splits(config)
        self.trainer = CandidateTrainer(
            config.model,
            self.splits,
            self.device,
            config.workers,
            log,
            precision=config.precision,
            channels_last=config.channels_last,
        )
        self.model = self.trainer.model
        self.names = prunable_names(self.model, **config.prune_options())
        self.task = CLASSIFICATION  # every built-in data set is classified
        self.hooks = job_hooks(config, self.model, self.splits, self.device)
        self.candidate_configs = config.candidate_configs()
        self.ood_data = self.splits.test.head(config.ood_examples)

    # ---- evaluation --------------------------------------------------------------------

    def evaluate_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Test and held-out scores of ``state`` (and OOD ones when ``ood`` is on).

        Parameters
        ----------
        state : mapping of str to Tensor
            A full state dict of the run's model.

        Returns
        -------
        dict of str to float
            The task's test metrics (``accuracy``, ``loss``, ``ece``), its held-out score
            (``heldout_accuracy``), and with ``ood`` also ``ood_accuracy`` and ``ood_ece``.
        """
        self.model.load_state_dict(state)
        score = self.task.score
        row = {
            **evaluate(self.model, self.splits.test, device=self.device, task=self.task),
            f"heldout_{score}": evaluate(self.model, self.splits.heldout, device=self.device, task=self.task)[score],
        }
        if self.config.ood:
            ood = evaluate_ood(self.model, self.ood_data, device=self.device, seed=self.config.seed)
            row.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return row

    # ---- the pipeline ------------------------------------------------------------------

    def dense_state(self) -> tuple[State, dict]:
        """The dense state every method starts from: the ``init-checkpoint``, or dense
        pretraining with the pretraining candidate.

        Returns
        -------
        tuple of (State, dict)
            The state and its metrics (for a checkpoint: ``{"source": path}``).

        Raises
        ------
        FedSMSError
            ``pretrain-epochs`` is 0 and no ``init-checkpoint`` is given, or the checkpoint
            does not fit the model.
        """
        config = self.config
        if config.init_checkpoint:
            checkpoint = load_checkpoint(config.init_checkpoint)
            check_compatible(checkpoint, self.model)
            self.log(f"[dense] starting from checkpoint {config.init_checkpoint}")
            return checkpoint.state, {"source": config.init_checkpoint}
        if config.pretrain_epochs == 0:
            raise FedSMSError("pretrain-epochs is 0 and no init-checkpoint was given; set one of them")
        [(state, metrics)] = self.trainer.train(
            cpu_state(self.model), dense_mask(self.model, self.names), [config.pretrain_candidate()], "[dense]"
        )
        return state, metrics

    def run(self) -> list[dict]:
        """Dense first, then every configured method from the same dense state; returns the rows."""
        started = time.perf_counter()
        dense, dense_metrics = self.dense_state()
        mask = dense_mask(self.model, self.names)
        rows = [self._row("dense", 0, mask, self.evaluate_state(dense), dense_metrics, started)]
        self.log(_describe(rows[-1]))
        self.save("dense", 0, dense, mask, rows[-1])
        for method in self.config.method_list():
            rows += self.run_method(method, dense, mask)
        return rows

    def run_method(self, method: str, dense: State, mask: Mask) -> list[dict]:
        """Every prune step of ``method`` from the dense state.

        Each step prunes, retrains the method's candidates under the mask, merges them and
        ends the phase (greedy choice, recalibration); ``sms`` also records the candidates'
        ensemble. One row per step is written, logged and checkpointed. With ``diagnostics``
        on, a step that averages several candidates also gets a ``diagnostics`` dict in its
        row (see ``fedsms.diagnostics``) and one more log line.

        Parameters
        ----------
        method : str
            A key of ``METHOD_SPECS`` (e.g. ``imp``, ``sms``, ``gmp-soup``).
        dense : State
            The dense state to start from.
        mask : Mask
            The dense mask to start from.

        Returns
        -------
        list of dict
            The method's result rows, in step order.
        """
        spec, config, rows = METHOD_SPECS[method], self.config, []
        engine = SoupEngine(
            dense,
            mask,
            pruning=config.pruning,
            seed=config.seed,
            hooks=self.hooks,
            guard=SoupGuard.of(config.soup_guard, config.soup_guard_tolerance),
        )
        steps = prune_steps(config, spec.schedule)
        for step in steps:
            started = time.perf_counter()
            engine.prune(step)
            many = spec.candidates == "all" or (spec.candidates == "last" and step.index == len(steps))
            configs = [
                step_candidate(c, step) for c in (self.candidate_configs if many else self.candidate_configs[:1])
            ]
            if spec.long:
                configs = [replace(c, epochs=c.epochs * config.candidates) for c in configs]
            unit = "phase" if spec.schedule == "imp" else "update"
            label = f"[{method}] {unit} {step.index}/{len(steps)} sparsity {engine.sparsity:.2%}"
            start_state = engine.state  # the engine replaces its state, never mutates it
            trained = self.trainer.train(engine.state, engine.mask, configs, label)
            if spec.ensemble:
                rows.append(self._ensemble_row(step, engine.mask, [s for s, _ in trained], started))
            merge = engine.merge(
                (spec.rule or config.merge) if many else "uniform",
                **config.merge_options(),
            )
            for state, metrics in trained:
                merge.add(values_under_mask(state, engine.mask), metrics["num_examples"])
            engine.end_round(merge)
            chosen = engine.end_phase(step.index, merge)
            extra: dict = {
                "candidates": len(trained),
                "epochs": configs[0].epochs,
                "train_loss": sum(m["train_loss"] for _, m in trained) / len(trained),
            }
            if len(trained) > 1:
                extra["chosen"] = chosen
            if engine.fallback is not None:
                extra["guard"] = engine.fallback
            if config.diagnostics and len(trained) > 1 and (spec.rule or config.merge) != "best":
                diagnostics = self.diagnose(step, start_state, [s for s, _ in trained], engine.state)
                extra["diagnostics"] = diagnostics
                self.log(describe(diagnostics, f"[{method}] {unit} {step.index}"))
            rows.append(self.record(method, step.index, engine.state, engine.mask, extra, started))
        return rows

    def diagnose(self, step: PruneStep, start: State, candidates: list[State], soup: State) -> dict:
        """The soup diagnostics of one step (``fedsms.diagnostics.soup_diagnostics``).

        Interior points of the interpolation lines are recalibrated as the step's soup is
        (same training subset); the held-out split chooses the best candidate.

        Parameters
        ----------
        step : PruneStep
            The step (its index seeds the recalibration subset).
        start : State
            The pruned state the candidates retrained from.
        candidates : list of State
            The retrained candidates, at least two.
        soup : State
            The step's merged (and recalibrated) state.

        Returns
        -------
        dict
            What ``soup_diagnostics`` returns.
        """
        recalibrate = self.hooks.recalibrate
        return soup_diagnostics(
            self.model,
            start,
            candidates,
            soup,
            heldout=self.splits.heldout,
            test=self.splits.test,
            recalibrate=(lambda state: recalibrate(state, step.index)) if recalibrate else False,
            device=self.device,
            task=self.task,
        )

    # ---- records -----------------------------------------------------------------------

    def record(self, method: str, phase: int, state: State, mask: Mask, extra: dict, started: float) -> dict:
        """Evaluate ``state``, write and log its row, and checkpoint it.

        Parameters
        ----------
        method : str
            The method the row belongs to.
        phase : int
            The prune step (phase) index.
        state : State
            The state to evaluate and checkpoint.
        mask : Mask
            Its mask.
        extra : dict
            Further fields of the row (candidates, epochs, training loss...).
        started : float
            ``time.perf_counter()`` at the step's start, for the row's ``seconds``.

        Returns
        -------
        dict
            The row, as appended to ``results.jsonl``.
        """
        row = self._row(method, phase, mask, self.evaluate_state(state), extra, started)
        self.log(_describe(row))
        self.save(method, phase, state, mask, row)
        return row

    def _ensemble_row(self, step: PruneStep, mask: Mask, states: list[State], started: float) -> dict:
        models = [_model_with(self.model, state) for state in states]
        metrics = ensemble_metrics(models, self.splits.test, device=self.device)
        row = {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "ece": metrics["ece"]}
        if self.config.ood:
            ood = ensemble_metrics(models, self.ood_data, device=self.device, ood=True, seed=self.config.seed)
            row.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return self._row("ensemble", step.index, mask, row, {"candidates": len(states)}, started)

    def _row(self, method: str, phase: int, mask: Mask, metrics: dict, extra: dict, started: float) -> dict:
        row = {
            "method": method,
            "seed": self.config.seed,
            "phase": phase,
            "sparsity": sparsity(mask),
            "mask_digest": mask_digest(mask),
            "test_examples": len(self.splits.test),  # how fine a difference of accuracies can be read
            **metrics,
            **extra,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        append_line(self.out_dir / "results.jsonl", json.dumps(row) + "\n")  # the server's rule: no symlinks
        return row

    def save(self, method: str, phase: int, state: State, mask: Mask, row: dict) -> None:
        """Checkpoint ``state`` as ``checkpoints/seed<seed>-<method>``, replacing the method's
        earlier phase.

        Parameters
        ----------
        method : str
            The method, in the checkpoint's name and metadata.
        phase : int
            The prune step (phase) index.
        state : State
            The state to save.
        mask : Mask
            Its mask.
        row : dict
            The state's result row; its numeric fields become the checkpoint's metrics.
        """
        # Only the state of the last phase is worth keeping per method; earlier ones are replaced.
        save_checkpoint(
            checkpoint_path(self.out_dir, self.config.seed, method),
            state,
            mask,
            {
                "phase": phase,
                "method": method,
                "model": self.config.model,
                "dataset": self.config.dataset,
                "config": self.config.to_dict(),
                "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
            },
        )

    def close(self) -> None:
        """Stop the trainer's worker processes (``CandidateTrainer.close``)."""
        self.trainer.close()


def checkpoint_path(out_dir: str | Path, seed: int, method: str) -> Path:
    """Where a local run keeps a method's last checkpoint: ``OUT/checkpoints/seed<seed>-<method>``.

    Parameters
    ----------
    out_dir : str or Path
        The run's output folder.
    seed : int
        The seed of the run.
    method : str
        The method (``dense`` for the dense model every method starts from).

    Returns
    -------
    Path
        The checkpoint's base path (``load_checkpoint`` takes it as it is).
    """
    return Path(out_dir) / "checkpoints" / f"seed{seed}-{method}"


def _model_with(template: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def _describe(row: dict) -> str:
    text = f"[{row['method']}] phase {row['phase']} sparsity {row['sparsity']:.2%} test acc {row['accuracy']:.4f}"
    if "ood_accuracy" in row:
        text += f" ood acc {row['ood_accuracy']:.4f}"
    return text + f" ({row['seconds']:.1f}s)"


def run_local(config: RunConfig, seeds: list[int] | None = None, log: Log = print) -> list[dict]:
    """Run every seed in ``seeds`` (default: the config's) and return all result rows.

    Parameters
    ----------
    config : RunConfig
        The run's settings; each seed runs with ``config`` and its own ``seed``.
    seeds : list of int, optional
        The seeds to run (default: ``[config.seed]``).
    log : callable, optional
        Receives progress lines (default: ``print``).

    Returns
    -------
    list of dict
        Every seed's rows, dense first, then each method's steps.
    """
    rows = []
    for seed in seeds or [config.seed]:
        run = LocalRun(RunConfig.from_mapping({"seed": seed}, base=config), log)
        try:
            rows += run.run()
        finally:
            run.close()
    return rows
