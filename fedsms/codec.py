"""The versioned wire codec of the sparse payload (schema: ``proto/fedsms/v1/payload.proto``).

A payload is one sparse model state on the wire: the soup going out (``kind="soup"``,
server -> client, with the packed mask bits), a retrained candidate coming back
(``kind="update"``, client -> server, without mask bits: the server knows the mask), or
norm-layer statistics (``kind="norm_stats"``, no mask bits). The kind alone decides whether
the mask travels (:func:`carries_mask`). Pruned tensors travel as the values under
the mask in row-major mask order with no indices (``itemsize * nnz`` bytes each); every
other state entry (biases, norm layers, running statistics, ``num_batches_tracked``, any
non-prunable parameter) travels dense in its own dtype. The tensor names travel once, in a
zlib-compressed table, rather than in every entry: for a ResNet-20 (128 tensors) that takes
the payload's overhead over its raw bytes from about 5.8 KB to 2.5 KB.

How it rides in Flower: ``encode`` returns and ``decode`` takes one opaque ``bytes`` value;
nothing in Flower looks inside it. The apps wrap it once (``fedsms_flower.records``: a 1-D
uint8 array in an ``ArrayRecord``, which Flower moves in chunks; a bytes entry of a
``ConfigRecord`` would work as well), so this module stays free of Flower.

``decode`` trusts nothing and reads in stages: open (the CRC-32 trailer against truncation
and corruption, then the parse), header (codec version, kind, phase, round, value dtype),
names (the name table), mask (shipped or expected, against the header's digest), masked
values, dense extras. Every tensor (names, order, shapes, counts, byte lengths, dtypes,
finiteness) is checked against what the receiver expects, and any mismatch raises
:class:`PayloadError` with one sentence, before a single value reaches a model or a running
average.

Codec version 2 dropped version 1's second layout, in which entries named themselves
instead of using the name table; a payload of any other version is refused.
"""

from __future__ import annotations

import copy
import math
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as _field

import numpy as np
import torch
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from fedsms import FedSMSError
from fedsms.masks import Mask, mask_digest, pack_mask, unpack_mask
from fedsms.wire import payload_pb2 as pb

__all__ = [
    "CODEC_VERSION",
    "KINDS",
    "VALUE_DTYPES",
    "PayloadError",
    "Decoded",
    "carries_mask",
    "encode",
    "decode",
    "payload_size_bound",
    "MAX_MAGNITUDE",
    "MAX_EXAMPLES",
    "in_range",
    "extent",
    "UpdateReader",
    "FlatReply",
    "FlatLayout",
]

CODEC_VERSION = 3

KINDS = {"soup": pb.PAYLOAD_KIND_SOUP, "update": pb.PAYLOAD_KIND_UPDATE, "norm_stats": pb.PAYLOAD_KIND_NORM_STATS}
_KIND_NAMES = {v: k for k, v in KINDS.items()}

# value dtype name -> (wire enum, torch dtype on the wire, itemsize)
VALUE_DTYPES = {
    "fp32": (pb.VALUE_DTYPE_FP32, torch.float32, 4),
    "fp16": (pb.VALUE_DTYPE_FP16, torch.float16, 2),
    "bf16": (pb.VALUE_DTYPE_BF16, torch.bfloat16, 2),
}
_VALUE_DTYPE_NAMES = {v[0]: k for k, v in VALUE_DTYPES.items()}

# dense dtype name -> torch dtype; bfloat16 moves as its raw 16 bits (numpy has no bf16)
_DENSE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DENSE_NAMES = {v: k for k, v in _DENSE_DTYPES.items()}
# dense torch dtype <-> wire enum (codec version 3; version 2 sent the name as a string)
_DENSE_ENUMS = {
    torch.float32: pb.DENSE_DTYPE_FLOAT32,
    torch.float16: pb.DENSE_DTYPE_FLOAT16,
    torch.bfloat16: pb.DENSE_DTYPE_BFLOAT16,
    torch.float64: pb.DENSE_DTYPE_FLOAT64,
    torch.int64: pb.DENSE_DTYPE_INT64,
    torch.int32: pb.DENSE_DTYPE_INT32,
    torch.int16: pb.DENSE_DTYPE_INT16,
    torch.int8: pb.DENSE_DTYPE_INT8,
    torch.uint8: pb.DENSE_DTYPE_UINT8,
    torch.bool: pb.DENSE_DTYPE_BOOL,
}
_ENUM_DENSE = {v: k for k, v in _DENSE_ENUMS.items()}
# torch dtype -> little-endian numpy dtype of its wire bytes, built once (decode reads ~100 tensors per reply)
_WIRE_NUMPY = {
    t: np.dtype(np.bool_ if t == torch.bool else n).newbyteorder("<")
    for n, t in _DENSE_DTYPES.items()
    if t != torch.bfloat16
}

# The CRC-32 of the trailer (zlib's polynomial and values): ISA-L's where the optional
# "fast" extra installs it (PCLMULQDQ folding, ~3.4x zlib's speed on a 4.5 MB reply), else
# zlib's. The checksum is the same either way; only its speed differs (it bounds how fast a
# checked reply can be read).
try:
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - depends on the installed extras
    _crc32 = zlib.crc32
    CRC32_IMPLEMENTATION = "zlib"

# The integrity trailer: field 15 (crc32), wire type 5 (fixed32) -> tag byte 0x7D, then 4 bytes.
_TRAILER_TAG = bytes([(15 << 3) | 5])
_TRAILER_LEN = 5


class PayloadError(FedSMSError):
    """A payload that cannot be used: unreadable, or not the one the receiver expects."""


def carries_mask(kind: str) -> bool:
    """Whether a payload of ``kind`` carries its packed mask bits: only a soup does (it goes
    to clients that do not hold the mask yet); replies are read with the receiver's mask.

    Parameters
    ----------
    kind : str
        A payload kind: ``"soup"``, ``"update"`` or ``"norm_stats"``.

    Returns
    -------
    bool
        True for ``"soup"``, False for every other string.
    """
    return kind == "soup"


# ---- encoding ----------------------------------------------------------------------


