"""The sparse payload codec: round trips, sizes, and every refusal path."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsms import FedSMSError, codec
from fedsms.masks import compute_mask, dense_mask, mask_digest, pack_mask, prunable_names
from fedsms.models import build_model
from fedsms.wire import payload_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def sparse_state(sparsity: float, seed: int = 0):
    """A cnn state dict pruned to ``sparsity`` (global magnitude), with its mask; the norm
    statistics and num_batches_tracked are set to non-default values."""
    torch.manual_seed(seed)
    model = build_model("cnn", 10, (1, 8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for value in state.values():
        if value.is_floating_point():
            value.add_(torch.randn_like(value) * 0.1)
        else:
            value.fill_(17)
    names = prunable_names(model)
    mask = compute_mask(state, dense_mask(model, names), sparsity)
    for name, keep in mask.items():
        state[name] = state[name] * keep
    return state, mask


@pytest.fixture(scope="module")
def example():
    return sparse_state(0.9)


def soup_bytes(state, mask, **kw):
    args = dict(phase=2, round=7, kind="soup", value_dtype="fp32")
    args.update(kw)
    return codec.encode(state, mask, **args)


def decode_soup(data, state, **kw):
    args = dict(
        expected_mask=None,
        expected_digest=None,
        template=state,
        expected_phase=2,
        expected_round=7,
        expected_kind="soup",
    )
    args.update(kw)
    return codec.decode(data, **args)


def reseal(message: pb.SparsePayload) -> bytes:
    """Re-serialise an edited payload with a valid checksum (what a buggy or hostile
    sender could produce): only the structural checks stand between it and the model."""
    return codec._seal(message)


def masked_span(message: pb.SparsePayload, index: int, itemsize: int = 4) -> slice:
    """Where masked entry ``index``'s values lie in the values block (codec version 3)."""
    start = sum(e.nnz for e in message.masked[:index]) * itemsize
    return slice(start, start + message.masked[index].nnz * itemsize)


DENSE_ITEMSIZE = {pb.DENSE_DTYPE_FLOAT32: 4, pb.DENSE_DTYPE_FLOAT64: 8, pb.DENSE_DTYPE_INT64: 8}


def dense_span(message: pb.SparsePayload, index: int) -> slice:
    """Where dense entry ``index``'s elements lie in the dense-data block (float32/64, int64 models)."""
    sizes = [math.prod(e.shape) * DENSE_ITEMSIZE[e.dtype] for e in message.dense]
    return slice(sum(sizes[:index]), sum(sizes[: index + 1]))


def splice(block: bytes, where: slice, new: bytes) -> bytes:
    return block[: where.start] + new + block[where.stop :]


def wire_names(message: pb.SparsePayload) -> list[str]:
    """All entry names in wire order (masked, then dense), read from the name table."""
    masked, dense = codec._names(message)
    return masked + dense


def renamed(message: pb.SparsePayload, names: list[str]) -> None:
    """Rewrite the name table, as a sender that edits its entries would."""
    message.names = zlib.compress("\n".join(names).encode())


def entry_named(entry, name: str) -> None:
    """Give an entry its own name as codec version 1 could (field 1, now reserved): raw bytes
    that parse as an unknown field."""
    raw = name.encode()
    entry.MergeFromString(bytes([(1 << 3) | 2, len(raw)]) + raw)


def edited(data: bytes, edit) -> bytes:
    message = pb.SparsePayload.FromString(data)
    edit(message)
    return reseal(message)


# ---- round trips ---------------------------------------------------------------------


def test_fp32_round_trip_is_exact(example):
    state, mask = example
    data = soup_bytes(state, mask, num_examples=123)
    decoded = decode_soup(data, state)
    assert decoded.codec_version == codec.CODEC_VERSION == 3 and decoded.kind == "soup"
    assert (decoded.phase, decoded.round, decoded.value_dtype) == (2, 7, "fp32")
    assert decoded.mask_digest == mask_digest(mask) and decoded.mask_included
    assert decoded.num_examples == 123 and decoded.nbytes == len(data)
    assert list(decoded.mask) == list(mask)
    assert all(torch.equal(decoded.mask[n], mask[n]) for n in mask)
    for name, keep in mask.items():
        values = decoded.values[name]
        assert values.dtype == torch.float32 and values.dim() == 1
        assert torch.equal(values, state[name][keep])
    assert list(decoded.dense) == [n for n in state if n not in mask]
    restored = decoded.to_state_dict(state)
    assert list(restored) == list(state)
    for name in state:
        assert restored[name].dtype == state[name].dtype
        assert torch.equal(restored[name], state[name]), name
    assert int(restored["net.features.1.num_batches_tracked"]) == 17


