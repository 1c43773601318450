"""What ``fedsms inspect`` prints for the files and folders fedsms writes.

- a checkpoint (``X``, ``X.json``, ``X.safetensors`` or ``X.mask.safetensors``): per-tensor
  sparsity of its mask and its metadata;
- a model without a mask file (``final_model``, ``export_model``'s output, any plain
  ``.safetensors`` state dict): the same, the mask read off its zeros
  (``fedsms.compact.derive_mask``, the rule ``fedsms export`` uses);
- both of those also show the size their compact file would have;
- a compact model file (``fedsms export``'s output): its sparsity, size, plan and metadata;
- ``results.jsonl`` (and the ``summary.json`` beside one): the per-phase and final tables;
  ``rounds.jsonl``: one line per round;
- a folder: every checkpoint, model and results file in it, to pass one of them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedsms import FedSMSError
from fedsms.checkpoint import Checkpoint, has_mask, load_checkpoint
from fedsms.compact import derive_mask, inspect_lines, is_compact
from fedsms.masks import format_report, sparsity_report

# What a folder listing shows, in this order: name patterns and what they are.
LISTED = (
    ("*.json", "checkpoint"),  # the manifests; a model's metadata file is told apart below
    ("*.safetensors", "model"),
    ("results.jsonl", "results"),
    ("rounds.jsonl", "rounds"),
)


def describe(path: str | Path) -> str:
    """The text ``fedsms inspect PATH`` prints.

    Parameters
    ----------
    path : str or Path
        A checkpoint or model (any of its file names, or its base name), a compact model
        file, a results or rounds file, or a folder.

    Returns
    -------
    str
        The description, lines joined by newlines.

    Raises
    ------
    FedSMSError
        If ``path`` is none of those, or a file of it is missing or damaged.
    """
    path = Path(path)
    if path.is_dir():
        return describe_folder(path)
    if is_compact(path):
        return "\n".join(inspect_lines(path))
    if path.name.endswith(".jsonl"):
        return describe_lines(path)
    if has_mask(path):
        return _model_report(path, load_checkpoint(path))
    if path.name == "summary.json" and (path.parent / "results.jsonl").is_file():
        return describe_lines(path.parent / "results.jsonl")  # the summary's numbers, as tables
    if not path.exists() and not _model_file(path).is_file():
        raise FedSMSError(f"{path} is missing; pass a checkpoint, a model, a results file or a run's folder")
    if not _model_file(path).is_file():
        raise FedSMSError(
            f"{path} is not a checkpoint, a model or a results file; pass one of those, or a folder to list them"
        )
    model = load_checkpoint(path, dense_ok=True)
    note = (
        f"{_model_file(path).name} is a plain state dict (no mask file); its mask is read off its zeros "
        "in each weight of 2 or more dimensions with enough zeros to store sparse (as fedsms export does); "
        "tensors not listed are dense"
    )
    return note + "\n\n" + _model_report(path, dataclasses.replace(model, mask=derive_mask(model.state)))


def describe_lines(path: Path) -> str:
    """The tables of a ``results.jsonl``, or one line per round of a ``rounds.jsonl``.

    Parameters
    ----------
    path : Path
        The JSON-lines file.

    Returns
    -------
    str
        The text.

    Raises
    ------
    FedSMSError
        If the file cannot be read or holds neither kind of row.
    """
    from fedsms.report import by_schedule, final_table, phase_table, read_rows

    try:
        rows = read_rows(path)
    except (OSError, ValueError) as error:
        raise FedSMSError(
            f"{path} cannot be read as JSON lines ({error}); pass a results.jsonl or rounds.jsonl"
        ) from None
    if rows and all({"method", "phase", "accuracy"} <= set(r) for r in rows):
        return "\n\n".join([*(phase_table(part) for part in by_schedule(rows)), final_table(rows)])
    if rows and all({"server_round", "phase", "sparsity"} <= set(r) for r in rows):
        return "\n".join(_round_line(r) for r in rows)
    raise FedSMSError(f"{path} holds neither result rows nor round records; pass a results.jsonl or rounds.jsonl")


def _round_line(row: dict) -> str:
    central = row.get("central_eval") or row.get("federated_eval") or {}
    accuracy = f", test acc {100 * central['accuracy']:.2f} %" if "accuracy" in central else ""
    return (
        f"round {row['server_round']}: phase {row['phase']}, sparsity {row['sparsity']:.2%}, "
        f"{row.get('accepted', '?')} of {row.get('clients', '?')} replies accepted{accuracy}"
    )


def describe_folder(folder: Path) -> str:
    """Every checkpoint, model and results file under ``folder``, one per line.

    Parameters
    ----------
    folder : Path
        A run's output folder (or any folder).

    Returns
    -------
    str
        One line per item, with the path to pass to ``fedsms inspect``.

    Raises
    ------
    FedSMSError
        If the folder holds none of them.
    """
    found = []
    for pattern, kind in LISTED:
        for file in sorted(folder.rglob(pattern)):
            item = _listed(file, kind)
            if item is not None:
                found.append(item)
    if not found:
        raise FedSMSError(f"{folder} holds no fedsms checkpoint, model or results file; pass the folder of a run")
    width = max(len(kind) for kind, _ in found)
    lines = [f"{folder} holds (pass one to fedsms inspect):"]
    lines += [f"  {kind:<{width}}  {path}" for kind, path in found]
    return "\n".join(lines)


def _listed(file: Path, kind: str) -> tuple[str, Path] | None:
    """(kind, path to pass) of a file a folder listing shows, or None to skip it."""
    if kind == "checkpoint":
        if not has_mask(file):
            return None  # a model's metadata: the model is listed by its .safetensors file
        return kind, file.with_suffix("")
    if kind == "model":
        # A checkpoint's tensor files (each has its mask file beside it) are listed as the checkpoint.
        if has_mask(file) or file.name.endswith(".mask.safetensors"):
            return None
        return ("compact" if is_compact(file) else kind), file
    return kind, file


def _model_file(path: Path) -> Path:
    name = path.name
    for suffix in (".safetensors", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".safetensors")
    return path.with_name(name + ".safetensors")


def _model_report(path: Path, model: Checkpoint) -> str:
    shown = {k: v for k, v in model.metadata.items() if k not in ("config", "rounds")}
    lines = [format_report(sparsity_report(model.mask)), *inspect_lines(path, model), ""]
    return "\n".join([*lines, json.dumps(shown, indent=2, default=str)])