def encode(
    state: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    phase: int,
    round: int,
    kind: str,
    value_dtype: str = "fp32",
    num_examples: int = 0,
    check_finite: bool = True,
) -> bytes:
    """Serialise ``state`` as a sparse payload under ``mask``.

    Every tensor of ``mask`` (in mask order) sends ``state[name][mask[name]]`` cast to
    ``value_dtype`` (``"fp32"``, ``"fp16"`` or ``"bf16"``); every other entry of ``state``
    goes dense in its own dtype, in state order. ``kind`` (``"soup"``, ``"update"`` or
    ``"norm_stats"``) decides whether the packed mask bits go too (:func:`carries_mask`).
    With ``check_finite`` (the default) a NaN/Inf among the values about to be sent,
    including fp16 overflow beyond ±65504, raises :class:`PayloadError` here rather than
    at the receiver. A ``fedsms.merge.Soup`` under ``mask`` is written from its blocks as
    they are (its values are already under the mask: no gather, no dense state); the bytes
    are the same as for its full state dict.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The state dict to send (any device), or a ``fedsms.merge.Soup``; it must hold every
        tensor ``mask`` names.
    mask : Mask
        The mask the values are read under; its digest goes in the header.
    phase : int
        The phase the payload belongs to, >= 0 (checked by ``decode``'s ``expected_phase``).
    round : int
        The round within the phase, >= 0 (checked by ``decode``'s ``expected_round``).
    kind : str
        ``"soup"``, ``"update"`` or ``"norm_stats"``.
    value_dtype : str, default "fp32"
        Wire dtype of the masked values: ``"fp32"``, ``"fp16"`` or ``"bf16"``. Dense
        entries always keep their own dtype.
    num_examples : int, default 0
        The sender's example count (the weight of an update), >= 0; carried unchecked.
    check_finite : bool, default True
        Refuse NaN/Inf among the values as they will be sent.

    Returns
    -------
    bytes
        The serialised payload with its CRC-32 trailer.

    Raises
    ------
    PayloadError
        If ``kind`` or ``value_dtype`` is unknown, ``phase``, ``round`` or ``num_examples``
        is negative, the mask names a tensor the state lacks or of another shape, a tensor
        has a dtype the codec cannot send, a tensor name is empty or has a newline, or
        (with ``check_finite``) a value is NaN or Inf.
    """
    if kind not in KINDS:
        raise PayloadError(f"unknown payload kind {kind!r}; use one of {', '.join(KINDS)}")
    if value_dtype not in VALUE_DTYPES:
        raise PayloadError(f"unknown value dtype {value_dtype!r}; use one of {', '.join(VALUE_DTYPES)}")
    if phase < 0 or round < 0:
        raise PayloadError(f"phase and round must be non-negative, got phase {phase} and round {round}")
    if num_examples < 0:
        raise PayloadError(f"num_examples must be non-negative, got {num_examples}")
    enum, wire_dtype, _ = VALUE_DTYPES[value_dtype]

    message = pb.SparsePayload(num_examples=int(num_examples))
    header = message.header
    header.codec_version = CODEC_VERSION
    header.phase = int(phase)
    header.round = int(round)
    header.mask_digest = mask_digest(mask)
    header.value_dtype = enum
    header.kind = KINDS[kind]

    compact = getattr(state, "blocks_under", None)  # a fedsms.merge.Soup: values already under the mask
    compact = compact(mask) if callable(compact) else None
    if compact is not None:
        values = compact[0].to(wire_dtype)
        extras = list(state.layout.extras(compact[1]).items())
        if check_finite and not (in_range(values) and all(in_range(t) for _, t in extras if t.is_floating_point())):
            compact = None  # the tensor-by-tensor path below names the one that fails
    if compact is not None:
        for keep, count in zip(mask.values(), state.layout.counts):
            entry = message.masked.add()
            entry.shape.extend(keep.shape)
            entry.nnz = count
    else:
        values, extras = _under_mask(state, mask, wire_dtype, value_dtype, check_finite, message)
    message.values = _tensor_bytes(values)

    if carries_mask(kind):
        message.mask_bits = pack_mask(mask)

    for _, tensor in extras:
        entry = message.dense.add()
        entry.shape.extend(tensor.shape)
        entry.dtype = _DENSE_ENUMS[tensor.dtype]
    message.dense_data = b"".join(_tensor_bytes(tensor) for _, tensor in extras)

    message.names = _name_table([*mask, *(name for name, _ in extras)])
    return _seal(message)


def _under_mask(
    state: Mapping[str, torch.Tensor],
    mask: Mask,
    wire_dtype: torch.dtype,
    value_dtype: str,
    check_finite: bool,
    message: pb.SparsePayload,
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """``encode``'s gather from a full state: every masked tensor's kept values (its entry
    added to ``message``) in one flat block of ``wire_dtype``, and the dense extras in the
    order they travel (largest elements first, state order within a size: every extra
    starts aligned in the block)."""
    blocks: list[torch.Tensor] = []
    for name, keep in mask.items():
        if name not in state:
            raise PayloadError(
                f"the mask names tensor {name!r} which the state does not have; encode with the mask of this model"
            )
        tensor = state[name].detach()
        if tuple(tensor.shape) != tuple(keep.shape):
            raise PayloadError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but its mask {tuple(keep.shape)}; "
                f"encode with the mask of this model"
            )
        values = tensor.to("cpu")[keep.to("cpu", torch.bool)].to(wire_dtype)
        if check_finite and values.is_floating_point() and not in_range(values):
            raise PayloadError(
                f"tensor {name!r} has NaN or Inf values under the mask (as {value_dtype}); "
                f"the training diverged or the values overflow {value_dtype}"
            )
        entry = message.masked.add()
        entry.shape.extend(keep.shape)
        entry.nnz = values.numel()
        blocks.append(values)
    extras: list[tuple[str, torch.Tensor]] = []
    for name, tensor in state.items():
        if name in mask:
            continue
        tensor = tensor.detach().to("cpu")
        if tensor.dtype not in _DENSE_NAMES:
            raise PayloadError(
                f"tensor {name!r} has dtype {tensor.dtype} which the codec cannot send; convert it to float32"
            )
        if check_finite and tensor.is_floating_point() and not in_range(tensor):
            raise PayloadError(f"tensor {name!r} has NaN or Inf values; the training diverged")
        extras.append((name, tensor))
    extras.sort(key=lambda item: -item[1].element_size())
    return (torch.cat(blocks) if blocks else torch.zeros(0, dtype=wire_dtype)), extras


