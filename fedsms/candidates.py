"""Retraining the m candidates of a phase, in this process or in worker processes.

Every candidate starts from the same pruned state and keeps the same mask; only its
``CandidateConfig`` differs. With ``workers > 1`` candidates train in spawned processes,
each with its own share of the CPU threads (or the same GPU).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from fedsms.data import DatasetSplits
from fedsms.engine import State, cpu_state
from fedsms.masks import Mask
from fedsms.models import build_for
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate

Log = Callable[[str], None]


def train_one(
    model: nn.Module,
    start: Mapping[str, torch.Tensor],
    mask: Mask,
    splits: DatasetSplits,
    config: CandidateConfig,
    device: torch.device,
    log: Log | None = None,
    label: str = "",
) -> tuple[State, dict]:
    model.load_state_dict(start)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if log is not None:
            log(f"{label} epoch {epoch}/{epochs} loss {loss:.4f}")

    metrics = train_candidate(
        model, mask, splits.train, config, augmentation=splits.augmentation, device=device, progress=progress
    )
    return cpu_state(model), metrics


class CandidateTrainer:
    """Trains lists of candidates; ``close()`` (or ``with``) stops any worker processes."""

    def __init__(self, model_name: str, splits: DatasetSplits, device: torch.device, workers: int = 1, log: Log | None = None):
        self.model = build_for(model_name, splits).to(device)
        self.model_name, self.splits, self.device, self.log = model_name, splits, device, log
        self._pool = None
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(model_name, splits, str(device), threads),
            )

    def train(self, start: Mapping[str, torch.Tensor], mask: Mask, configs: Sequence[CandidateConfig], label: str) -> list[tuple[State, dict]]:
        if self._pool is None:
            return [
                train_one(self.model, start, mask, self.splits, c, self.device, self.log, f"{label} candidate {i + 1}/{len(configs)}")
                for i, c in enumerate(configs)
            ]
        start = {k: v.cpu() for k, v in start.items()}
        futures = [self._pool.submit(_train_in_worker, start, mask, c) for c in configs]
        results = []
        for i, future in enumerate(futures):
            results.append(future.result())
            if self.log is not None:
                self.log(f"{label} candidate {i + 1}/{len(configs)} done (worker) loss {results[-1][1]['train_loss']:.4f}")
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CandidateTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_worker: dict = {}


def _init_worker(model_name: str, splits: DatasetSplits, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker.update(model=build_for(model_name, splits).to(device), splits=splits, device=torch.device(device))


def _train_in_worker(start: State, mask: Mask, config: CandidateConfig) -> tuple[State, dict]:
    return train_one(_worker["model"], start, mask, _worker["splits"], config, _worker["device"])