@pytest.mark.parametrize("value_dtype, rtol", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_round_trip_within_tolerance(example, value_dtype, rtol):
    state, mask = example
    data = soup_bytes(state, mask, value_dtype=value_dtype)
    decoded = decode_soup(data, state)
    assert decoded.value_dtype == value_dtype
    restored = decoded.to_state_dict(state)
    for name, keep in mask.items():
        want, got = state[name][keep], restored[name][keep]
        assert torch.all((got - want).abs() <= rtol * want.abs() + 1e-7), name
        assert not torch.equal(got, want) or value_dtype == "fp32"  # really went through half
        assert torch.count_nonzero(restored[name][~keep]) == 0
    for name in decoded.dense:  # dense extras keep their own dtype: exact
        assert torch.equal(restored[name], state[name])
    assert len(data) < len(soup_bytes(state, mask))


def test_entries_outside_the_mask_are_exactly_zero():
    state, mask = sparse_state(0.8, seed=1)
    noisy = {n: v + torch.randn_like(v) if n in mask else v for n, v in state.items()}  # nonzero everywhere
    restored = decode_soup(soup_bytes(noisy, mask), state).to_state_dict(state)
    for name, keep in mask.items():
        assert torch.count_nonzero(restored[name][~keep]) == 0
        assert torch.equal(restored[name][keep], noisy[name][keep])


def test_update_without_mask_bits_decodes_with_the_known_mask(example):
    state, mask = example
    data = codec.encode(state, mask, phase=2, round=7, kind="update", num_examples=40)
    decoded = codec.decode(
        data,
        expected_mask=mask,
        expected_digest=mask_digest(mask),
        template=state,
        expected_phase=2,
        expected_round=7,
        expected_kind="update",
    )
    assert decoded.kind == "update" and not decoded.mask_included and decoded.num_examples == 40
    restored = decoded.to_state_dict(state)
    assert all(torch.equal(restored[n], state[n]) for n in state)
    # the digest of expected_mask is computed when expected_digest is not given
    codec.decode(data, expected_mask=mask, expected_digest=None, template=state)


def test_norm_stats_payload_with_an_empty_mask():
    state, _ = sparse_state(0.5)
    stats = {n: v for n, v in state.items() if "running" in n or "num_batches" in n}
    data = codec.encode(stats, {}, phase=1, round=2, kind="norm_stats", num_examples=9)
    decoded = codec.decode(data, expected_mask={}, expected_digest=None, template=stats, expected_kind="norm_stats")
    assert decoded.values == {} and list(decoded.dense) == list(stats)
    assert all(torch.equal(decoded.dense[n], stats[n]) for n in stats)


def test_state_from_values_builds_the_soup_from_averaged_entries(example):
    state, mask = example
    decoded = decode_soup(soup_bytes(state, mask), state)
    entries = {n: v * 2 for n, v in {**decoded.values, **decoded.dense}.items()}
    entries["net.features.1.num_batches_tracked"] = torch.tensor(16.6)  # a float average of an int buffer
    soup = codec.state_from_values(entries, mask, state)
    assert torch.equal(soup["net.classifier.weight"], state["net.classifier.weight"] * 2)
    assert soup["net.features.1.num_batches_tracked"].dtype == torch.int64
    assert int(soup["net.features.1.num_batches_tracked"]) == 17


# ---- sizes ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def fresh_state(model_name: str) -> tuple:
    torch.manual_seed(0)
    shape = {"cnn": (1, 8, 8), "resnet20": (3, 32, 32)}[model_name]
    model = build_model(model_name, 10, shape)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["cnn", "resnet20"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
@pytest.mark.parametrize("value_dtype", ["fp32", "fp16", "bf16"])
def test_encoded_size_is_the_bound_plus_the_name_table_and_framing_only(model_name, sparsity, value_dtype):
    model, dense = fresh_state(model_name)
    mask = compute_mask(dense, dense_mask(model, prunable_names(model)), sparsity)
    state = {k: v * mask[k] if k in mask else v for k, v in dense.items()}
    nnz = sum(int(k.sum()) for k in mask.values())
    numel = sum(k.numel() for k in mask.values())
    dense_bytes = sum(v.numel() * v.element_size() for n, v in state.items() if n not in mask)
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[value_dtype]

    sizes = {}
    for kind, mask_bytes in (("soup", math.ceil(numel / 8)), ("update", 0)):
        data = codec.encode(state, mask, phase=2, round=7, kind=kind, value_dtype=value_dtype, num_examples=100)
        bound = codec.payload_size_bound(mask, state, value_dtype, kind=kind)
        assert bound == itemsize * nnz + mask_bytes + dense_bytes
        # Beyond the bound a payload carries its header (the 64-character digest, a few
        # numbers), the compressed name table once, and a few bytes of framing per tensor
        # (tags, lengths, shape, nnz, dtype): nothing that grows with a tensor's size, and no
        # per-tensor names (codec version 1's overhead, about 25 bytes a tensor, would fail).
        table = len(pb.SparsePayload.FromString(data).names)
        assert table < 30 * len(state) // 8 + 64  # names compress to an eighth or so
        assert bound < len(data) <= bound + table + 24 * len(state) + 128, (len(data) - bound, table)
        assert len(data) <= 1.02 * bound + 4096  # the documented target, for the record
        sizes[kind] = len(data)
    assert sizes["soup"] - sizes["update"] == pytest.approx(math.ceil(numel / 8), abs=8)


# ---- refusals ------------------------------------------------------------------------


def refuse(data, state, match, **kw):
    with pytest.raises(codec.PayloadError, match=match) as info:
        decode_soup(data, state, **kw)
    assert isinstance(info.value, FedSMSError)
    return str(info.value)


@pytest.mark.parametrize("keep", [0, 1, 3, 40, 0.5, -6, -5, -4, -1])
def test_truncated_bytes_are_refused(example, keep):
    state, mask = example
    data = soup_bytes(state, mask)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    refuse(data[:cut], state, "truncated")


@pytest.mark.parametrize("where", [0, 5, 100, 0.3, 0.6, 0.99, -5, -3, -1])
def test_a_flipped_byte_is_refused(example, where):
    state, mask = example
    data = bytearray(soup_bytes(state, mask))
    at = int(len(data) * where) if isinstance(where, float) else where % len(data)
    data[at] ^= 0x10
    refuse(bytes(data), state, "truncated|corrupted")


def test_garbage_with_a_valid_checksum_is_unparsable(example):
    state, _ = example
    body = b"\x0a\xff\xff\xff\xff\x0f" + b"junk"  # a field 1 claiming a huge length
    data = body + bytes([0x7D]) + struct.pack("<I", zlib.crc32(body))
    refuse(data, state, "cannot be parsed")
    empty = bytes([0x7D]) + struct.pack("<I", zlib.crc32(b""))
    refuse(empty, state, "no header")


def test_not_bytes_is_refused(example):
    state, _ = example
    refuse("a string", state, "bytes")


def test_other_codec_versions_are_refused(example):
    state, mask = example
    data = edited(soup_bytes(state, mask), lambda m: setattr(m.header, "codec_version", 4))
    refuse(data, state, "codec version 4 .* reads version 3")
    old = edited(soup_bytes(state, mask), lambda m: setattr(m.header, "codec_version", 1))
    assert "run the same fedsms release on the server and every client" in refuse(
        old, state, "codec version 1 .* reads version 3"
    )
    # a version-2 payload: plain protobuf field order (header first), no blocks up front
    message = pb.SparsePayload.FromString(soup_bytes(state, mask))
    message.header.codec_version = 2
    message.ClearField("padding")
    body = message.SerializeToString()
    v2 = body + bytes([0x7D]) + struct.pack("<I", zlib.crc32(body))
    assert "run the same fedsms release" in refuse(v2, state, "codec version 2 .* reads version 3")
    message.header.codec_version = 3  # this version's header in another layout: named as such
    body = message.SerializeToString()
    refuse(body + bytes([0x7D]) + struct.pack("<I", zlib.crc32(body)), state, "does not open with its values")


def test_wrong_kind_phase_round_are_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    refuse(data, state, "expected a 'update' payload but got a 'soup'", expected_kind="update")
    refuse(data, state, "from phase 2 but phase 3", expected_phase=3)
    refuse(data, state, "from round 7 but round 8", expected_round=8)
    refuse(edited(data, lambda m: setattr(m.header, "kind", 0)), state, "unknown kind")
    refuse(edited(data, lambda m: setattr(m.header, "value_dtype", 0)), state, "unknown value dtype")


def test_wrong_digest_and_wrong_mask_are_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    refuse(data, state, "another phase or run", expected_digest="0" * 64)
    _, other_mask = sparse_state(0.5)
    update = codec.encode(state, mask, phase=2, round=7, kind="update")
    with pytest.raises(codec.PayloadError, match="another phase or run"):
        codec.decode(update, expected_mask=other_mask, expected_digest=None, template=state)
    with pytest.raises(codec.PayloadError, match="no mask bits"):
        codec.decode(update, expected_mask=None, expected_digest=None, template=state)


def test_mask_bits_that_disagree_with_the_header_digest_are_refused(example):
    state, mask = example

    def flip_bit(message):
        bits = bytearray(message.mask_bits)
        bits[3] ^= 0x01
        message.mask_bits = bytes(bits)

    refuse(edited(soup_bytes(state, mask), flip_bit), state, "mask bits do not match the mask digest")
    refuse(
        edited(soup_bytes(state, mask), lambda m: setattr(m, "mask_bits", m.mask_bits[:-1])), state, "mask does not fit"
    )


def test_non_finite_values_are_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    nan = struct.pack("<f", float("nan"))

    def poison_masked(message):
        where = masked_span(message, 1)
        message.values = splice(message.values, slice(where.start, where.start + 4), nan)

    refuse(edited(data, poison_masked), state, "'net.features.3.weight' has NaN or Inf")

    def poison_dense(message):
        where = dense_span(message, codec._names(message)[1].index("net.features.4.running_var"))
        message.dense_data = splice(
            message.dense_data, slice(where.stop - 4, where.stop), struct.pack("<f", float("inf"))
        )

    refuse(edited(data, poison_dense), state, "'net.features.4.running_var' has NaN or Inf")

    half = soup_bytes(state, mask, value_dtype="fp16")
    refuse(
        edited(half, lambda m: setattr(m, "values", b"\x00\x7c" + m.values[2:])),
        state,
        "NaN or Inf",
    )  # 0x7c00 is fp16 +Inf

    bad = dict(state, **{"net.classifier.weight": state["net.classifier.weight"] * float("nan")})
    with pytest.raises(codec.PayloadError, match="NaN or Inf"):
        soup_bytes(bad, mask)
    with pytest.raises(codec.PayloadError, match="overflow fp16"):
        soup_bytes(
            dict(state, **{"net.classifier.weight": state["net.classifier.weight"] * 1e6}), mask, value_dtype="fp16"
        )


def test_wrong_shape_template_is_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    reshaped = dict(state, **{"net.classifier.weight": state["net.classifier.weight"].reshape(64, 10)})
    refuse(data, state, "shape", template=reshaped)
    bias = dict(state, **{"net.classifier.bias": torch.zeros(11)})
    refuse(data, state, "'net.classifier.bias' has shape \\(10,\\) in the payload but \\(11,\\)", template=bias)
    with pytest.raises(codec.PayloadError, match="shape"):
        codec.decode(
            codec.encode(state, mask, phase=0, round=0, kind="update"),
            expected_mask=mask,
            expected_digest=None,
            template=reshaped,
        )


def test_extra_and_missing_tensors_are_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    refuse(data, state, "lack 'net.extra'", template={**state, "net.extra": torch.zeros(3)})
    fewer = {n: v for n, v in state.items() if n != "net.features.8.running_mean"}
    refuse(data, state, "unexpected 'net.features.8.running_mean'", template=fewer)

    def drop_dense(message):
        names = wire_names(message)
        del message.dense[2], names[len(message.masked) + 2]
        renamed(message, names)

    refuse(edited(data, drop_dense), state, "dense tensors lack")

    def duplicate_dense(message):
        names = wire_names(message)
        message.dense.add().CopyFrom(message.dense[0])
        renamed(message, names + [names[len(message.masked)]])

    refuse(edited(data, duplicate_dense), state, "repeat")

    update = codec.encode(state, mask, phase=2, round=7, kind="update")

    def drop_masked(message):
        names = wire_names(message)
        del message.masked[1], names[1]
        renamed(message, names)

    def swap_masked(message):
        first, second = pb.MaskedTensor(), pb.MaskedTensor()
        first.CopyFrom(message.masked[0])
        second.CopyFrom(message.masked[1])
        message.masked[0].CopyFrom(second)
        message.masked[1].CopyFrom(first)
        names = wire_names(message)
        renamed(message, [names[1], names[0], *names[2:]])

    for edit, match in [(drop_masked, "masked tensors lack 'net.features.3.weight'"), (swap_masked, "order")]:
        with pytest.raises(codec.PayloadError, match=match):
            codec.decode(edited(update, edit), expected_mask=mask, expected_digest=None, template=state)
    unknown = edited(data, lambda m: renamed(m, ["net.nothing.weight", *wire_names(m)[1:]]))
    refuse(unknown, state, "'net.nothing.weight' which the model does not have")


def test_counts_lengths_and_dtypes_that_do_not_add_up_are_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    refuse(edited(data, lambda m: setattr(m.masked[0], "nnz", m.masked[0].nnz + 1)), state, "claims .* the mask keeps")
    refuse(
        edited(data, lambda m: setattr(m, "values", m.values[:-4])),
        state,
        "bytes of values but .* need",
    )

    def dense_dtype(message):
        index = next(i for i, e in enumerate(message.dense) if e.dtype == pb.DENSE_DTYPE_FLOAT32)
        where = dense_span(message, index)
        message.dense[index].dtype = pb.DENSE_DTYPE_FLOAT64
        message.dense_data = splice(message.dense_data, where, message.dense_data[where] * 2)

    refuse(edited(data, dense_dtype), state, "dtype 'float64' in the payload but 'float32'")
    refuse(edited(data, lambda m: setattr(m, "dense_data", m.dense_data[:-1])), state, "bytes of dense data but")
    refuse(edited(data, lambda m: setattr(m.dense[1], "dtype", 99)), state, r"unknown dtype \(99\)")
    refuse(edited(data, lambda m: setattr(m.dense[1], "dtype", 0)), state, r"unknown dtype \(0\)")


def test_encode_refuses_bad_arguments(example):
    state, mask = example
    with pytest.raises(codec.PayloadError, match="unknown payload kind"):
        codec.encode(state, mask, phase=0, round=0, kind="weights")
    with pytest.raises(codec.PayloadError, match="unknown payload kind"):
        codec.payload_size_bound(mask, state, kind="weights")
    with pytest.raises(codec.PayloadError, match="unknown value dtype"):
        codec.encode(state, mask, phase=0, round=0, kind="soup", value_dtype="int8")
    with pytest.raises(codec.PayloadError, match="num_examples"):
        codec.encode(state, mask, phase=0, round=0, kind="update", num_examples=-1)
    with pytest.raises(codec.PayloadError, match="does not have"):
        codec.encode({}, mask, phase=0, round=0, kind="soup")
    wrong = {n: torch.ones(2, 2, dtype=torch.bool) for n in mask}
    with pytest.raises(codec.PayloadError, match="shape"):
        codec.encode(state, wrong, phase=0, round=0, kind="soup")


def test_big_num_examples_is_exposed_not_judged(example):
    state, mask = example
    data = codec.encode(state, mask, phase=0, round=1, kind="update", num_examples=2**40)
    assert codec.decode(data, expected_mask=mask, expected_digest=None, template=state).num_examples == 2**40


def test_wire_layout_matches_the_schema(example):
    """Another implementation could read it: a plain protobuf parse sees what the codec wrote."""
    state, mask = example
    data = soup_bytes(state, mask, value_dtype="bf16")
    message = pb.SparsePayload.FromString(data)
    assert message.crc32 == zlib.crc32(data[:-5]) and data[-5] == 0x7D
    assert message.header.value_dtype == pb.VALUE_DTYPE_BF16 and message.header.kind == pb.PAYLOAD_KIND_SOUP
    assert message.mask_bits == pack_mask(mask)
    names = zlib.decompress(message.names).decode().split("\n")
    dense_order = sorted((n for n in state if n not in mask), key=lambda n: -state[n].element_size())
    assert names == [*mask, *dense_order]  # masked in mask order, then dense by element size (stable)
    for block in ("values", "dense_data"):  # each block starts 16-aligned, in the payload's first fields
        start = data.index(getattr(message, block))
        assert start % 16 == 0 and start < 64 + len(message.values)
    assert len(message.padding) == 2 and all(p == bytes(len(p)) and len(p) < 16 for p in message.padding)
    assert "name" not in pb.MaskedTensor.DESCRIPTOR.fields_by_name  # names travel only in the table
    assert "name" not in pb.DenseTensor.DESCRIPTOR.fields_by_name
    masked_names, dense_names = names[: len(message.masked)], names[len(message.masked) :]
    assert masked_names == list(mask)
    raw = np.frombuffer(message.values[masked_span(message, 0, 2)], dtype="<u2").astype(np.uint32) << 16  # bf16
    want = state[masked_names[0]][mask[masked_names[0]]].to(torch.bfloat16).float().numpy()
    assert np.array_equal(raw.view("<f4"), want)
    index = next(i for i, n in enumerate(dense_names) if n.endswith("num_batches_tracked"))
    tracked = message.dense[index]
    assert tracked.dtype == pb.DENSE_DTYPE_INT64 and list(tracked.shape) == []
    assert message.dense_data[dense_span(message, index)] == struct.pack("<q", 17)


def test_the_kind_alone_decides_whether_the_mask_travels(example):
    state, mask = example
    soup = pb.SparsePayload.FromString(soup_bytes(state, mask))
    update = pb.SparsePayload.FromString(codec.encode(state, mask, phase=2, round=7, kind="update"))
    stats = pb.SparsePayload.FromString(codec.encode(state, mask, phase=2, round=7, kind="norm_stats"))
    assert soup.mask_bits == pack_mask(mask) and not update.mask_bits and not stats.mask_bits
    assert [codec.carries_mask(k) for k in codec.KINDS] == [True, False, False]

    refuse(
        edited(soup_bytes(state, mask), lambda m: m.ClearField("mask_bits")),
        state,
        "'soup' payload carries its mask bits but this one has none",
    )
    with_bits = edited(
        codec.encode(state, mask, phase=2, round=7, kind="update"), lambda m: setattr(m, "mask_bits", pack_mask(mask))
    )
    with pytest.raises(codec.PayloadError, match="'update' payload carries no mask bits .* has [0-9]+ bytes of them"):
        codec.decode(with_bits, expected_mask=mask, expected_digest=None, template=state)


def test_the_version_1_layout_with_self_named_entries_is_refused(example):
    """Codec version 1 also read payloads whose entries carried their own names instead of
    the name table; version 2 reads the name table only."""
    state, mask = example
    data = soup_bytes(state, mask, num_examples=5)

    def names_in_entries(message):
        masked, dense = codec._names(message)
        for entry, name in zip([*message.masked, *message.dense], masked + dense):
            entry_named(entry, name)
        message.ClearField("names")

    refuse(edited(data, names_in_entries), state, "fields that codec version 3 does not declare")
    old = edited(data, lambda m: (names_in_entries(m), setattr(m.header, "codec_version", 1)))
    refuse(old, state, "codec version 1 .* reads version 3")
    refuse(edited(data, lambda m: m.ClearField("names")), state, "no name table")


def test_a_name_table_that_does_not_fit_is_refused(example):
    state, mask = example
    data = soup_bytes(state, mask)
    refuse(edited(data, lambda m: setattr(m, "names", b"not zlib")), state, "name table cannot be read")
    refuse(edited(data, lambda m: renamed(m, wire_names(m)[:-1])), state, "lists .* tensors but the payload carries")
    refuse(
        edited(data, lambda m: entry_named(m.dense[0], "net.x")), state, "fields that codec version 3 does not declare"
    )
    refuse(
        edited(data, lambda m: setattr(m, "names", zlib.compress(b"a" * (codec._MAX_NAME_TABLE + 1)))),
        state,
        "larger than|more than a payload for the model can hold",  # the compressed table alone exceeds the fields' bound
    )
    with pytest.raises(codec.PayloadError, match="cannot be sent"):
        codec.encode({"a\nb": torch.zeros(2)}, {}, phase=0, round=0, kind="norm_stats")


# ---- generated code ------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed (pip install -e '.[test]'); cannot regenerate payload_pb2.py",
)
def test_checked_in_payload_pb2_is_what_protoc_generates(tmp_path):
    out = tmp_path / "payload_pb2.py"
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(out)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        timeout=60,
    )
    checked_in = ROOT / "fedsms" / "wire" / "payload_pb2.py"
    assert out.read_bytes() == checked_in.read_bytes(), (
        "fedsms/wire/payload_pb2.py is out of date with proto/fedsms/v1/payload.proto; run proto/generate.sh "
        "(with the grpcio-tools release named in its header) and check the result in"
    )


