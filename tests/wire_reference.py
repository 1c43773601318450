"""A reference reader of the fedsms sparse payload, written from ``proto/fedsms/v1/payload.proto``
alone: its own protobuf wire-format parser (varints, tags, length-delimited fields), its own
checks of every rule the schema states, its own byte-to-value conversion. It shares no code
with ``fedsms.codec`` or the generated ``payload_pb2``, so the fuzz tests can hold the codec
against it instead of against itself.

Where the schema leaves the reader a choice, this reader takes the one ``fedsms.codec``
documents: the dense extras may come in any order (each exactly once), ``num_examples`` is
returned unjudged, and a floating value beyond ±1e20 is refused like NaN and Inf (so that a
float32 sum of many replies stays finite; the .proto file states this limit since version 3).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

VERSION = 3
KINDS = {1: "soup", 2: "update", 3: "norm_stats"}
VALUE_TYPES = {1: ("fp32", 4), 2: ("fp16", 2), 3: ("bf16", 2)}
DENSE_TYPES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
TORCH_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
DENSE_ENUMS = {
    1: "float32",
    2: "float16",
    3: "bfloat16",
    4: "float64",
    5: "int64",
    6: "int32",
    7: "int16",
    8: "int8",
    9: "uint8",
    10: "bool",
}
MAX_NAMES = 1 << 24
MAX_MAGNITUDE = 1e20


class Refused(Exception):
    """The reference reader refuses the payload."""


# ---- protobuf wire format ---------------------------------------------------------------


def varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift >= 70:
            raise Refused("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value & (2**64 - 1), at


def fields(data: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of every field, in order: an int for varint and
    fixed types, bytes for length-delimited fields."""
    out, at = [], 0
    while at < len(data):
        tag, at = varint(data, at)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise Refused("field number 0")
        if wire == 0:
            value, at = varint(data, at)
        elif wire == 1:
            if at + 8 > len(data):
                raise Refused("truncated fixed64")
            value, at = struct.unpack_from("<Q", data, at)[0], at + 8
        elif wire == 2:
            size, at = varint(data, at)
            if at + size > len(data):
                raise Refused("truncated length-delimited field")
            value, at = bytes(data[at : at + size]), at + size
        elif wire == 5:
            if at + 4 > len(data):
                raise Refused("truncated fixed32")
            value, at = struct.unpack_from("<I", data, at)[0], at + 4
        else:
            raise Refused(f"wire type {wire}")
        out.append((number, wire, value))
    return out


def message(data: bytes, schema: dict[int, tuple[str, str]]) -> dict:
    """Parse one message of ``schema`` (number -> (name, kind)); kinds: ``uint`` (varint,
    last one wins), ``bytes`` (last wins), ``message`` (occurrences concatenate, as protobuf
    merges them), ``repeated`` (bytes, each kept), ``packed`` (repeated varints, packed or
    not), ``fixed32``. A field the schema does not declare, or of another wire type, is refused."""
    parsed: dict = {}
    for number, wire, value in fields(data):
        if number not in schema:
            raise Refused(f"undeclared field {number}")
        name, kind = schema[number]
        if kind == "uint" and wire == 0 or kind == "bytes" and wire == 2:
            parsed[name] = value
        elif kind == "message" and wire == 2:
            parsed[name] = parsed.get(name, b"") + value
        elif kind == "repeated" and wire == 2 or kind == "packed" and wire == 0:
            parsed.setdefault(name, []).append(value)
        elif kind == "packed" and wire == 2:
            at, items = 0, parsed.setdefault(name, [])
            while at < len(value):
                item, at = varint(value, at)
                items.append(item)
        elif kind == "fixed32" and wire == 5:
            parsed[name] = value
        else:
            raise Refused(f"field {number} has wire type {wire}")
    return parsed


PAYLOAD = {
    1: ("header", "message"),
    2: ("masked", "repeated"),
    3: ("mask_bits", "bytes"),
    4: ("dense", "repeated"),
    5: ("num_examples", "uint"),
    6: ("names", "bytes"),
    7: ("values", "bytes"),
    8: ("dense_data", "bytes"),
    9: ("padding", "repeated"),
    15: ("crc32", "fixed32"),
}
HEADER = {
    1: ("codec_version", "uint"),
    2: ("phase", "uint"),
    3: ("round", "uint"),
    4: ("mask_digest", "bytes"),
    5: ("value_dtype", "uint"),
    6: ("kind", "uint"),
}
MASKED = {2: ("shape", "packed"), 3: ("nnz", "uint")}
DENSE = {2: ("shape", "packed"), 5: ("dtype", "uint")}


# ---- values -----------------------------------------------------------------------------


def floats(raw: bytes, kind: str) -> torch.Tensor:
    """Little-endian values of ``kind`` (fp32, fp16, bf16 or a dense dtype name) as a tensor."""
    if kind in ("bf16", "bfloat16"):  # the upper 16 bits of a binary32
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return torch.from_numpy(wide.view("<f4").astype(np.float32)).to(torch.bfloat16)
    numpy_type = {
        "fp32": "<f4",
        "fp16": "<f2",
        "float32": "<f4",
        "float16": "<f2",
        "float64": "<f8",
        "int64": "<i8",
        "int32": "<i4",
        "int16": "<i2",
        "int8": "i1",
        "uint8": "u1",
        "bool": "?",
    }[kind]
    return torch.from_numpy(np.frombuffer(raw, dtype=numpy_type).astype(np.dtype(numpy_type).newbyteorder("=")))


