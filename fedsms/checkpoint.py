"""Checkpoints: ``X.safetensors`` (the model's state dict, loadable with a plain
``model.load_state_dict``), ``X.mask.safetensors`` (the mask) and ``X.json`` (metadata).

Nothing is pickled. A checkpoint is one atomic unit: the tensors are written under names of
their own generation (``X.<gen>.safetensors``, ``X.<gen>.mask.safetensors``), then the JSON
manifest naming them replaces ``X.json`` in one rename, so a reader sees the old checkpoint
or the new one, never a mix. ``X.safetensors`` and ``X.mask.safetensors`` are then linked to
the new generation for a plain ``load_state_dict``; the reader goes by the manifest.
Temporaries and generations no manifest names are removed by ``remove_stale``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from fedsms import FedSMSError
from fedsms.codec import MAX_MAGNITUDE, in_range
from fedsms.masks import Mask, mask_digest, outside_mask_nonzeros, sparsity

FORMAT_VERSION = 1
MAX_METADATA_BYTES = 64 << 20


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class Checkpoint:
    """A checkpoint read back by :func:`load_checkpoint`, already validated.

    Attributes
    ----------
    state : dict of str to torch.Tensor
        The model's state dict, CPU tensors in their saved dtypes; zero outside ``mask``.
    mask : Mask
        CPU bool tensors, in the saved mask order (``metadata["mask_tensors"]``).
    metadata : dict
        The JSON record: the caller's metadata plus ``format_version``, ``mask_digest``,
        ``sparsity`` and ``mask_tensors``.
    path : pathlib.Path or None
        The base path ``X`` it was read from (None when not read from files).
    """

    state: dict[str, torch.Tensor]
    mask: Mask
    metadata: dict[str, Any]
    path: Path | None = None


def _base(path: str | Path) -> Path:
    path = Path(path)
    for suffix in (".mask.safetensors", ".safetensors", ".json"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _paths(base: Path) -> tuple[Path, Path, Path]:
    return (
        base.with_name(base.name + ".safetensors"),
        base.with_name(base.name + ".mask.safetensors"),
        base.with_name(base.name + ".json"),
    )


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link(source: Path, path: Path) -> None:
    """``path`` becomes ``source``'s content in one rename (a hard link where possible)."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    _atomic_write(path, write)


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries and tensor generations of checkpoint ``X`` that its manifest
    does not name (left by a process killed while writing). Returns what was removed.

    Files that cannot be removed are left in place; an unreadable manifest keeps nothing.

    Parameters
    ----------
    path : str or Path
        The checkpoint, named as ``save_checkpoint`` takes it (a ``.safetensors``,
        ``.mask.safetensors`` or ``.json`` suffix is ignored).

    Returns
    -------
    list of Path
        The files removed; empty when the checkpoint's folder does not exist.
    """
    base = _base(path)
    if not base.parent.is_dir():
        return []
    keep: set[str] = set()
    try:
        record = json.loads(_paths(base)[2].read_text())
        if isinstance(record, dict) and isinstance(record.get("files"), dict):
            keep = {v for v in record["files"].values() if isinstance(v, str)}
    except (OSError, ValueError, RecursionError):
        pass
    generation = re.compile(re.escape(base.name) + r"\.[0-9a-f]{12}\.(mask\.)?safetensors$")
    temporary = re.compile(r"\." + re.escape(base.name) + r"\..*\.tmp$")
    removed = []
    for entry in base.parent.iterdir():
        if entry.name not in keep and (generation.match(entry.name) or temporary.match(entry.name)):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, state: Mapping[str, torch.Tensor], mask: Mask, metadata: dict) -> Path:
    """Write the state, the mask and the metadata; returns the ``.safetensors`` path.

    Three files share the base name: ``X.safetensors``, ``X.mask.safetensors`` (the mask as
    uint8) and ``X.json``, each written to a temporary name and renamed, the JSON last. The
    JSON record is ``metadata`` with ``format_version``, ``mask_digest``, ``sparsity`` and
    ``mask_tensors`` added (they replace keys of the same name in ``metadata``).

    Parameters
    ----------
    path : str or pathlib.Path
        The base path ``X``, or any of the three file names (the suffix is stripped).
        Missing parent directories are created.
    state : mapping of str to torch.Tensor
        The state dict to save (any device; saved as contiguous CPU copies).
    mask : Mask
        The mask of ``state``.
    metadata : dict
        JSON-serialisable values (no NaN or Inf), e.g. the model name and the run settings.

    Returns
    -------
    pathlib.Path
        The path of ``X.safetensors``.

    Raises
    ------
    FedSMSError
        If a metadata value is not JSON-serialisable (nothing is written then).
    """
    base = _base(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    model_path, mask_path, json_path = _paths(base)
    record = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "mask_digest": mask_digest(mask),
        "sparsity": sparsity(mask),
        "mask_tensors": list(mask),
    }
    try:
        text = json.dumps(record, indent=2, allow_nan=False)
    except (TypeError, ValueError):
        bad = next((k for k, v in record.items() if not _serialisable(v)), "?")
        raise FedSMSError(
            f"checkpoint metadata key {bad!r} is not JSON-serialisable; pass plain numbers, strings, lists or dicts"
        ) from None
    generation = secrets.token_hex(6)
    state_file = base.with_name(f"{base.name}.{generation}.safetensors")
    mask_file = base.with_name(f"{base.name}.{generation}.mask.safetensors")
    # safetensors.save + our own temporary: save_file keeps a temporary of its own that a kill would leave behind
    _atomic_write(state_file, lambda tmp: Path(tmp).write_bytes(save(_contiguous(state))))
    _atomic_write(
        mask_file, lambda tmp: Path(tmp).write_bytes(save({k: v.to(torch.uint8) for k, v in _contiguous(mask).items()}))
    )
    record["files"] = {"state": state_file.name, "mask": mask_file.name}
    text = json.dumps(record, indent=2, allow_nan=False)
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))  # the commit point
    _link(state_file, model_path)
    _link(mask_file, mask_path)
    remove_stale(base)
    return model_path


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def has_mask(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` has a mask file.

    Parameters
    ----------
    path : str or pathlib.Path
        The base path ``X``, or any of the checkpoint's three file names.
    """
    return _paths(_base(path))[1].is_file()


