"""The compact model file: a pruned model as small on disk as its nonzeros.

The file (``X.sparse.safetensors``) is a safetensors container holding one uint8 tensor:
the wire codec's soup payload (``fedsms.codec``): the values under the mask in row-major
mask order with no indices, the packed mask bits, every other tensor dense in its own
dtype, the names once in a compressed table, and a CRC-32 against damage. The safetensors
header carries a JSON record: the format, each tensor's name, shape and dtype (compressed),
the mask digest and the source's metadata. Its size is ``itemsize·nnz + N/8`` plus the
dense extras and about 2-4 KB (``compact_bound`` is the raw content).

:func:`load_compact` rebuilds the dense-equivalent state dict: every kept value and every
dense tensor bit for bit, pruned entries as +0.0 (a -0.0 that mask multiplication left
becomes +0.0, as it does for a derived mask). It reads bytes only (no unpickling) and refuses a damaged file in one
sentence.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from fedsms import FedSMSError
from fedsms.checkpoint import MAX_METADATA_BYTES, Checkpoint, check_compatible, load_checkpoint
from fedsms.codec import VALUE_DTYPES, decode, encode, payload_size_bound
from fedsms.masks import Mask, format_report, sparsity, sparsity_report
from fedsms.safefile import write_bytes

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_SUFFIX",
    "compact_bytes",
    "compact_bound",
    "derive_mask",
    "export_compact",
    "inspect_lines",
    "is_compact",
    "load_compact",
    "load_compact_into",
    "save_compact",
]

COMPACT_FORMAT = "fedsms-compact"
COMPACT_VERSION = 1
COMPACT_SUFFIX = ".sparse.safetensors"
MAX_FILE_BYTES = 64 << 30  # a compact file beyond this is not one fedsms wrote for a model that fits in memory
_PAYLOAD = "fedsms.payload"  # the one tensor of the container
_RECORD = "fedsms"  # the safetensors __metadata__ key holding the JSON record
_VALUE_DTYPE_OF = {v[1]: k for k, v in VALUE_DTYPES.items()}  # torch dtype -> codec value dtype name


def derive_mask(state: Mapping[str, torch.Tensor]) -> Mask:
    """The mask of a plain state dict with zeros: its exact zeros, where storing them so pays
    (what ``fedsms export`` stores and ``fedsms inspect`` shows for a model without a mask file).

    A float32/float16/bfloat16 tensor of two or more dimensions (a weight matrix or kernel)
    is masked when its values plus one bit per entry take fewer bytes than the dense tensor
    (more than 1/(8·itemsize) of it is zero). Both +0.0 and -0.0 count as zero (mask
    multiplication leaves -0.0 where a negative weight was pruned); they load back as +0.0.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A state dict, e.g. ``final_model.safetensors`` read with ``safetensors.torch.load_file``.

    Returns
    -------
    Mask
        CPU bool tensors in ``state`` order; empty when nothing pays.
    """
    mask = {}
    for name, tensor in state.items():
        if tensor.dtype in _VALUE_DTYPE_OF and tensor.dim() >= 2:
            keep = tensor.detach().cpu() != 0
            size = tensor.element_size()
            if int(keep.sum()) * size + tensor.numel() / 8 < tensor.numel() * size:
                mask[name] = keep
    return mask


def _value_dtype(state: Mapping[str, torch.Tensor], mask: Mask) -> str:
    """The narrowest codec value dtype that holds every masked tensor exactly."""
    dtypes = {state[name].dtype for name in mask if name in state}
    if torch.float64 in dtypes:
        raise FedSMSError("a masked tensor is float64, which compact values cannot hold exactly; pass a value dtype")
    return _VALUE_DTYPE_OF[dtypes.pop()] if len(dtypes) == 1 else "fp32"


def compact_bytes(
    state: Mapping[str, torch.Tensor],
    mask: Mask | None = None,
    *,
    value_dtype: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """The compact file's content for ``state`` under ``mask``.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The full state dict (any device); zero outside ``mask``.
    mask : Mask, optional
        Which entries are kept; None derives it from the zeros (:func:`derive_mask`).
    value_dtype : str, optional
        ``"fp32"``, ``"fp16"`` or ``"bf16"``: the dtype the masked values are stored in
        (the loader casts them back to each tensor's own dtype; lossy for a narrower
        dtype). None: the narrowest that holds every masked tensor exactly (bit for bit).
    metadata : mapping, optional
        JSON-serialisable values recorded with the model (e.g. a checkpoint's metadata).

    Returns
    -------
    bytes
        A safetensors file.

    Raises
    ------
    FedSMSError
        If ``value_dtype`` is unknown, the mask does not fit ``state``, a value is outside
        the mask, a value overflows ``value_dtype``, or ``metadata`` is not JSON.
    """
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    mask = derive_mask(state) if mask is None else {k: v.to("cpu", torch.bool) for k, v in mask.items()}
    for name, keep in mask.items():
        if name in state and state[name].shape == keep.shape and bool((state[name][~keep] != 0).any()):
            raise FedSMSError(f"tensor {name!r} has nonzero values outside its mask; prune it under this mask first")
    chosen = value_dtype or _value_dtype(state, mask)
    payload = encode(state, mask, phase=0, round=0, kind="soup", value_dtype=chosen)
    layout = [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()]
    record = {
        "format": COMPACT_FORMAT,
        "format_version": COMPACT_VERSION,
        "value_dtype": chosen,
        "exact": value_dtype is None,
        "tensors": base64.b64encode(zlib.compress(json.dumps(layout).encode(), 9)).decode(),
        "sparsity": sparsity(mask),
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(record, allow_nan=False)
    except (TypeError, ValueError):
        raise FedSMSError(
            "the model's metadata is not JSON-serialisable (NaN, Inf or an object); pass plain numbers, strings, "
            "lists or dicts"
        ) from None
    return save({_PAYLOAD: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, metadata={_RECORD: text})


def save_compact(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    mask: Mask | None = None,
    *,
    value_dtype: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the compact file of ``state`` to ``path`` in one rename.

    Parameters
    ----------
    path : str or pathlib.Path
        The file to write (``.sparse.safetensors`` by convention); missing folders are created.
    state, mask, value_dtype, metadata
        As :func:`compact_bytes`.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FedSMSError
        As :func:`compact_bytes`.
    """
    data = compact_bytes(state, mask, value_dtype=value_dtype, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)
    return path


def export_compact(
    source: str | Path | Checkpoint, path: str | Path, *, value_dtype: str | None = None, plan: dict | None = None
) -> Path:
    """The compact file of any model fedsms writes: a checkpoint (its mask), ``final_model``
    or a plain ``.safetensors`` state dict (the mask derived from its zeros).

    Parameters
    ----------
    source : str, pathlib.Path or Checkpoint
        A checkpoint ``X`` (or one of its files), a ``.safetensors`` state dict, or what
        ``load_checkpoint(..., dense_ok=True)`` read from one.
    path : str or pathlib.Path
        The compact file to write.
    value_dtype : str, optional
        As :func:`compact_bytes`.
    plan : dict, optional
        A sparse-inference plan (``SparsePlan.to_dict()``), recorded as ``sparse_plan``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FedSMSError
        If the source is missing or damaged, or as :func:`compact_bytes`.
    """
    checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source, dense_ok=True)
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in ("files", "mask_tensors")}
    if plan is not None:
        metadata["sparse_plan"] = plan
    return save_compact(path, checkpoint.state, checkpoint.mask or None, value_dtype=value_dtype, metadata=metadata)


