"""Retraining the m candidates of a phase, in this process or in worker processes.

Every candidate starts from the same pruned state and keeps the same mask; only its
``CandidateConfig`` differs. With ``workers > 1`` candidates train in spawned processes,
each with its own share of the CPU threads (or the same GPU).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence

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
    *,
    precision: str = "auto",
    channels_last: bool = False,
) -> tuple[State, dict]:
    """Retrain one candidate from ``start`` under ``mask`` (see :func:`fedsms.training.train_candidate`).

    Parameters
    ----------
    model : torch.nn.Module
        Scratch model of the job's architecture, on ``device``; its weights are overwritten.
    start : mapping of str to torch.Tensor
        The state every candidate of the phase starts from.
    mask : Mask
        The phase's mask, kept after every optimizer step.
    splits : DatasetSplits
        ``splits.train`` is trained on, with ``splits.augmentation``.
    config : CandidateConfig
        This candidate's hyperparameters.
    device : torch.device
        Where to train.
    log : callable, optional
        Receives one line per epoch (``"<label> epoch e/E loss L"``).
    label : str, default ""
        How the candidate is named in the log lines.
    precision : str, default "auto"
        ``auto``, ``fp32`` or ``bf16`` (see :func:`fedsms.training.autocast_for`).
    channels_last : bool, default False
        Train 2-D convolutions in the channels-last layout.

    Returns
    -------
    tuple of (dict of str to torch.Tensor, dict)
        The retrained state (a CPU copy) and the metrics ``train_candidate`` returns.

    Raises
    ------
    FedSMSError
        As :func:`fedsms.training.train_candidate`.
    """
    model.load_state_dict(start)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if log is not None:
            log(f"{label} epoch {epoch}/{epochs} loss {loss:.4f}")

    metrics = train_candidate(
        model,
        mask,
        splits.train,
        config,
        augmentation=splits.augmentation,
        device=device,
        progress=progress,
        precision=precision,
        channels_last=channels_last,
    )
    return cpu_state(model), metrics


class CandidateTrainer:
    """Trains lists of candidates; ``close()`` (or ``with``) stops any worker processes.

    Parameters
    ----------
    model_name : str
        The model to build (``fedsms.models.build_for``), here and in each worker.
    splits : DatasetSplits
        The data; with workers it is sent to each of them once.
    device : torch.device
        Where candidates train (workers share it).
    workers : int, default 1
        Worker processes (spawned); 1 trains in this process. Each worker gets an equal
        share of the CPU threads.
    log : callable, optional
        Receives progress lines (per epoch in this process, per candidate with workers).
    precision : str, default "auto"
        ``auto``, ``fp32`` or ``bf16`` (see :func:`fedsms.training.autocast_for`).
    channels_last : bool, default False
        Train 2-D convolutions in the channels-last layout.
    """

    def __init__(
        self,
        model_name: str,
        splits: DatasetSplits,
        device: torch.device,
        workers: int = 1,
        log: Log | None = None,
        *,
        precision: str = "auto",
        channels_last: bool = False,
    ):
        self.model = build_for(model_name, splits).to(device)
        self.model_name, self.splits, self.device, self.log = model_name, splits, device, log
        self.execution = {"precision": precision, "channels_last": channels_last}
        self._pool = None
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(model_name, splits, str(device), threads, self.execution),
            )

    def train(
        self, start: Mapping[str, torch.Tensor], mask: Mask, configs: Sequence[CandidateConfig], label: str
    ) -> list[tuple[State, dict]]:
        """Retrain one candidate per config, all from ``start`` under ``mask``.

        Parameters
        ----------
        start : mapping of str to torch.Tensor
            The state every candidate starts from.
        mask : Mask
            The mask every candidate keeps.
        configs : sequence of CandidateConfig
            One per candidate.
        label : str
            Prefix of the log lines (e.g. the phase).

        Returns
        -------
        list of tuple of (dict of str to torch.Tensor, dict)
            Per config, in order: the retrained CPU state and its training metrics.

        Raises
        ------
        FedSMSError
            As :func:`fedsms.training.train_candidate` (re-raised from a worker).
        """
        if self._pool is None:
            return [
                train_one(
                    self.model,
                    start,
                    mask,
                    self.splits,
                    c,
                    self.device,
                    self.log,
                    f"{label} candidate {i + 1}/{len(configs)}",
                    **self.execution,
                )
                for i, c in enumerate(configs)
            ]
        start = {k: v.cpu() for k, v in start.items()}
        futures = [self._pool.submit(_train_in_worker, start, mask, c) for c in configs]
        results = []
        for i, future in enumerate(futures):
            results.append(future.result())
            if self.log is not None:
                self.log(
                    f"{label} candidate {i + 1}/{len(configs)} done (worker) loss {results[-1][1]['train_loss']:.4f}"
                )
        return results

    def close(self) -> None:
        """Stop the worker processes (pending candidates are cancelled); safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> CandidateTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_worker: dict = {}


def _init_worker(model_name: str, splits: DatasetSplits, device: str, threads: int, execution: dict) -> None:
    torch.set_num_threads(threads)
    _worker.update(
        model=build_for(model_name, splits).to(device), splits=splits, device=torch.device(device), execution=execution
    )


def _train_in_worker(start: State, mask: Mask, config: CandidateConfig) -> tuple[State, dict]:
    w = _worker
    return train_one(w["model"], start, mask, w["splits"], config, w["device"], **w["execution"])