def load_checkpoint(path: str | Path, *, dense_ok: bool = False) -> Checkpoint:
    """Read and validate a checkpoint written by ``save_checkpoint``.

    Nothing is unpickled. The mask must match the digest in the JSON, fit the state's
    shapes, and the state must be zero outside it. With ``dense_ok``, a model without a
    mask file (``export_model``'s output, or a bare ``X.safetensors`` state dict) loads too:
    its mask is empty, meaning dense, and its metadata is its JSON object when there is one.

    Parameters
    ----------
    path : str or pathlib.Path
        The base path ``X``, or any of the checkpoint's three file names.
    dense_ok : bool
        Accept a model without a mask file.

    Returns
    -------
    Checkpoint
        The state, the mask and the metadata.

    Raises
    ------
    FedSMSError
        If a file is missing or damaged, the JSON lacks fedsms's keys or has a newer format
        version, or the mask and state disagree with the JSON or with each other.
    """
    base = _base(path)
    model_path, mask_path, json_path = _paths(base)
    if dense_ok and not mask_path.is_file():
        return _load_dense(base)
    if not json_path.is_file():
        raise FedSMSError(f"checkpoint file {json_path} is missing; pass the path of a complete fedsms checkpoint")
    if json_path.stat().st_size > MAX_METADATA_BYTES:
        raise FedSMSError(f"{json_path} is larger than {MAX_METADATA_BYTES >> 20} MiB; it is not a fedsms checkpoint")
    try:
        metadata = json.loads(json_path.read_text(), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise FedSMSError(
            f"{json_path} is not valid JSON ({str(error)[:80]}); the checkpoint is damaged, use another one"
        ) from None
    if not isinstance(metadata, dict):
        raise FedSMSError(
            f"{json_path} holds a JSON {type(metadata).__name__}, not an object; it is not a fedsms checkpoint"
        )
    files = metadata.get("files")
    if files is not None:  # a manifest: its generation's files, whatever X.safetensors holds
        if not (
            isinstance(files, dict)
            and all(isinstance(files.get(k), str) and files[k] and "/" not in files[k] for k in ("state", "mask"))
        ):
            raise FedSMSError(f"{json_path} names no valid tensor files; the checkpoint is damaged, use another one")
        # Another base's generation, or its files left behind: the three plain files were
        # copied or renamed, and they are the checkpoint (checked against the digest below like any other).
        state_file, mask_file = base.with_name(files["state"]), base.with_name(files["mask"])
        if (
            files["state"].startswith(base.name + ".")
            and files["mask"].startswith(base.name + ".")
            and state_file.is_file()
            and mask_file.is_file()
        ):
            plain = model_path
            model_path, mask_path = state_file, mask_file
            if (
                plain.is_file()
                and model_path.is_file()
                and not os.path.samefile(plain, model_path)
                and plain.stat().st_mtime_ns > json_path.stat().st_mtime_ns
            ):
                model_path = plain  # X.safetensors was edited after saving: check what a user would load
    for needed in (model_path, mask_path):
        if not needed.is_file():
            raise FedSMSError(f"checkpoint file {needed} is missing; pass the path of a complete fedsms checkpoint")
    for key, kind in (("format_version", int), ("mask_digest", str), ("mask_tensors", list)):
        if not isinstance(metadata.get(key), kind) or isinstance(metadata.get(key), bool):
            raise FedSMSError(
                f"{json_path} lacks {key!r} ({kind.__name__}); it was not written by fedsms, use another checkpoint"
            )
    if not all(isinstance(name, str) for name in metadata["mask_tensors"]):
        raise FedSMSError(f"{json_path} lists 'mask_tensors' that are not all names; the checkpoint is damaged")
    if metadata["format_version"] > FORMAT_VERSION:
        raise FedSMSError(f"{json_path} has format version {metadata['format_version']}; upgrade fedsms to read it")
    try:
        state = load_file(model_path)
        mask = {k: v.bool() for k, v in load_file(mask_path).items()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise FedSMSError(
            f"checkpoint {base} cannot be read ({error}); the files are damaged, use another checkpoint"
        ) from None
    mask = {name: mask[name] for name in metadata["mask_tensors"] if name in mask}
    if list(mask) != metadata["mask_tensors"] or mask_digest(mask) != metadata["mask_digest"]:
        raise FedSMSError(
            f"the mask in {mask_path} does not match the digest in {json_path}; the checkpoint was modified, use another one"
        )
    for name, keep in mask.items():
        if name not in state or state[name].shape != keep.shape:
            raise FedSMSError(f"mask tensor {name!r} does not fit the state in {model_path}; the checkpoint is damaged")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not in_range(tensor):  # the contract of every soup value
            raise FedSMSError(
                f"tensor {name!r} in {model_path} has NaN or Inf values or values beyond ±{MAX_MAGNITUDE:g}; "
                "the checkpoint is damaged, use another one"
            )
    bad = outside_mask_nonzeros(state, mask)
    if bad:
        raise FedSMSError(
            f"{model_path} has {sum(bad.values())} nonzero weights outside its mask (first in {next(iter(bad))!r}); "
            "it was modified after saving, use another checkpoint"
        )
    return Checkpoint(state, mask, metadata, base)


def _load_dense(base: Path) -> Checkpoint:
    model_path, _, json_path = _paths(base)
    if not model_path.is_file():
        raise FedSMSError(
            f"checkpoint file {model_path} is missing; pass the path of a fedsms checkpoint or a .safetensors state dict"
        )
    metadata: Any = {}
    if json_path.is_file():
        try:
            metadata = json.loads(json_path.read_text())
        except ValueError as error:
            raise FedSMSError(
                f"{json_path} is not valid JSON ({error}); the checkpoint is damaged, use another one"
            ) from None
    if not isinstance(metadata, dict):
        raise FedSMSError(f"{json_path} holds no JSON object; the checkpoint is damaged, use another one")
    try:
        state = load_file(model_path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise FedSMSError(f"{model_path} cannot be read ({error}); the file is damaged, use another one") from None
    return Checkpoint(state, {}, metadata, base)


def check_compatible(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not fit ``model``.

    The checkpoint must hold exactly the model's state-dict names, with the same shapes
    (dtypes are not compared).

    Parameters
    ----------
    checkpoint : Checkpoint
        A checkpoint from ``load_checkpoint``; its ``metadata["model"]`` names it in errors.
    model : torch.nn.Module
        The model it should load into.

    Raises
    ------
    FedSMSError
        If a tensor is missing, has another shape or is not in the model.
    """
    expected = model.state_dict()
    saved_for = checkpoint.metadata.get("model", "another model")
    for name, tensor in expected.items():
        if name not in checkpoint.state or checkpoint.state[name].shape != tensor.shape:
            found = tuple(checkpoint.state[name].shape) if name in checkpoint.state else "nothing"
            raise FedSMSError(
                f"the checkpoint was saved for {saved_for!r} and does not fit this model ({name!r}: expected "
                f"{tuple(tensor.shape)}, found {found}); pass the matching --model or another checkpoint"
            )
    extra = set(checkpoint.state) - set(expected)
    if extra:
        raise FedSMSError(
            f"the checkpoint has tensors this model lacks ({sorted(extra)[:3]}); pass the matching --model"
        )


def export_model(path: str | Path, model: nn.Module, metadata: dict | None = None) -> Path:
    """The model alone: ``X.safetensors`` for a plain ``load_state_dict`` and ``X.json``.

    No mask file is written, so the result is not a checkpoint ``load_checkpoint`` reads;
    the pruned weights are plain zeros in the state dict.

    Parameters
    ----------
    path : str or pathlib.Path
        The base path ``X``, or a file name with a checkpoint suffix (stripped). Missing
        parent directories are created.
    model : torch.nn.Module
        The model whose state dict is saved (as contiguous CPU copies).
    metadata : dict, optional
        JSON-serialisable values written to ``X.json``; None writes ``{}``.

    Returns
    -------
    pathlib.Path
        The path of ``X.safetensors``.

    Raises
    ------
    FedSMSError
        If ``metadata`` is not JSON-serialisable or holds NaN/Inf (nothing is written then).
    """
    try:
        text = json.dumps(metadata or {}, indent=2, allow_nan=False)
    except (TypeError, ValueError):
        bad = next((k for k, v in (metadata or {}).items() if not _serialisable(v)), "?")
        raise FedSMSError(
            f"model metadata key {bad!r} is not JSON-serialisable (NaN, Inf or an object); "
            "pass plain numbers, strings, lists or dicts"
        ) from None
    base = _base(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    model_path, _, json_path = _paths(base)
    _atomic_write(model_path, lambda tmp: save_file(_contiguous(model.state_dict()), tmp))
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    return model_path