def _name_table(names: list[str]) -> bytes:
    for name in names:
        if not name or "\n" in name:
            raise PayloadError(f"tensor name {name!r} cannot be sent; names must be non-empty and on one line")
    return zlib.compress("\n".join(names).encode(), 9)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``tensor`` in row-major order (one vectorised copy)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    array = tensor.numpy()
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


_LITTLE = np.little_endian


_ALIGN = 16  # each bulk block starts at a multiple of this from the start of the payload
_PAD_TAG, _VALUES_TAG, _DENSE_TAG = (9 << 3) | 2, (7 << 3) | 2, (8 << 3) | 2


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _seal(message: pb.SparsePayload) -> bytes:
    """The payload on the wire: padding, ``values``, padding, ``dense_data`` (each block
    aligned to 16 bytes), the other fields, then the CRC-32 trailer (see the .proto)."""
    values, dense = message.values, message.dense_data
    for field in ("values", "dense_data", "padding", "crc32"):
        message.ClearField(field)
    parts: list[bytes] = []
    at = 0
    for tag, block in ((_VALUES_TAG, values), (_DENSE_TAG, dense)):
        prefix = bytes([tag]) + _varint(len(block))
        pad = -(at + 2 + len(prefix)) % _ALIGN
        parts += [bytes([_PAD_TAG, pad]) + bytes(pad) + prefix, block]
        at += 2 + pad + len(prefix) + len(block)
    parts.append(message.SerializeToString())
    body = b"".join(parts)
    return body + _TRAILER_TAG + struct.pack("<I", _crc32(body))


# ---- decoding ----------------------------------------------------------------------