# ---- the server's in-place reader ----------------------------------------------------


def test_update_reader_reads_in_place_and_a_bad_reply_never_reaches_the_sum(example):
    """UpdateReader + FlatSum (the server's fast path): a canonical reply is read as views of
    its own bytes and summed by blocks; the sum equals the per-tensor path's; a reply with a
    NaN, an Inf or a value beyond ±1e20 (masked or dense) is refused and leaves the sum as it was."""
    from fedsms.soup import FlatSum, RunningAverage

    state, mask = example
    digest = codec.mask_digest(mask)
    reader = codec.UpdateReader(mask, state, digest=digest, phase=2, round=7)
    good = codec.encode(state, mask, phase=2, round=7, kind="update", num_examples=3)
    reply = reader.read(good)
    assert isinstance(reply, codec.FlatReply) and reply.num_examples == 3
    assert np.shares_memory(reply.values.numpy(), np.frombuffer(good, np.uint8))  # no copy of the values
    total, reference = FlatSum(), RunningAverage()
    total.add(reply, 2.0)
    decoded = codec.decode(good, expected_mask=mask, expected_digest=digest, template=state, expected_kind="update")
    reference.add({**decoded.values, **decoded.dense}, 2.0)
    before = {n: t.clone() for n, t in total.sums().items()}
    message = pb.SparsePayload.FromString(good)
    for number in (float("nan"), float("inf"), -1e30):
        raw = struct.pack("<f", number)
        for block in ("values", "dense_data"):
            first_float = next(i for i, e in enumerate(message.dense) if e.dtype == pb.DENSE_DTYPE_FLOAT32)
            at = len(message.values) - 4 if block == "values" else dense_span(message, first_float).start
            bad = edited(good, lambda m, b=block, a=at, r=raw: setattr(m, b, splice(getattr(m, b), slice(a, a + 4), r)))
            with pytest.raises(codec.PayloadError, match="NaN or Inf"):
                total.add(reader.read(bad))
    for name, value in total.sums().items():  # untouched, bit for bit
        assert torch.equal(value, before[name]), name
    total.add(reader.read(good), 1.0)
    reference.add({**decoded.values, **decoded.dense}, 1.0)
    merged = reference.mean()
    for name, value in total.sums().items():
        if value.is_floating_point():
            assert torch.allclose(value, merged[name] * reference.total_weight), name
        else:  # integers keep their maximum
            assert torch.equal(value, merged[name]), name
    # a valid but non-canonical reply (dense extras in another order) goes the general way, still read
    swapped = edited(good, lambda m: None)
    assert isinstance(reader.read(swapped), codec.FlatReply)
    other = codec.encode(state, mask, phase=2, round=8, kind="update", num_examples=3)
    with pytest.raises(codec.PayloadError, match="from round 8 but round 7"):
        reader.read(other)