def _damaged(path: Path, why: str) -> FedSMSError:
    return FedSMSError(f"{path} is not a usable compact model ({why}); export it again with fedsms export")


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1


def _read_record(path: Path, data: bytes) -> dict:
    if not 2 <= _header_length(data) <= min(len(data) - 8, MAX_METADATA_BYTES):
        raise _damaged(path, "its header is truncated")
    try:
        record = json.loads(json.loads(data[8 : 8 + _header_length(data)])["__metadata__"][_RECORD])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise _damaged(path, "its header is not fedsms's") from None
    if not isinstance(record, dict) or record.get("format") != COMPACT_FORMAT:
        raise _damaged(path, "its header is not fedsms's")
    if not isinstance(record.get("format_version"), int) or record["format_version"] > COMPACT_VERSION:
        raise FedSMSError(
            f"{path} has compact format version {record.get('format_version')}; upgrade fedsms to read it"
        )
    return record


def _template(path: Path, record: dict) -> dict[str, torch.Tensor]:
    """The stored names, shapes and dtypes as meta tensors (no memory)."""
    try:
        layout = json.loads(zlib.decompress(base64.b64decode(record["tensors"])))
        return {
            str(name): torch.empty(tuple(int(d) for d in shape), dtype=getattr(torch, dtype), device="meta")
            for name, shape, dtype in layout
        }
    except Exception:  # base64, zlib, JSON and the layout's fields fail in their own ways
        raise _damaged(path, "its tensor list is unreadable") from None