def digest(mask: dict[str, torch.Tensor]) -> str:
    import fedsms.masks  # the digest is defined by code, not by the schema: use the one definition

    return fedsms.masks.mask_digest(mask)


def read(data: bytes, *, mask: dict, template: dict, kind: str, phase: int, round: int) -> dict:
    """Read a non-soup payload (the receiver holds ``mask``) the way the schema says; returns
    ``{"values": {name: float32 values}, "dense": {name: tensor}, "num_examples": int}``."""
    if len(data) < 5 or data[-5] != 0x7D:
        raise Refused("no trailer")
    if zlib.crc32(data[:-5]) != struct.unpack("<I", data[-4:])[0]:
        raise Refused("checksum")
    layout = fields(data[:-5])
    if [(number, wire) for number, wire, _ in layout[:4]] != [(9, 2), (7, 2), (9, 2), (8, 2)]:
        raise Refused("layout: padding, values, padding, dense data must come first")
    if any(number in (7, 8, 9) for number, _, _ in layout[4:]):
        raise Refused("layout: a block or padding field after the blocks")
    if any(len(pad) >= 16 or any(pad) for _, _, pad in (layout[0], layout[2])):
        raise Refused("padding")
    top = message(data, PAYLOAD)
    if "header" not in top:
        raise Refused("no header")
    header = message(top["header"], HEADER)
    if header.get("codec_version", 0) & 0xFFFFFFFF != VERSION:
        raise Refused("version")
    if KINDS.get(header.get("kind", 0) & 0xFFFFFFFF) != kind:
        raise Refused("kind")
    if header.get("phase", 0) & 0xFFFFFFFF != phase or header.get("round", 0) & 0xFFFFFFFF != round:
        raise Refused("phase or round")
    value_type = VALUE_TYPES.get(header.get("value_dtype", 0) & 0xFFFFFFFF)
    if value_type is None:
        raise Refused("value dtype")
    if header.get("mask_digest", b"") != digest(mask).encode():
        raise Refused("digest")
    masked = [message(m, MASKED) for m in top.get("masked", [])]
    dense = [message(d, DENSE) for d in top.get("dense", [])]
    if top.get("mask_bits"):
        raise Refused("mask bits in a payload whose kind carries none")
    if not top.get("names"):
        raise Refused("no name table")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(top["names"], MAX_NAMES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise Refused("name table")
        names = text.decode("utf-8").split("\n") if text else []
    except (zlib.error, UnicodeDecodeError):
        raise Refused("name table") from None
    if len(names) != len(masked) + len(dense):
        raise Refused("name count")
    masked_names, dense_names = names[: len(masked)], names[len(masked) :]
    if masked_names != list(mask):
        raise Refused("masked names")
    value_name, itemsize = value_type
    values, block, at = {}, top.get("values", b""), 0
    if len(block) != sum(int(mask[n].sum()) for n in masked_names) * itemsize:
        raise Refused("values block size")
    for name, entry in zip(masked_names, masked):
        keep = mask[name]
        if entry.get("shape", []) != list(keep.shape):
            raise Refused("masked shape")
        nnz = int(keep.sum())
        if entry.get("nnz", 0) != nnz:
            raise Refused("nnz")
        tensor = floats(block[at : at + nnz * itemsize], value_name).to(torch.float32)
        at += nnz * itemsize
        if not bool((tensor.double().abs() <= MAX_MAGNITUDE).all()):  # NaN compares false
            raise Refused("not finite")
        values[name] = tensor
    wanted = [n for n in template if n not in mask]
    if sorted(dense_names) != sorted(wanted):
        raise Refused("dense names")
    extras, block, at = {}, top.get("dense_data", b""), 0
    sizes = []
    for name, entry in zip(dense_names, dense):
        like = template[name]
        dtype = DENSE_ENUMS.get(entry.get("dtype", 0))
        if dtype is None:
            raise Refused("dense dtype")
        if entry.get("shape", []) != list(like.shape) or dtype != TORCH_NAMES.get(like.dtype):
            raise Refused("dense shape or dtype")
        sizes.append(like.numel() * DENSE_TYPES[dtype])
    if len(block) != sum(sizes):
        raise Refused("dense size")
    for name, entry, size in zip(dense_names, dense, sizes):
        like = template[name]
        dtype = DENSE_ENUMS[entry["dtype"]]
        tensor = floats(block[at : at + size], dtype).reshape(like.shape)
        at += size
        if tensor.is_floating_point() and not bool((tensor.double().abs() <= MAX_MAGNITUDE).all()):
            raise Refused("dense not finite")
        extras[name] = tensor
    return {"values": values, "dense": {n: extras[n] for n in wanted}, "num_examples": top.get("num_examples", 0)}
