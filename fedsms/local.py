"""The single-machine driver: dense → P × (prune → retrain m → merge → recalibrate → evaluate).

Every method runs through the same loop and differs only in how a phase turns its
retrained candidates into the next state:

- ``imp``: one candidate per phase (candidate 0 of the recipe).
- ``imp-best``: m candidates, keep the best on the held-out split, no averaging.
- ``imp-avg``: one-phase soup: IMP for phases 1..P-1, m candidates averaged in phase P only.
- ``sms``: m candidates averaged under the mask in every phase (the merge rule decides
  uniform, weighted or greedy), and the soup starts the next phase. The prediction
  ensemble of the same candidates is reported as ``ensemble`` (an upper reference).
- ``sms-greedy``: ``sms`` with the greedy soup whatever the merge rule, so one run can
  report both soups side by side.

Every candidate retrains ``retrain_epochs`` epochs per phase in every method.

``gmp`` and ``gmp-soup`` prune during training instead (cubic schedule, a soup at every
mask update for ``gmp-soup``) within the same epoch budget; ``fedsms.gmp`` drives them.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from fedsms import FedSMSError
from fedsms.candidates import CandidateTrainer, State, cpu_state
from fedsms.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedsms.config import RunConfig
from fedsms.data import DatasetSplits, load_dataset
from fedsms.evaluate import ensemble_metrics, evaluate, evaluate_ood
from fedsms.gmp import GMP_METHODS, run_gmp
from fedsms.masks import Mask, dense_mask, mask_digest, prunable_names, prune_state, sparsity, sparsity_after_phase
from fedsms.norms import recalibrate_norms
from fedsms.recipe import for_phase
from fedsms.soup import average, greedy_soup
from fedsms.training import resolve_device

Log = Callable[[str], None]


class LocalRun:
    """One seed of the whole pipeline for every configured method."""

    def __init__(self, config: RunConfig, log: Log = print) -> None:
        self.config, self.log = config, log
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.splits: DatasetSplits = load_dataset(
            config.dataset, data_dir=config.data_dir or None, heldout_fraction=config.heldout_fraction, seed=config.seed
        )
        self.trainer = CandidateTrainer(config.model, self.splits, self.device, config.workers, log)
        self.model = self.trainer.model
        self.names = prunable_names(
            self.model, keep_first_dense=config.keep_first_dense, keep_last_dense=config.keep_last_dense
        )
        self.candidate_configs = config.candidate_configs()
        self.ood_data = self.splits.test.head(config.ood_examples)

    # ---- evaluation --------------------------------------------------------------------

    def evaluate_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state)
        test = evaluate(self.model, self.splits.test, device=self.device)
        row = {"accuracy": test["accuracy"], "loss": test["loss"], "ece": test["ece"],
               "heldout_accuracy": evaluate(self.model, self.splits.heldout, device=self.device)["accuracy"]}
        if self.config.ood:
            ood = evaluate_ood(self.model, self.ood_data, device=self.device, seed=self.config.seed)
            row.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return row

    def heldout_accuracy(self, state: Mapping[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        return evaluate(self.model, self.splits.heldout, device=self.device)["accuracy"]

    def recalibrated(self, state: Mapping[str, torch.Tensor], phase: int) -> State:
        self.model.load_state_dict(state)
        recalibrate_norms(
            self.model, self.splits.train, fraction=self.config.recalibration_fraction,
            device=self.device, seed=self.config.seed + phase,
        )
        return cpu_state(self.model)

    # ---- the pipeline ------------------------------------------------------------------

    def dense_state(self) -> tuple[State, dict]:
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
        started = time.perf_counter()
        dense, dense_metrics = self.dense_state()
        dense_mask_ = dense_mask(self.model, self.names)
        rows = [self._row("dense", 0, dense_mask_, self.evaluate_state(dense), dense_metrics, started)]
        self.log(_describe(rows[-1]))
        self.save("dense", 0, dense, dense_mask_, rows[-1])
        for method in self.config.method_list():
            if method in GMP_METHODS:
                rows += run_gmp(self, method, dense, dense_mask_)
            else:
                rows += self.run_method(method, dense, dense_mask_)
        return rows

    def run_method(self, method: str, dense: State, mask: Mask) -> list[dict]:
        config, rows, state = self.config, [], dense
        for phase in range(1, config.phases + 1):
            started = time.perf_counter()
            target = sparsity_after_phase(config.target_sparsity, config.phases, phase)
            state, mask = prune_state(state, mask, target, method=config.pruning, seed=config.seed * 1000 + phase)
            many = method in ("imp-best", "sms", "sms-greedy") or (method == "imp-avg" and phase == config.phases)
            configs = [for_phase(c, phase) for c in (self.candidate_configs if many else self.candidate_configs[:1])]
            label = f"[{method}] phase {phase}/{config.phases} sparsity {sparsity(mask):.2%}"
            trained = self.trainer.train(state, mask, configs, label)
            states = [s for s, _ in trained]
            extra: dict = {"candidates": len(states), "train_loss": sum(m["train_loss"] for _, m in trained) / len(trained)}
            if len(states) == 1:
                state = states[0]
            elif method == "imp-best":
                scores = [self.heldout_accuracy(s) for s in states]
                best = max(range(len(states)), key=scores.__getitem__)
                state, extra["chosen"] = states[best], [best]
            else:
                if method == "sms":
                    rows.append(self._ensemble_row(phase, mask, states, started))
                rule = "greedy" if method == "sms-greedy" else config.merge
                state, extra["chosen"] = self.merge(states, mask, phase, [m["num_examples"] for _, m in trained], rule)
            rows.append(self.record(method, phase, state, mask, extra, started))
        return rows

    def merge(self, states: list[State], mask: Mask, phase: int, examples: list[int], rule: str) -> tuple[State, list[int]]:
        if rule == "greedy":
            soup, chosen, _ = greedy_soup(states, mask, lambda s: self.heldout_accuracy(self.recalibrated(s, phase)))
        else:
            soup, chosen = average(states, mask, examples if rule == "weighted" else None), list(range(len(states)))
        return self.recalibrated(soup, phase), chosen

    # ---- records -----------------------------------------------------------------------

    def record(self, method: str, phase: int, state: State, mask: Mask, extra: dict, started: float) -> dict:
        """Evaluate ``state``, write and log its row, and checkpoint it."""
        row = self._row(method, phase, mask, self.evaluate_state(state), extra, started)
        self.log(_describe(row))
        self.save(method, phase, state, mask, row)
        return row

    def _ensemble_row(self, phase: int, mask: Mask, states: list[State], started: float) -> dict:
        models = [_model_with(self.model, state) for state in states]
        metrics = ensemble_metrics(models, self.splits.test, device=self.device)
        row = {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "ece": metrics["ece"]}
        if self.config.ood:
            ood = ensemble_metrics(models, self.ood_data, device=self.device, ood=True, seed=self.config.seed)
            row.update(ood_accuracy=ood["ood_accuracy"], ood_ece=ood["ood_ece"])
        return self._row("ensemble", phase, mask, row, {"candidates": len(states)}, started)

    def _row(self, method: str, phase: int, mask: Mask, metrics: dict, extra: dict, started: float) -> dict:
        row = {"method": method, "seed": self.config.seed, "phase": phase, "sparsity": sparsity(mask),
               "mask_digest": mask_digest(mask), **metrics, **extra,
               "seconds": round(time.perf_counter() - started, 3)}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def save(self, method: str, phase: int, state: State, mask: Mask, row: dict) -> None:
        # Only the state of the last phase is worth keeping per method; earlier ones are replaced.
        path = self.out_dir / "checkpoints" / f"seed{self.config.seed}-{method}"
        save_checkpoint(path, state, mask, {
            "phase": phase, "method": method, "model": self.config.model, "dataset": self.config.dataset,
            "config": self.config.to_dict(), "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
        })

    def close(self) -> None:
        self.trainer.close()


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
    """Run every seed in ``seeds`` (default: the config's) and return all result rows."""
    rows = []
    for seed in seeds or [config.seed]:
        run = LocalRun(RunConfig.from_mapping({"seed": seed}, base=config), log)
        try:
            rows += run.run()
        finally:
            run.close()
    return rows