@dataclass
class Decoded:
    """A validated payload. ``values`` holds, per masked tensor, its nnz values as a 1-D
    float32 tensor in mask order; ``dense`` the dense extras in their own dtype.

    Made by :func:`decode`; everything in it has been checked against the receiver's
    template and mask.

    Attributes
    ----------
    codec_version : int
        The codec version of the payload (always ``CODEC_VERSION``).
    kind : str
        ``"soup"``, ``"update"`` or ``"norm_stats"``.
    phase : int
        The phase named in the header.
    round : int
        The round named in the header.
    mask_digest : str
        The header's mask digest (hex sha256, see ``mask_digest``).
    value_dtype : str
        Wire dtype of the masked values: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    mask : Mask
        The mask the values were read with (the shipped one for a soup, else the
        receiver's), CPU bool tensors.
    values : dict of str to torch.Tensor
        Per masked tensor, in mask order, its kept values as a 1-D float32 CPU tensor.
    dense : dict of str to torch.Tensor
        Every other template entry, in template order, in its own dtype and shape.
    num_examples : int
        The sender's example count, unchecked.
    nbytes : int
        Size of the payload in bytes, trailer included.
    """

    codec_version: int
    kind: str
    phase: int
    round: int
    mask_digest: str
    value_dtype: str
    mask: Mask
    values: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    num_examples: int
    nbytes: int = 0

    @property
    def mask_included(self) -> bool:
        """Whether the payload shipped its mask bits (its kind decides: :func:`carries_mask`)."""
        return carries_mask(self.kind)

    def to_state_dict(self, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state dict, in ``template`` order: masked tensors are zero outside the
        mask with the values scattered under it; dense extras as sent.

        Parameters
        ----------
        template : mapping of str to torch.Tensor
            The receiver's state dict (names, shapes and dtypes are read), usually the one
            given to ``decode``.

        Returns
        -------
        dict of str to torch.Tensor
            CPU tensors in the template's dtypes, ready for ``model.load_state_dict``.

        Raises
        ------
        PayloadError
            If the template names a tensor the payload lacks or of another shape.
        """
        from fedsms.merge import state_from_values  # merge imports the codec

        return state_from_values({**self.values, **self.dense}, self.mask, template)

    def load_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write the full state into the tensors of ``state`` in place (``model.state_dict()``:
        the model's own parameters and buffers), as ``model.load_state_dict(to_state_dict(...))``
        would leave them, without building and copying a full state dict.

        Parameters
        ----------
        state : mapping of str to torch.Tensor
            The receiver's tensors (any device), usually the template given to ``decode``.

        Raises
        ------
        PayloadError
            If ``state`` names a tensor the payload lacks or of another shape; nothing is
            written then.
        """
        from fedsms.merge import load_values  # merge imports the codec

        load_values({**self.values, **self.dense}, self.mask, state)


def decode(
    data: bytes,
    *,
    expected_mask: Mask | None,
    expected_digest: str | None,
    template: Mapping[str, torch.Tensor],
    expected_phase: int | None = None,
    expected_round: int | None = None,
    expected_kind: str | None = None,
) -> Decoded:
    """Parse and validate a payload against what the receiver expects.

    ``template`` (e.g. ``model.state_dict()``; only names, shapes and dtypes are read) names
    every tensor the payload must carry. A soup is read with the mask it ships; any other
    kind with ``expected_mask``, which it then needs. ``expected_digest``, when given, is
    the digest the header must name (and is taken as ``expected_mask``'s digest; without it
    the digest of ``expected_mask`` is computed). ``expected_phase``, ``expected_round`` and
    ``expected_kind`` are checked when given. Any mismatch raises :class:`PayloadError`.
    ``num_examples`` is exposed unchecked: plausibility is the caller's call.

    Parameters
    ----------
    data : bytes
        The payload as ``encode`` produced it (``bytearray`` and ``memoryview`` are accepted).
    expected_mask : Mask or None
        The receiver's mask. Required for every kind but ``"soup"``; for a soup, when given,
        the shipped mask must be this one.
    expected_digest : str or None
        The digest the header must name; None: computed from ``expected_mask`` (if any).
        Trusted to be ``expected_mask``'s digest when both are given.
    template : mapping of str to torch.Tensor
        Every tensor the payload must carry, with its shape and dtype.
    expected_phase : int, optional
        The phase the header must name; None: not checked.
    expected_round : int, optional
        The round the header must name; None: not checked.
    expected_kind : str, optional
        The kind the header must name; None: any kind.

    Returns
    -------
    Decoded
        The validated content; ``Decoded.to_state_dict`` gives the full state dict.

    Raises
    ------
    PayloadError
        If the payload is not bytes, truncated, corrupted or unparsable; of another codec
        version, kind, phase or round than expected; made for another mask; or if its
        names, shapes, counts, byte lengths or dtypes differ from the template and mask,
        or a value is NaN or Inf.
    """
    template = dict(template)
    message, view, value_span, dense_span = _open(data, fields_bound(template, expected_kind), expected_kind)
    kind, value_dtype = _check_header(message.header, expected_kind, expected_phase, expected_round)
    names, dense_names = _names(message)
    mask = _mask(message, kind, names, expected_mask, expected_digest, template)
    values = _masked_values(message, names, mask, template, value_dtype, view, value_span)
    dense = _dense_extras(message, dense_names, mask, template, view, dense_span)
    header = message.header
    return Decoded(
        codec_version=header.codec_version,
        kind=kind,
        phase=header.phase,
        round=header.round,
        mask_digest=header.mask_digest,
        value_dtype=value_dtype,
        mask=mask,
        values=values,
        dense=dense,
        num_examples=int(message.num_examples),
        nbytes=len(view),
    )


def fields_bound(template: Mapping[str, torch.Tensor], kind: str | None) -> int:
    """The most bytes the fields after a payload's two blocks (header, name table, entries,
    mask bits, example count) can take for ``template``, however they are written: a
    payload whose other fields are longer is refused before they are parsed (protobuf
    builds every unknown field as a Python object, about 0.6 s and 30 MiB per MB).

    Parameters
    ----------
    template : mapping of str to torch.Tensor
        The receiver's state (names, shapes).
    kind : str or None
        The expected kind; mask bits count only for ``"soup"`` (or an unknown kind).

    Returns
    -------
    int
        The bound in bytes.
    """
    names = sum(len(name.encode("utf-8")) + 1 for name in template)
    entries = sum(32 + 11 * tensor.dim() for tensor in template.values())  # tag, length, shape, nnz, dtype
    bits = math.ceil(sum(t.numel() for t in template.values()) / 8) + 16 if kind in (None, "soup") else 0
    return 1024 + names + names // 100 + entries + bits  # 1024: header, example count, framing


def _open(
    data: bytes, limit: int, expected_kind: str | None
) -> tuple[pb.SparsePayload, memoryview, tuple[int, int], tuple[int, int]]:
    """Stage 1: bytes with an intact CRC-32 trailer, laid out as codec version 3 lays them
    out (padding, values, padding, dense data, the rest), whose other fields take at most
    ``limit`` bytes (``fields_bound``, checked before they are parsed; ``expected_kind`` names
    a mismatch of the header first) and parse as a
    payload of this schema. Returns the parsed other fields, the payload's buffer and the
    (offset, length) of the values and of the dense-data blocks in it: they are read in
    place, never copied here."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload is bytes, not {type(data).__name__}")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    size = len(view)
    if size < _TRAILER_LEN or view[size - _TRAILER_LEN] != _TRAILER_TAG[0]:
        raise PayloadError(
            f"the payload ({size} bytes) is truncated or not a fedsms payload: its checksum trailer is missing"
        )
    (crc,) = struct.unpack("<I", view[size - 4 :])
    if _crc32(view[: size - _TRAILER_LEN]) != crc:
        raise PayloadError(f"the payload ({size} bytes) is truncated or corrupted: its checksum does not match")
    split = _split(view, size - _TRAILER_LEN)
    if split is None:
        _refuse_layout(view)
    values, dense, rest = split
    if size - _TRAILER_LEN - rest > limit:
        _refuse_fields(view[rest : size - _TRAILER_LEN], limit, expected_kind)
    try:
        message = pb.SparsePayload.FromString(view[rest : size - _TRAILER_LEN].tobytes())
    except DecodeError as error:
        raise PayloadError(f"the payload cannot be parsed ({error})") from None
    if message.values or message.dense_data or len(message.padding):
        raise PayloadError(
            f"the payload has a values, dense-data or padding field after its blocks; codec version "
            f"{CODEC_VERSION} writes each once, first"
        )
    if not message.HasField("header"):
        raise PayloadError("the payload has no header; it is not a fedsms payload")
    return message, view, values, dense


def _refuse_fields(fields: memoryview, limit: int, expected_kind: str | None) -> None:
    """Fields longer than ``limit``: refused unparsed; when the header (field 1, which
    ``encode`` writes first) reads on its own, its version or kind mismatch is named first."""
    if len(fields) > 2 and fields[0] == 0x0A and fields[1] < 0x80:  # field 1, a one-byte length
        try:
            header = pb.Header.FromString(fields[2 : 2 + fields[1]].tobytes())
        except DecodeError:
            header = None
        if header is not None:
            _check_header(header, expected_kind, None, None)
    raise PayloadError(
        f"the payload has {len(fields)} bytes of fields besides its values, more than a payload for the model can "
        f"hold ({limit}); it was written for another model, or it is not a fedsms payload"
    )


def _split(view: memoryview, end: int) -> tuple[tuple[int, int], tuple[int, int], int] | None:
    """The (offset, length) of the values and dense-data blocks and where the other fields
    start, or None where the payload does not open with padding, values, padding, dense data."""
    at, spans = 0, []
    for tag in (_VALUES_TAG, _DENSE_TAG):
        if at + 2 > end or view[at] != _PAD_TAG or view[at + 1] >= _ALIGN:
            return None
        pad = view[at + 1]
        at += 2
        if at + pad > end or view[at : at + pad].tobytes().count(0) != pad:
            return None
        at += pad
        if at >= end or view[at] != tag:
            return None
        length, shift, at = 0, 0, at + 1
        while True:
            if at >= end or shift > 63:
                return None
            byte = view[at]
            length |= (byte & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not byte & 0x80:
                break
        if at + length > end:
            return None
        spans.append((at, length))
        at += length
    return spans[0], spans[1], at


def _refuse_layout(view: memoryview) -> None:
    """A payload not laid out as this version lays them out: name its version when it has one."""
    try:
        message = pb.SparsePayload.FromString(view[: len(view) - _TRAILER_LEN].tobytes())
    except DecodeError as error:
        raise PayloadError(f"the payload cannot be parsed ({error})") from None
    if not message.HasField("header"):
        raise PayloadError("the payload has no header; it is not a fedsms payload")
    version = message.header.codec_version
    if version != CODEC_VERSION:
        raise PayloadError(
            f"the payload uses codec version {version} but this fedsms reads version "
            f"{CODEC_VERSION}; run the same fedsms release on the server and every client"
        )
    raise PayloadError(
        f"the payload does not open with its values and dense-data blocks, as codec version {CODEC_VERSION} "
        f"lays them out; it is not a version {CODEC_VERSION} payload"
    )


def _check_header(
    header: pb.Header, expected_kind: str | None, expected_phase: int | None, expected_round: int | None
) -> tuple[str, str]:
    """Stage 2: this codec version, a known kind and value dtype, the expected kind, phase
    and round. Returns the kind and the value dtype by name."""
    if header.codec_version != CODEC_VERSION:
        raise PayloadError(
            f"the payload uses codec version {header.codec_version} but this fedsms reads version "
            f"{CODEC_VERSION}; run the same fedsms release on the server and every client"
        )
    kind = _KIND_NAMES.get(header.kind)
    if kind is None:
        raise PayloadError(f"the payload has an unknown kind ({header.kind})")
    if expected_kind is not None and kind != expected_kind:
        raise PayloadError(f"expected a {expected_kind!r} payload but got a {kind!r} payload")
    if expected_phase is not None and header.phase != expected_phase:
        raise PayloadError(
            f"the payload is from phase {header.phase} but phase {expected_phase} is running; it is stale or early"
        )
    if expected_round is not None and header.round != expected_round:
        raise PayloadError(
            f"the payload is from round {header.round} but round {expected_round} is running; it is stale or early"
        )
    value_dtype = _VALUE_DTYPE_NAMES.get(header.value_dtype)
    if value_dtype is None:
        raise PayloadError(f"the payload has an unknown value dtype ({header.value_dtype})")
    return kind, value_dtype


def _names(message: pb.SparsePayload) -> tuple[list[str], list[str]]:
    """Stage 3: the names of the masked and of the dense entries, from the name table (the
    only place they travel)."""
    if any(len(UnknownFieldSet(part)) for part in (message, message.header, *message.masked, *message.dense)):
        raise PayloadError(
            f"the payload has fields that codec version {CODEC_VERSION} does not declare (e.g. entries that "
            f"name themselves, as version 1 allowed); it is not a version {CODEC_VERSION} payload"
        )
    if not message.names:
        raise PayloadError("the payload has no name table; it is not a fedsms payload")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(message.names, _MAX_NAME_TABLE)
        if inflater.unconsumed_tail or not inflater.eof:
            raise PayloadError(f"the payload's name table is damaged or larger than {_MAX_NAME_TABLE} bytes")
        names = text.decode("utf-8").split("\n") if text else []
    except (zlib.error, UnicodeDecodeError):
        raise PayloadError("the payload's name table cannot be read") from None
    entries = len(message.masked) + len(message.dense)
    if len(names) != entries:
        raise PayloadError(f"the payload's name table lists {len(names)} tensors but the payload carries {entries}")
    return names[: len(message.masked)], names[len(message.masked) :]


_MAX_NAME_TABLE = 1 << 24  # bytes of names a payload may inflate to


def _mask(
    message: pb.SparsePayload,
    kind: str,
    names: list[str],
    expected_mask: Mask | None,
    expected_digest: str | None,
    template: dict,
) -> Mask:
    """Stage 4: the mask to read the values with: the shipped one for a soup, else the
    expected one; either way the one the header's digest names."""
    _check_expected_mask(message.header.mask_digest, expected_mask, expected_digest, template)
    if not carries_mask(kind):
        if message.mask_bits:
            raise PayloadError(
                f"a {kind!r} payload carries no mask bits (the receiver knows the mask) but this one has "
                f"{len(message.mask_bits)} bytes of them"
            )
        if expected_mask is None:
            raise PayloadError(f"a {kind!r} payload carries no mask bits and the receiver has no mask to read it with")
        return {n: m.to("cpu", torch.bool) for n, m in expected_mask.items()}
    if expected_mask is not None:
        shapes = {n: tuple(m.shape) for n, m in expected_mask.items()}
    else:
        shapes = _masked_shapes(message, names, template)
    if shapes and not message.mask_bits:
        raise PayloadError(f"a {kind!r} payload carries its mask bits but this one has none")
    try:
        mask = unpack_mask(message.mask_bits, shapes)
    except FedSMSError as error:
        raise PayloadError(f"the payload's mask does not fit the model: {error}") from None
    if mask_digest(mask) != message.header.mask_digest:
        raise PayloadError("the payload's mask bits do not match the mask digest in its header")
    return mask


def _check_expected_mask(digest: str, expected_mask: Mask | None, expected_digest: str | None, template: dict) -> None:
    """The header names the receiver's mask (when it has one), and that mask fits the model."""
    held = expected_digest
    if held is None and expected_mask is not None:
        held = mask_digest(expected_mask)
    if held is not None and digest != held:
        raise PayloadError(
            f"the payload was made for mask {digest[:12]} but the receiver holds mask {held[:12]}; "
            f"it belongs to another phase or run"
        )
    for name, keep in (expected_mask or {}).items():
        if name not in template:
            raise PayloadError(f"the expected mask names tensor {name!r} which the model does not have")
        if tuple(keep.shape) != tuple(template[name].shape):
            raise PayloadError(
                f"the expected mask of {name!r} has shape {tuple(keep.shape)} but the model's is {tuple(template[name].shape)}"
            )


def _masked_shapes(message: pb.SparsePayload, names: list[str], template: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of a shipped mask, read from its masked entries (each a model tensor, once)."""
    shapes = {}
    for name, entry in zip(names, message.masked):
        if name not in template:
            raise PayloadError(f"the payload has masked tensor {name!r} which the model does not have")
        if name in shapes:
            raise PayloadError(f"the payload has masked tensor {name!r} twice")
        if tuple(entry.shape) != tuple(template[name].shape):
            raise PayloadError(
                f"tensor {name!r} has shape {tuple(entry.shape)} in the payload but "
                f"{tuple(template[name].shape)} in the model"
            )
        shapes[name] = tuple(entry.shape)
    return shapes


def _masked_values(
    message: pb.SparsePayload,
    names: list[str],
    mask: Mask,
    template: dict,
    value_dtype: str,
    view: memoryview,
    span: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Stage 5: exactly the mask's tensors, in mask order, each its nnz finite values as
    float32 (views of one float32 copy of the values block)."""
    if names != list(mask):
        raise PayloadError(f"the payload's masked tensors {_name_diff(names, list(mask))}")
    _, wire_dtype, itemsize = VALUE_DTYPES[value_dtype]
    counts = _kept_counts(mask, message.header.mask_digest)  # the digest is the mask's, checked in stage 4
    for name, entry in zip(names, message.masked):
        like = template[name]
        if tuple(entry.shape) != tuple(like.shape):
            raise PayloadError(
                f"tensor {name!r} has shape {tuple(entry.shape)} in the payload but {tuple(like.shape)} in the model"
            )
        if entry.nnz != counts[name]:
            raise PayloadError(f"tensor {name!r} claims {entry.nnz} values but the mask keeps {counts[name]}")
    sizes = [counts[name] for name in names]
    total = sum(sizes)
    if span[1] != total * itemsize:
        raise PayloadError(
            f"the payload has {span[1]} bytes of values but {total} {value_dtype} values need {total * itemsize}"
        )
    flat = _view(view, span[0], total, wire_dtype)
    if not in_range(flat):
        raise PayloadError(
            f"{_first_bad(flat, names, sizes)} has NaN or Inf values or values beyond ±{MAX_MAGNITUDE:g}"
        )
    return dict(zip(names, flat.to(torch.float32, copy=True).split(sizes)))


def _first_bad(flat: torch.Tensor, names: list[str], sizes: list[int]) -> str:
    """``tensor 'name'`` for the first tensor of a flat block with a value it may not carry."""
    for name, part in zip(names, flat.split(sizes)):
        if not in_range(part):
            return f"tensor {name!r}"
    return "a tensor"


def _dense_extras(
    message: pb.SparsePayload,
    dense_names: list[str],
    mask: Mask,
    template: dict,
    view: memoryview,
    span: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Stage 6: every template entry outside the mask, once each, in its own dtype, finite;
    returned in template order (copies: the payload's buffer is not kept)."""
    wanted = [n for n in template if n not in mask]
    if len(set(dense_names)) != len(dense_names) or set(dense_names) != set(wanted):
        raise PayloadError(f"the payload's dense tensors {_name_diff(dense_names, wanted)}")
    layout = []
    for name, entry in zip(dense_names, message.dense):
        like = template[name]
        if tuple(entry.shape) != tuple(like.shape):
            raise PayloadError(
                f"tensor {name!r} has shape {tuple(entry.shape)} in the payload but {tuple(like.shape)} in the model"
            )
        dtype = _ENUM_DENSE.get(entry.dtype)
        if dtype is None:
            raise PayloadError(f"tensor {name!r} has an unknown dtype ({entry.dtype}) in the payload")
        if dtype != like.dtype:
            raise PayloadError(
                f"tensor {name!r} has dtype {_dtype_name(dtype)!r} in the payload but {_dtype_name(like.dtype)!r} in the model"
            )
        layout.append((name, like))
    need = sum(like.numel() * like.element_size() for _, like in layout)
    if span[1] != need:
        raise PayloadError(
            f"the payload has {span[1]} bytes of dense data but its dense tensors' shapes and dtypes need {need}"
        )
    dense: dict[str, torch.Tensor] = {}
    at = span[0]
    for name, like in layout:
        tensor = _view(view, at, like.numel(), like.dtype).clone().view(like.shape)
        at += like.numel() * like.element_size()
        if tensor.is_floating_point() and not in_range(tensor):
            raise PayloadError(f"tensor {name!r} has NaN or Inf values or values beyond ±{MAX_MAGNITUDE:g}")
        dense[name] = tensor
    return {n: dense[n] for n in wanted}


def _view(view: memoryview, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` little-endian elements of ``dtype`` at ``offset`` of the payload, as a 1-D
    CPU tensor that shares the payload's memory (read-only: never write to it). Copied only
    where the bytes are not aligned to the element size or the machine is big-endian."""
    if dtype == torch.bfloat16:
        return _view(view, offset, count, torch.int16).view(torch.bfloat16)
    array = np.frombuffer(view, dtype=_WIRE_NUMPY[dtype], count=count, offset=offset)
    if not _LITTLE:
        array = array.astype(array.dtype.newbyteorder("="))
    elif not array.flags.aligned:
        array = array.copy()
    with warnings.catch_warnings():  # torch warns once that the payload's memory is read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


# Per-element checks run on every value of every reply. The finiteness check is one
# torch.aminmax pass (a single read, faster than a memory copy; NaN propagates into both);
# torch.isfinite is several passes with temporaries. count_nonzero of a bool tensor is
# several times slower in torch than numpy's popcount.


# The one numeric contract for every value a client's reply brings into the soup (weights,
# dense extras, norm statistics, metrics), in the value's own dtype before any cast: finite
# and within ±MAX_MAGNITUDE. Under it the largest running sum the largest allowed job makes
# (10**6 clients, the schema's cap, x 10**9 examples each, gate.MAX_EXAMPLES, x 1e20) is
# 1e35, finite in float32 (3.4e38); tests/test_numeric_contract.py checks the arithmetic.
MAX_MAGNITUDE = 1e20
MAX_EXAMPLES = 10**9  # examples one candidate may claim: a count above it is not believed


def extent(tensor: torch.Tensor) -> float:
    """The largest magnitude in a floating CPU tensor (NaN when it holds a NaN; 0 if empty),
    in one ``aminmax`` pass of its own dtype.

    Parameters
    ----------
    tensor : torch.Tensor
        A floating tensor.

    Returns
    -------
    float
        max |value|.
    """
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor)  # NaN propagates into both
    return max(-float(low), float(high)) if not math.isnan(float(low) + float(high)) else math.nan


def in_range(tensor: torch.Tensor) -> bool:
    """Whether a floating CPU tensor keeps the numeric contract: no NaN or Inf, no value
    beyond ±MAX_MAGNITUDE (so a running float32 sum of candidates stays finite).

    Parameters
    ----------
    tensor : torch.Tensor
        A floating tensor, in the dtype it arrived in.

    Returns
    -------
    bool
        True when every value is finite and within ±MAX_MAGNITUDE.
    """
    return extent(tensor) <= MAX_MAGNITUDE  # NaN compares False


def _kept(keep: torch.Tensor) -> int:
    """True entries of a CPU bool mask tensor."""
    return int(np.count_nonzero(keep.numpy()))


_COUNTS: dict[str, dict[str, int]] = {}  # mask digest -> kept entries per tensor, last few masks


def _kept_counts(mask: Mask, digest: str) -> dict[str, int]:
    """Kept entries per tensor of ``mask``, counted once per mask rather than once per reply."""
    if digest not in _COUNTS:
        if len(_COUNTS) >= 4:
            del _COUNTS[next(iter(_COUNTS))]
        _COUNTS[digest] = {name: _kept(keep) for name, keep in mask.items()}
    return _COUNTS[digest]


def _dtype_name(dtype: torch.dtype) -> str:
    return _DENSE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _name_diff(got: list[str], want: list[str]) -> str:
    """What differs between two name lists, in time linear in their lengths."""
    got_set, want_set = set(got), set(want)
    missing = [n for n in want if n not in got_set]
    extra = [n for n in got if n not in want_set]
    dupes = sorted(n for n, times in Counter(got).items() if times > 1)
    parts = []
    if missing:
        parts.append(f"lack {_few(missing)}")
    if extra:
        parts.append(f"have unexpected {_few(extra)}")
    if dupes:
        parts.append(f"repeat {_few(dupes)}")
    if not parts:
        return "are not in the mask's order"
    return " and ".join(parts) + " compared with the model"


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- size --------------------------------------------------------------------------


def payload_size_bound(
    mask: Mask, dense_state: Mapping[str, torch.Tensor], value_dtype: str = "fp32", *, kind: str
) -> int:
    """The least bytes any encoding of this content as a ``kind`` payload needs: itemsize·nnz
    of the masked values, ceil(N/8) of mask bits where the kind carries them, and the raw
    bytes of the dense extras (entries of ``dense_state`` not in ``mask``; a full state dict
    is fine).

    Used to report the codec's overhead over the raw content.

    Parameters
    ----------
    mask : Mask
        The payload's mask.
    dense_state : mapping of str to torch.Tensor
        The state whose entries outside ``mask`` travel dense (only sizes are read).
    value_dtype : str, default "fp32"
        Wire dtype of the masked values: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    kind : str
        ``"soup"``, ``"update"`` or ``"norm_stats"`` (only a soup adds mask bits).

    Returns
    -------
    int
        The lower bound in bytes, without names, header, framing or trailer.

    Raises
    ------
    PayloadError
        If ``kind`` or ``value_dtype`` is unknown.
    """
    if kind not in KINDS:
        raise PayloadError(f"unknown payload kind {kind!r}; use one of {', '.join(KINDS)}")
    if value_dtype not in VALUE_DTYPES:
        raise PayloadError(f"unknown value dtype {value_dtype!r}; use one of {', '.join(VALUE_DTYPES)}")
    itemsize = VALUE_DTYPES[value_dtype][2]
    size = sum(_kept(keep.cpu()) for keep in mask.values()) * itemsize
    if carries_mask(kind):
        size += math.ceil(sum(keep.numel() for keep in mask.values()) / 8)
    size += sum(t.numel() * t.element_size() for n, t in dense_state.items() if n not in mask)
    return size


# ---- the server's fast path: replies read in place ----------------------------------


@dataclass
class FlatReply:
    """A validated ``update`` reply whose values are views of the payload's own bytes: one
    flat block of every masked value (in mask order, in the wire dtype) and one flat view per
    run of same-dtype dense extras. Every check :func:`decode` makes has passed (finiteness
    included). Read-only: the views share the payload's memory, so keep the payload alive
    while using them and never write to them.

    Attributes
    ----------
    layout : FlatLayout
        Where each tensor lies in the blocks (shared by every reply of the reader).
    values : torch.Tensor
        All masked values, 1-D, in the wire dtype.
    dense : list of torch.Tensor
        One 1-D view per run of ``layout.runs``.
    num_examples : int
        The sender's example count, unchecked.
    nbytes : int
        Size of the payload.
    largest : float
        The largest magnitude among its floating values (which client's values were the
        largest, when a soup turns out unusable).
    """

    layout: FlatLayout
    values: torch.Tensor
    dense: list[torch.Tensor]
    num_examples: int
    nbytes: int
    largest: float = 0.0

    def to_values(self) -> dict[str, torch.Tensor]:
        """The reply in the compact form of :meth:`Decoded` (owned float32 masked values,
        dense extras in their dtype and shape): for merges that keep candidates."""
        out = dict(zip(self.layout.masked, self.values.to(torch.float32, copy=True).split(self.layout.counts)))
        return {**out, **{name: part.clone() for name, part in self.layout.extras(self.dense).items()}}


@dataclass
class FlatLayout:
    """Where a canonical reply's tensors lie: ``masked`` names with their value ``counts``,
    and ``runs`` of dense extras (names, shapes, dtype) each contiguous in the dense block.

    Made once per mask (with its reader), it keeps the flat positions of the kept entries
    (:meth:`positions`), so that ``fedsms.merge.flat_state`` rebuilds a round's soup with one
    ``index_copy_`` per masked tensor (no ``masked_scatter_`` prefix sum over the mask)."""

    masked: list[str]
    counts: list[int]
    runs: list[tuple[list[str], list[tuple[int, ...]], torch.dtype]]
    digest: str = ""
    template: list[tuple[str, tuple[int, ...], torch.dtype]] = _field(default_factory=list, repr=False)
    mask: Mask | None = _field(default=None, repr=False)
    _positions: torch.Tensor | None = _field(default=None, repr=False)

    def extras(self, runs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each dense extra as a view of its run (one 1-D tensor per run of ``runs``), in its shape."""
        out = {}
        for (names, shapes, _), run in zip(self.runs, runs):
            for name, shape, part in zip(names, shapes, run.split([math.prod(s) for s in shapes])):
                out[name] = part.view(shape)
        return out

    def positions(self) -> torch.Tensor:
        """The flat index of every kept entry, per masked tensor in mask order (local to it),
        as int32 (half the memory of int64; ``index_copy_`` takes each tensor's as int64).
        Computed once per layout (per mask), then kept."""
        if self._positions is not None:
            return self._positions
        wide = any(self.mask[name].numel() > 2**31 - 1 for name in self.masked)
        positions = torch.empty(sum(self.counts), dtype=torch.int64 if wide else torch.int32)
        at = 0
        for name, count in zip(self.masked, self.counts):
            keep = self.mask[name].to("cpu", torch.bool).reshape(-1).numpy()
            positions[at : at + count] = torch.from_numpy(np.flatnonzero(keep))
            at += count
        self._positions = positions
        return positions


def _shape_only(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of ``tensor``'s shape and dtype holding one element (zero strides): what
    a reader kept across rounds needs of its template, without keeping the old state alive."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


class UpdateReader:
    """Reads one round's ``update`` replies in place, for a streaming sum.

    Built once per mask from the receiver's mask and template (:meth:`at` gives it for each
    round; the template's values are not kept), it knows the exact metadata a
    reply must carry (shapes, counts, dtypes, name table: the bytes :func:`encode` writes for
    this mask and template). A reply whose metadata is byte-for-byte that is checked with O(1)
    Python work: checksum, layout, header (version, kind, phase, round, value dtype, digest),
    metadata, block lengths, then one finiteness pass per block. Any other reply goes through
    :func:`decode` (every check, with its precise message); a valid but differently written
    payload, and a reply read in another layout (:meth:`flat`), come back in the same
    :class:`FlatReply` layout, so every reply of a round sums alike.

    Parameters
    ----------
    mask : Mask
        The receiver's mask.
    template : mapping of str to torch.Tensor
        The receiver's state (names, shapes, dtypes).
    digest : str
        ``mask_digest(mask)``.
    phase, round : int
        What the header must name.
    """

    def __init__(self, mask: Mask, template: Mapping[str, torch.Tensor], *, digest: str, phase: int, round: int):
        self.mask, self.digest = mask, digest
        self.template = {name: _shape_only(like) for name, like in template.items()}  # never the values
        self.phase, self.round = phase, round
        counts = _kept_counts(mask, digest)
        masked = list(mask)
        extras = sorted(((n, t) for n, t in self.template.items() if n not in mask), key=lambda i: -i[1].element_size())
        meta = pb.SparsePayload()
        for name in masked:
            entry = meta.masked.add()
            entry.shape.extend(mask[name].shape)
            entry.nnz = counts[name]
        runs: list[tuple[list[str], list[tuple[int, ...]], torch.dtype]] = []
        for name, like in extras:
            if like.dtype not in _DENSE_ENUMS:
                raise PayloadError(f"tensor {name!r} has dtype {like.dtype} which the codec cannot send")
            entry = meta.dense.add()
            entry.shape.extend(like.shape)
            entry.dtype = _DENSE_ENUMS[like.dtype]
            if not runs or runs[-1][2] != like.dtype:
                runs.append(([], [], like.dtype))
            runs[-1][0].append(name)
            runs[-1][1].append(tuple(like.shape))
        meta.names = _name_table([*masked, *(n for n, _ in extras)])
        self._signature = meta.SerializeToString()
        self.layout = FlatLayout(
            masked,
            [counts[n] for n in masked],
            runs,
            digest,
            [(name, tuple(like.shape), like.dtype) for name, like in self.template.items()],
            mask,
        )
        self._total = sum(self.layout.counts)
        self._runs = [(sum(math.prod(s) for s in shapes), dtype, _itemsize(dtype)) for _, shapes, dtype in runs]
        self._dense_bytes = sum(n * size for n, _, size in self._runs)
        self._fields_limit = fields_bound(self.template, "update")

    def at(self, *, phase: int, round: int) -> UpdateReader:
        """This reader for another round (same mask and template): shares the layout, so
        the per-mask work (metadata signature, counts, the soup's scatter plan) is done once
        per mask, not once per round."""
        reader = copy.copy(self)
        reader.phase, reader.round = phase, round
        return reader

    def read(self, data: bytes) -> FlatReply:
        """The reply, validated; raises :class:`PayloadError` with the reason otherwise."""
        message, view, value_span, dense_span = _open(data, self._fields_limit, "update")
        header = message.header
        kind, value_dtype = _check_header(header, "update", self.phase, self.round)
        if header.mask_digest != self.digest or len(UnknownFieldSet(header)):
            return self._decode(data)
        num_examples = int(message.num_examples)
        message.ClearField("header")
        message.ClearField("num_examples")
        _, wire_dtype, itemsize = VALUE_DTYPES[value_dtype]
        if (
            message.SerializeToString() != self._signature
            or value_span[1] != self._total * itemsize
            or dense_span[1] != self._dense_bytes
        ):
            return self._decode(data)  # not the canonical layout: the general reader says why (or reads it)
        values = _view(view, value_span[0], self._total, wire_dtype)
        largest = extent(values)
        if not largest <= MAX_MAGNITUDE:
            return self._decode(data)  # names the tensor
        dense, at = [], dense_span[0]
        for count, dtype, size in self._runs:
            run = _view(view, at, count, dtype)
            if run.is_floating_point():
                peak = extent(run)
                if not peak <= MAX_MAGNITUDE:  # NaN too
                    return self._decode(data)
                largest = max(largest, peak)
            dense.append(run)
            at += count * size
        return FlatReply(self.layout, values, dense, num_examples, len(view), largest)

    def flat(self, values: Mapping[str, torch.Tensor], num_examples: int, nbytes: int) -> FlatReply:
        """A reply already validated in the compact form (a :class:`Decoded`'s values and
        dense extras, or ``fedsms.merge.values_under_mask`` of a state dict) laid out as the
        replies this reader reads in place: the same blocks, in the same order.

        Parameters
        ----------
        values : mapping of str to torch.Tensor
            Each masked tensor's kept values (in mask order) and every dense extra, named as
            this reader's template (any order).
        num_examples : int
            The reply's example count.
        nbytes : int
            The size of the reply as it travelled.

        Returns
        -------
        FlatReply
            Owned copies (float32 masked values; each dense run in its dtype).
        """
        layout = self.layout
        masked = [values[name].reshape(-1).to(torch.float32) for name in layout.masked]
        flat = torch.cat(masked) if masked else torch.zeros(0)
        dense = [torch.cat([values[name].reshape(-1).to(dtype) for name in names]) for names, _, dtype in layout.runs]
        largest = max([extent(flat), *(extent(run) for run in dense if run.is_floating_point())])
        return FlatReply(layout, flat, dense, num_examples, nbytes, largest)

    def _decode(self, data: bytes) -> FlatReply:
        decoded = decode(
            data,
            expected_mask=self.mask,
            expected_digest=self.digest,
            template=self.template,
            expected_phase=self.phase,
            expected_round=self.round,
            expected_kind="update",
        )
        return self.flat({**decoded.values, **decoded.dense}, decoded.num_examples, decoded.nbytes)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def __getattr__(name: str):
    # ``state_from_values`` moved to fedsms.merge (the codec only encodes and decodes).
    if name == "state_from_values":
        from fedsms.merge import state_from_values

        return state_from_values
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
