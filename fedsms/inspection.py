"""What ``fedsms inspect`` prints for the files and folders fedsms writes.

- a checkpoint (``X``, ``X.json``, ``X.safetensors`` or ``X.mask.safetensors``): per-tensor
  sparsity of its mask and its metadata;
- a model without a mask file (``final_model``, ``export_model``'s output, any plain
  ``.safetensors`` state dict): the same, the mask read off its zeros;
- ``results.jsonl`` (and the ``summary.json`` beside one): the per-phase and final tables;
  ``rounds.jsonl``: one line per round;
- a folder: every checkpoint, model and results file in it, to pass one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedsms import FedSMSError
from fedsms.checkpoint import has_mask, load_checkpoint
from fedsms.masks import Mask, format_report, sparsity_report

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
        A checkpoint or model (any of its file names, or its base name), a results or rounds
        file, or a folder.

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
    if path.name.endswith(".jsonl"):
        return describe_lines(path)
    if has_mask(path):
        checkpoint = load_checkpoint(path)
        return _tensor_report(checkpoint.mask, checkpoint.metadata)
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
        "in every tensor of 2 or more dimensions (the weights fedsms prunes)"
    )
    return note + "\n\n" + _tensor_report(zeros_mask(model.state), model.metadata)


def zeros_mask(state: dict[str, torch.Tensor]) -> Mask:
    """The mask of a plain state dict: its nonzero entries, for every floating-point tensor
    of two or more dimensions (biases and norm layers are never pruned).

    Parameters
    ----------
    state : dict of str to torch.Tensor
        A model's state dict.

    Returns
    -------
    Mask
        ``True`` where a weight is nonzero.
    """
    return {name: t != 0 for name, t in state.items() if t.is_floating_point() and t.dim() >= 2}


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
        return kind, file
    return kind, file


def _model_file(path: Path) -> Path:
    name = path.name
    for suffix in (".safetensors", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".safetensors")
    return path.with_name(name + ".safetensors")


def _tensor_report(mask: Mask, metadata: dict) -> str:
    shown = {k: v for k, v in metadata.items() if k not in ("config", "rounds")}
    return format_report(sparsity_report(mask)) + "\n\n" + json.dumps(shown, indent=2, default=str)