def load_compact(path: str | Path) -> Checkpoint:
    """Read and check a compact file; returns the dense-equivalent state dict.

    Parameters
    ----------
    path : str or pathlib.Path
        A file written by :func:`save_compact` or ``fedsms export``.

    Returns
    -------
    Checkpoint
        ``state``: every tensor in its own dtype and shape, zero outside the mask (CPU);
        ``mask``: the stored mask; ``metadata``: the source's metadata plus
        ``mask_digest``, ``sparsity`` and ``compact`` (the file's own record).

    Raises
    ------
    FedSMSError
        If the file is missing, truncated or altered (the payload's CRC-32, its mask
        digest, or its names, shapes, counts and dtypes against the recorded ones).
    """
    path = Path(path)
    if not path.is_file():
        raise FedSMSError(f"compact model {path} does not exist; pass the file fedsms export wrote")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise _damaged(path, f"it is larger than {MAX_FILE_BYTES >> 30} GiB")
    data = path.read_bytes()
    record = _read_record(path, data)
    template = _template(path, record)
    try:
        tensors = load(data)
    except SafetensorError:
        raise _damaged(path, "its container is truncated or altered") from None
    if list(tensors) != [_PAYLOAD] or tensors[_PAYLOAD].dtype != torch.uint8:
        raise _damaged(path, "it holds other tensors than the payload")
    try:
        decoded = decode(
            tensors[_PAYLOAD].numpy().tobytes(),
            expected_mask=None,
            expected_digest=None,
            template=template,
            expected_kind="soup",
        )
    except FedSMSError as error:
        raise _damaged(path, str(error).rstrip(".")) from None
    state = decoded.to_state_dict(template)
    metadata = {
        **record["metadata"],
        "mask_digest": decoded.mask_digest,
        "sparsity": sparsity(decoded.mask),
        "compact": {k: v for k, v in record.items() if k not in ("metadata", "tensors")},
    }
    return Checkpoint(state, decoded.mask, metadata)


def load_compact_into(model: nn.Module, path: str | Path) -> Checkpoint:
    """Load a compact file into ``model`` with ``load_state_dict(strict=True)``.

    Parameters
    ----------
    model : torch.nn.Module
        The model the file was exported from (same architecture).
    path : str or pathlib.Path
        The compact file.

    Returns
    -------
    Checkpoint
        What :func:`load_compact` read.

    Raises
    ------
    FedSMSError
        If the file is refused by :func:`load_compact` or its tensors do not fit ``model``.
    """
    checkpoint = load_compact(path)
    check_compatible(checkpoint, model)
    model.load_state_dict(checkpoint.state, strict=True)
    return checkpoint


def compact_bound(state: Mapping[str, torch.Tensor], mask: Mask, value_dtype: str | None = None) -> int:
    """The raw content of a compact file: itemsize·nnz of the values, ceil(N/8) of mask
    bits and the dense extras' bytes (no names, no header).

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The full state dict (only sizes are read).
    mask : Mask
        The mask the values are stored under.
    value_dtype : str, optional
        As :func:`compact_bytes` (None: the dtype it would choose).

    Returns
    -------
    int
        Bytes.
    """
    return payload_size_bound(mask, state, value_dtype or _value_dtype(state, mask), kind="soup")


def is_compact(path: str | Path) -> bool:
    """Whether ``path`` is a file in the compact format (by its header; the data is not checked).

    Parameters
    ----------
    path : str or pathlib.Path
        Any path.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(8)
        if not 2 <= _header_length(head) <= MAX_METADATA_BYTES:
            return False
        header = f.read(_header_length(head))
    return b'"fedsms"' in header and COMPACT_FORMAT.encode() in header


def inspect_lines(path: str | Path, checkpoint: Checkpoint | None = None) -> list[str]:
    """What ``fedsms inspect`` shows about deployment: for a checkpoint, the size its compact
    file would have; for a compact file, its sparsity table, size, recorded sparse-inference
    plan and metadata.

    Parameters
    ----------
    path : str or pathlib.Path
        The path given to ``fedsms inspect``.
    checkpoint : Checkpoint, optional
        The checkpoint already read from ``path``; None reads ``path`` as a compact file.

    Returns
    -------
    list of str
        Lines to print.

    Raises
    ------
    FedSMSError
        If ``checkpoint`` is None and ``path`` is not a usable compact file.
    """
    if checkpoint is not None:
        mask = checkpoint.mask or derive_mask(checkpoint.state)
        dense = sum(t.numel() * t.element_size() for t in checkpoint.state.values())
        exact = len(compact_bytes(checkpoint.state, mask))
        half = len(compact_bytes(checkpoint.state, mask, value_dtype="fp16"))
        return [
            f"compact file (fedsms export): {exact:,} bytes exact ({exact / dense:.3f} x the dense tensors' "
            f"{dense:,}), {half:,} with fp16 values"
        ]
    compact = load_compact(path)
    size = Path(path).stat().st_size
    dense = sum(t.numel() * t.element_size() for t in compact.state.values())
    record = compact.metadata["compact"]
    exact = "exact" if record["exact"] else "rounded"
    lines = [
        format_report(sparsity_report(compact.mask)),
        "",
        f"compact file: {size:,} bytes ({size / dense:.3f} x the dense tensors' {dense:,}), "
        f"{record['value_dtype']} values ({exact})",
    ]
    if compact.metadata.get("sparse_plan"):
        from fedsms.sparse_inference import format_plan

        lines += ["", format_plan(compact.metadata["sparse_plan"])]
    shown = {k: v for k, v in compact.metadata.items() if k not in ("config", "sparse_plan")}
    return [*lines, "", json.dumps(shown, indent=2, default=str)]
