"""What a federated job leaves on disk: one JSON line per round, the round checkpoint a
resumed job continues from, and at the end the final model, the per-phase results, plots
and ``summary.json``. ``JobRecorder`` owns all of it; the strategy only hands it rounds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedsms import FedSMSError, safefile
from fedsms.checkpoint import Checkpoint, check_compatible, export_model, remove_stale, save_checkpoint
from fedsms.config import soup_shaping_changes
from fedsms.masks import Mask
from fedsms.schedule import Round

_MAX_LINE = 64 << 20  # bytes of one line of rounds.jsonl a resume reads


@dataclass
class RoundLog:
    """What one server round did; written as one JSON line."""

    server_round: int
    phase: int
    round_in_phase: int
    sparsity: float
    clients: int = 0
    partitions: list = field(default_factory=list)  # the drawn clients' partition-ids (None: not reported)
    accepted: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0  # server → clients, all clients of the round together
    bytes_up: int = 0  # clients → server
    train: dict = field(default_factory=dict)
    federated_eval: dict = field(default_factory=dict)
    central_eval: dict = field(default_factory=dict)  # the strategy's own, on the server's data
    evaluate_fn: dict = field(default_factory=dict)  # what ``start(..., evaluate_fn=...)`` returned
    diagnostics: dict = field(default_factory=dict)  # soup diagnostics of a phase's last round
    guard: dict = field(default_factory=dict)  # soup-guard's fallback at a phase's last round (empty: soup kept)
    privacy: dict = field(default_factory=dict)  # dp: epsilon spent after the round, noise, clipping bound
    seconds: float = 0.0


class JobRecorder:
    """Round lines, round checkpoints and the outputs of one job, under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        The job's folder (absolute).
    settings : dict
        Every setting of the job (``_`` spelling), recorded in checkpoints and the summary.
    schedule : list of Round
        The job's rounds.
    method : str
        The method name of the job's phase rows (e.g. ``fed-hyperparameter``).
    log : callable
        Receives one line per event.

    Attributes
    ----------
    rounds : list of RoundLog
        The completed rounds, in order.
    initial_eval : dict
        ``evaluate_fn``'s metrics of the starting model (round 0), if it was called.
    """

    def __init__(
        self, out_dir: Path, settings: dict, schedule: list[Round], method: str, log: Callable[[str], None]
    ) -> None:
        self.out_dir, self.settings, self.schedule, self.method, self.log = out_dir, settings, schedule, method, log
        self.rounds: list[RoundLog] = []
        self.initial_eval: dict = {}

    @property
    def checkpoint_path(self) -> Path:
        """Where the round checkpoint lives."""
        return self.out_dir / "checkpoints" / "soup"

    @property
    def done(self) -> int:
        """The last completed server round (0 before the first)."""
        return self.rounds[-1].server_round if self.rounds else 0

    def clean(self) -> None:
        """Remove the files an interrupted checkpoint write left behind."""
        for stale in remove_stale(self.checkpoint_path):
            self.log(f"removed {stale.name}, left by a checkpoint that was interrupted")

    def end_round(self, log: RoundLog, soup: Mapping[str, torch.Tensor], mask: Mask, model: dict) -> None:
        """Keep ``log``, append its JSON line to ``rounds.jsonl`` and checkpoint the round.

        Parameters
        ----------
        log : RoundLog
            The completed round.
        soup : mapping of str to Tensor
            The soup after the round.
        mask : Mask
            Its mask.
        model : dict
            The model's metadata (see ``model_metadata``).
        """
        self.rounds.append(log)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        safefile.append_line(self.out_dir / "rounds.jsonl", json.dumps(log.__dict__) + "\n")
        step = self.schedule[log.server_round - 1]
        save_checkpoint(
            self.checkpoint_path,
            soup,
            mask,
            {
                "phase": step.phase,
                "round_in_phase": step.round_in_phase,
                "server_round": log.server_round,
                **model,
                "config": self.settings,
                "metrics": log.central_eval,
                "initial_eval": self.initial_eval,  # the round history is rounds.jsonl, appended
            },
        )

    def restore(self, checkpoint: Checkpoint, model: nn.Module) -> int:
        """Continue a job from the checkpoint ``end_round`` wrote under the same settings:
        the round history is read from ``rounds.jsonl`` up to the checkpoint's round, a line
        at a time (a line for a round whose checkpoint never landed is dropped; that round
        reruns), so a resume reads what it needs whatever the job's length.

        Settings that do not shape the soup may differ.

        Parameters
        ----------
        checkpoint : Checkpoint
            A checkpoint loaded from ``checkpoint_path``.
        model : nn.Module
            A model of the job's architecture (names, shapes and dtypes are checked).

        Returns
        -------
        int
            The last completed round.

        Raises
        ------
        FedSMSError
            The checkpoint was written under other soup-shaping settings, does not fit the
            model (names, shapes or dtypes), lacks or has a damaged config or round, is of a
            round outside this job's schedule, or ``rounds.jsonl`` lacks its rounds.
        """
        meta = checkpoint.metadata
        saved = meta.get("config", {})
        if not isinstance(saved, dict):
            raise FedSMSError(
                "the checkpoint's 'config' is not a JSON object; it is damaged, start a new job in another --out-dir"
            )
        changed = soup_shaping_changes(saved, self.settings)  # keys declared with shapes_soup=False may change
        if changed:
            shown = ", ".join(f"{k.replace('_', '-')}={saved.get(k)!r} (now {self.settings[k]!r})" for k in changed[:4])
            raise FedSMSError(
                f"the checkpoint was written by a job with other settings: {shown}; "
                "resume with the same settings or start a new job in another --out-dir"
            )
        check_compatible(checkpoint, model)
        for name, tensor in model.state_dict().items():
            if checkpoint.state[name].dtype != tensor.dtype:
                raise FedSMSError(
                    f"the checkpoint holds {name!r} as {checkpoint.state[name].dtype}, not "
                    f"{tensor.dtype}; it was not written by this job, start a new job in another --out-dir"
                )
        done = meta.get("server_round")
        if isinstance(done, bool) or not isinstance(done, int):
            raise FedSMSError(
                "the checkpoint lacks 'server_round' (an int); it is not a fedsms server checkpoint, "
                "start a new job in another --out-dir"
            )
        if not 1 <= done <= len(self.schedule):
            raise FedSMSError(
                f"the checkpoint is of round {done}, outside this job's {len(self.schedule)} rounds; start a new job"
            )
        # The history beside the checkpoint (OUT/checkpoints/soup -> OUT/rounds.jsonl), else in out_dir.
        job = checkpoint.path.parent.parent if checkpoint.path is not None else self.out_dir
        source = job / "rounds.jsonl" if (job / "rounds.jsonl").is_file() else self.out_dir / "rounds.jsonl"
        self.rounds, extra = self._history(source, done)
        initial = meta.get("initial_eval", {})
        self.initial_eval = initial if isinstance(initial, dict) else {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if extra or source != self.out_dir / "rounds.jsonl":  # a round whose checkpoint never landed reruns
            safefile.write_text(
                self.out_dir / "rounds.jsonl", "".join(json.dumps(log.__dict__) + "\n" for log in self.rounds)
            )
        return done

    @staticmethod
    def _history(path: Path, done: int) -> tuple[list[RoundLog], bool]:
        """Rounds 1..``done`` from ``path`` (a ``rounds.jsonl``), read a line at a time (a line
        of a round after ``done``, or a torn last line, is dropped), and whether anything was."""
        rounds: list[RoundLog] = []
        extra = False
        try:
            with path.open("rb") as lines:
                while line := lines.readline(_MAX_LINE + 1):
                    if len(rounds) == done:
                        extra = True
                        break
                    try:
                        rounds.append(RoundLog(**json.loads(line)))
                    except (ValueError, TypeError):
                        extra = True  # a torn last line, or a line this fedsms cannot read
                        break
        except OSError as error:
            raise FedSMSError(
                f"the round history {path} cannot be read ({error.strerror}); it is the job's record of "
                "its rounds, restore it or start a new job in another --out-dir"
            ) from None
        if [log.server_round for log in rounds] != list(range(1, done + 1)):
            raise FedSMSError(
                f"the round history {path} does not hold rounds 1 to {done} of the checkpoint in order; it is damaged "
                "or of another job, restore it or start a new job in another --out-dir"
            )
        return rounds, extra

    def phase_rows(self) -> list[dict]:
        """The last round of every phase as a result row, in the local driver's format.

        Returns
        -------
        list of dict
            Method, seed, phase, sparsity, every central (else federated) metric, and the
            round's ``evaluate_fn`` metrics and diagnostics where there are any.
        """
        rows = []
        for log in self.rounds:
            if self.schedule[log.server_round - 1].ends_phase:
                metrics = log.central_eval or log.federated_eval
                rows.append(
                    {
                        "method": "fed-dense" if log.phase == 0 else self.method,
                        "seed": self.settings.get("seed"),
                        "phase": log.phase,
                        "sparsity": log.sparsity,
                        **metrics,
                        **({"evaluate_fn": log.evaluate_fn} if log.evaluate_fn else {}),
                        **({"diagnostics": log.diagnostics} if log.diagnostics else {}),
                        **({"guard": log.guard} if log.guard else {}),
                    }
                )
        return rows

    def write_outputs(self, model: nn.Module, metadata: dict, stopped: str = "", privacy: dict | None = None) -> Path:
        """``final_model``, ``results.jsonl``, plots and ``summary.json`` in ``out_dir``;
        ``stopped`` says why the job ended early (empty when every round ran).

        Classification jobs (every phase row has an accuracy) get the accuracy plots and
        tables; any other task gets a per-phase table of each of its metrics; both get the
        diagnostics plots.

        Parameters
        ----------
        model : nn.Module
            The model holding the final soup.
        metadata : dict
            The model's metadata (see ``model_metadata``).
        stopped : str, optional
            Why the job ended early, recorded in ``summary.json`` (default: empty).
        privacy : dict, optional
            The job's differential privacy (``fedsms_server.privacy.Privacy.summary``), recorded
            in ``summary.json`` when given.

        Returns
        -------
        Path
            ``out_dir``.
        """
        from fedsms.plots import plot_diagnostics, plot_results  # matplotlib only when a job ends
        from fedsms.report import final_table, phase_table

        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        final = export_model(out / "final_model", model, metadata)
        rows = self.phase_rows()
        safefile.write_text(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        if rows and all("accuracy" in r for r in rows):
            plot_results(rows, out)
            plot_diagnostics(rows, out)
            self.log("\n" + phase_table(rows) + "\n" + final_table(rows))
        elif rows:  # another task: one table per metric every phase row has, and the diagnostics
            plot_diagnostics(rows, out)
            shared = [
                k for k, v in rows[0].items() if isinstance(v, float) and k != "sparsity" and all(k in r for r in rows)
            ]
            self.log("\n" + "\n\n".join(phase_table(rows, key, percent=False) for key in shared))
        summary = {
            "config": self.settings,
            "model": metadata,
            "initial_eval": self.initial_eval,
            "phases": rows,
            "bytes_down": sum(r.bytes_down for r in self.rounds),
            "bytes_up": sum(r.bytes_up for r in self.rounds),
            "final_model": str(final),
            "stopped": stopped,
            **({"privacy": privacy} if privacy else {}),
        }
        safefile.write_text(out / "summary.json", json.dumps(summary, indent=2))
        self.log(f"job {'stopped: ' + stopped if stopped else 'finished'}; results in {out}")
        return out


def model_metadata(model_name: str, model: nn.Module, mask: Mask) -> dict:
    """What the outputs say about the model: its name, class, parameter and pruned counts, and
    its sparsity over the pruned tensors and over all parameters.

    Parameters
    ----------
    model_name : str
        The job's ``model`` setting, recorded when ``model`` is that built-in model (a
        model of your own is named by its class).
    model : nn.Module
        The model.
    mask : Mask
        The job's mask (its tensors are the prunable ones).

    Returns
    -------
    dict
        ``model``, ``model_class``, ``parameters``, ``prunable`` (weights in pruned
        tensors), ``pruned_tensors``, ``sparsity`` (over the pruned tensors) and
        ``sparsity_all`` (over all parameters).
    """
    parameters = sum(p.numel() for p in model.parameters())
    prunable = sum(keep.numel() for keep in mask.values())
    zeros = prunable - sum(int(keep.sum()) for keep in mask.values())
    cls = type(model)
    built_in = cls.__module__.startswith("fedsms.")
    return {
        "model": model_name if built_in else f"{cls.__module__}.{cls.__qualname__}",
        "model_class": cls.__name__,
        "parameters": parameters,
        "prunable": prunable,
        "pruned_tensors": list(mask),
        "sparsity": zeros / max(prunable, 1),
        "sparsity_all": zeros / max(parameters, 1),
    }
