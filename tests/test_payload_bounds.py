"""A payload's fields besides its value blocks are bounded before they are parsed (issue 27,
point 3): protobuf builds every unknown field as a Python object (about 0.6 s and 30 MiB
per MB of them), so a reply padded with unknown fields is refused by its size alone."""

import struct

import pytest
import torch

from fedsms import codec
from fedsms.codec import _TRAILER_LEN, _crc32
from fedsms.wire import payload_pb2 as pb


@pytest.fixture
def example():
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(32, 8), "a.bias": torch.randn(32), "b.weight": torch.randn(4, 32)}
    mask = {k: torch.rand(v.shape) > 0.5 for k, v in state.items() if k.endswith("weight")}
    return state, mask


def padded(payload: bytes, unknown: int) -> bytes:
    """``payload`` with ``unknown`` bytes of unknown fields (field 20, varint) after its fields."""
    body = payload[:-_TRAILER_LEN] + bytes([0xA0, 0x01, 0x01]) * (unknown // 3)
    return body + bytes([(15 << 3) | 5]) + struct.pack("<I", _crc32(body))


def test_a_reply_padded_with_unknown_fields_is_refused_before_they_are_parsed(example, monkeypatch):
    state, mask = example
    digest = codec.mask_digest(mask)
    good = codec.encode(state, mask, phase=1, round=2, kind="update", num_examples=5)
    bad = padded(good, 3 * 2**20)
    reader = codec.UpdateReader(mask, state, digest=digest, phase=1, round=2)
    parse = pb.SparsePayload.FromString

    def refuse_large(data):
        assert len(data) <= codec.fields_bound(state, None), "parsed fields beyond the bound"
        return parse(data)

    monkeypatch.setattr(pb.SparsePayload, "FromString", staticmethod(refuse_large))
    with pytest.raises(codec.PayloadError, match="bytes of fields besides its values"):
        reader.read(bad)
    with pytest.raises(codec.PayloadError, match="bytes of fields besides its values"):
        codec.decode(bad, expected_mask=mask, expected_digest=digest, template=state, expected_kind="update")
    assert isinstance(reader.read(good), codec.FlatReply)
    with pytest.raises(codec.PayloadError, match="does not declare"):  # a few unknown fields: refused as before
        reader.read(padded(good, 30))


def test_the_bound_holds_every_payload_the_codec_writes(example):
    state, mask = example
    digest = codec.mask_digest(mask)
    for kind in ("soup", "update", "norm_stats"):
        payload = codec.encode(state, mask, phase=1, round=2, kind=kind, num_examples=5)
        decoded = codec.decode(payload, expected_mask=mask, expected_digest=digest, template=state, expected_kind=kind)
        assert decoded.kind == kind