def test_a_reader_is_reused_across_rounds_without_keeping_the_old_state(example):
    """``UpdateReader.at``: the same layout (built once per mask), the new round checked; the
    reader keeps only shapes and dtypes of its template, never the soup's values."""
    state, mask = example
    reader = codec.UpdateReader(mask, state, digest=codec.mask_digest(mask), phase=2, round=7)
    later = reader.at(phase=2, round=8)
    assert later.layout is reader.layout and (reader.phase, reader.round) == (2, 7)
    round_8 = codec.encode(state, mask, phase=2, round=8, kind="update", num_examples=3)
    assert isinstance(later.read(round_8), codec.FlatReply)
    with pytest.raises(codec.PayloadError, match="from round 8 but round 7"):
        reader.read(round_8)
    for name, like in reader.template.items():
        assert like.shape == state[name].shape and like.dtype == state[name].dtype
        assert like.untyped_storage().nbytes() <= like.element_size(), name  # one element, not the tensor


def test_the_flat_merge_rebuilds_exactly_the_state_of_the_per_tensor_merge(example):
    """Merge.flat_state (the scatter at positions kept per mask) against the per-tensor path
    (``RunningAverage`` + ``state_from_values``): same names, order, dtypes, bits."""
    from fedsms.engine import Merge
    from fedsms.soup import SoupError

    state, mask = example
    digest = codec.mask_digest(mask)
    reader = codec.UpdateReader(mask, state, digest=digest, phase=2, round=7)
    flat, reference = Merge("weighted", False), Merge("weighted", False)
    for scale, examples in ((1.0, 3), (-2.5, 5), (0.75, 2)):
        other = {k: v * scale if v.is_floating_point() else v + examples for k, v in state.items()}
        payload = codec.encode(other, mask, phase=2, round=7, kind="update", num_examples=examples)
        flat.add_reply(reader.read(payload), examples)
        decoded = codec.decode(payload, expected_mask=mask, expected_digest=digest, template=state)
        reference.add({**decoded.values, **decoded.dense}, examples)
    assert flat.flat_state("another digest") is None  # replies of another mask: the general path
    rebuilt = flat.flat_state(digest)
    expected = codec.state_from_values(reference.result(), mask, state)
    assert list(rebuilt) == list(expected) == list(state)
    for name, value in expected.items():
        assert rebuilt[name].dtype == value.dtype and torch.equal(rebuilt[name], value), name
    for name, keep in mask.items():
        assert not rebuilt[name][~keep].any(), name
    # a merge that is not finite is refused, naming the tensor (replies are checked, so only
    # a hand-made reply can carry an Inf here)
    good = reader.read(codec.encode(state, mask, phase=2, round=7, kind="update", num_examples=3))
    bad = codec.FlatReply(good.layout, torch.full_like(good.values, float("inf")), good.dense, 3, good.nbytes)
    broken = Merge("uniform", False)
    broken.add_reply(bad, 3)
    with pytest.raises(SoupError, match="merge of tensor .* is not finite"):
        broken.flat_state(digest)


def test_the_checksum_is_zlibs_crc32_whichever_implementation_computes_it():
    """The trailer is zlib's CRC-32 of the body (the wire does not depend on the optional
    ISA-L implementation), computed over any buffer the reader is handed."""
    data = os.urandom(3 * (1 << 20) + 13)
    for start in (0, 1, 7):
        assert codec._crc32(memoryview(data)[start:]) == zlib.crc32(data[start:])
    state, mask = sparse_state(0.5)
    payload = codec.encode(state, mask, phase=2, round=7, kind="update", num_examples=3)
    assert struct.unpack("<I", payload[-4:])[0] == zlib.crc32(payload[:-5])
    assert codec.CRC32_IMPLEMENTATION in ("isal", "zlib")
