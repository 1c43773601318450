"""Property-based: random and mutated payloads never reach the soup. The decoder either
refuses a payload with ``PayloadError`` or returns tensors that fit the model and mask;
the aggregator averages exactly the replies that decode on their own and logs the rest."""

import math
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fedsms import codec
from fedsms.wire import payload_pb2 as pb
from fedsms_server.strategy import RoundLog, Update

from test_strategy import client_reply, make_strategy

STRATEGY = make_strategy(Path(tempfile.mkdtemp(prefix="fedsms-fuzz-")))
SOUP_PAYLOAD = STRATEGY.begin_round(2)  # opens phase 1: pruned, the mask is sparse
BASE_SOUP = {k: v.clone() for k, v in STRATEGY.soup.items()}
GOOD = [client_reply(SOUP_PAYLOAD, 2, seed, 120)[0] for seed in range(2)]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_update(data: bytes) -> codec.Decoded:
    """Exactly what the server expects of a round-2 reply."""
    return codec.decode(data, expected_mask=STRATEGY.mask, expected_digest=STRATEGY.digest, template=STRATEGY.soup,
                        expected_phase=1, expected_round=2, expected_kind="update")


def assert_fits_the_model(decoded: codec.Decoded) -> None:
    state = decoded.to_state_dict(STRATEGY.soup)
    for name, like in STRATEGY.soup.items():
        assert state[name].shape == like.shape and state[name].dtype == like.dtype
        if like.is_floating_point():
            assert bool(torch.isfinite(state[name]).all())
    for name, keep in STRATEGY.mask.items():
        assert torch.count_nonzero(state[name][~keep]) == 0


# ---- mutations: bytes, and fields of a re-sealed message (a valid checksum) --------------

def _set_header(field):
    def edit(message, value):
        setattr(message.header, field, value)
    return edit


def _edit_entry(group, field):
    def edit(message, value):
        entries = getattr(message, group)
        entry = entries[value[0] % len(entries)]
        if field == "shape":
            del entry.shape[:]
            entry.shape.extend(value[1])
        else:
            setattr(entry, field, value[1])
    return edit


def _drop_entry(group):
    def edit(message, index):
        del getattr(message, group)[index % len(getattr(message, group))]
    return edit


def _duplicate_entry(group):
    def edit(message, index):
        entries = getattr(message, group)
        entries.add().CopyFrom(entries[index % len(entries)])
    return edit


def _rename(message, value):
    """Rewrite one name of the name table (the only place entries are named)."""
    index, name = value
    try:
        names = zlib.decompress(message.names).decode().split("\n")
    except (zlib.error, UnicodeDecodeError):  # an earlier edit replaced the table
        return
    names[index % len(names)] = name
    message.names = zlib.compress("\n".join(names).encode())


def _name_entry(message, value):
    """An entry that names itself, as codec version 1 allowed (field 1, reserved now)."""
    index, name = value
    entries = [*message.masked, *message.dense]
    if not entries:
        return
    raw = name.encode()[:100]
    entries[index % len(entries)].MergeFromString(bytes([(1 << 3) | 2, len(raw)]) + raw)


def _poison_value(message, value):
    index, number = value
    entry = message.masked[index % len(message.masked)]
    entry.values = torch.tensor([number], dtype=torch.float32).numpy().tobytes() + entry.values[4:]


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
which = st.integers(0, 50)
FIELD_EDITS = st.one_of(
    st.tuples(st.just(_set_header("codec_version")), u32),
    st.tuples(st.just(_set_header("phase")), u32),
    st.tuples(st.just(_set_header("round")), u32),
    st.tuples(st.just(_set_header("mask_digest")), st.text(max_size=70)),
    st.tuples(st.just(_set_header("value_dtype")), st.integers(0, 6)),
    st.tuples(st.just(_set_header("kind")), st.integers(0, 6)),
    st.tuples(st.just(_rename), st.tuples(which, st.text(max_size=20))),
    st.tuples(st.just(_name_entry), st.tuples(which, st.text(max_size=20))),
    st.tuples(st.just(lambda message, table: setattr(message, "names", table)), st.binary(max_size=32)),
    st.tuples(st.just(_edit_entry("masked", "shape")), st.tuples(which, st.lists(st.integers(0, 2**20), max_size=5))),
    st.tuples(st.just(_edit_entry("masked", "nnz")), st.tuples(which, u64)),
    st.tuples(st.just(_edit_entry("masked", "values")), st.tuples(which, st.binary(max_size=64))),
    st.tuples(st.just(_edit_entry("dense", "dtype")), st.tuples(which, st.sampled_from(["float32", "float16", "int64", "x", ""]))),
    st.tuples(st.just(_edit_entry("dense", "data")), st.tuples(which, st.binary(max_size=64))),
    st.tuples(st.just(_drop_entry("masked")), which),
    st.tuples(st.just(_drop_entry("dense")), which),
    st.tuples(st.just(_duplicate_entry("masked")), which),
    st.tuples(st.just(_duplicate_entry("dense")), which),
    st.tuples(st.just(_poison_value), st.tuples(which, st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))),
    st.tuples(st.just(lambda message, bits: setattr(message, "mask_bits", bits)), st.binary(max_size=32)),
    st.tuples(st.just(lambda message, n: setattr(message, "num_examples", n)), u64),
)


def field_mutant(base: bytes, edits) -> bytes:
    message = pb.SparsePayload.FromString(base)  # the trailer parses as field crc32; _seal replaces it
    for edit, value in edits:
        edit(message, value)
    return codec._seal(message)


@st.composite
def byte_mutant(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position]
        else:
            del data[position:]
        if not data:
            break
    return bytes(data)


MUTANTS = st.one_of(
    st.binary(max_size=2048),
    st.builds(field_mutant, st.sampled_from(GOOD), st.lists(FIELD_EDITS, min_size=1, max_size=3)),
    st.sampled_from(GOOD).flatmap(byte_mutant),
)


def test_the_sealed_message_is_the_payload_minus_its_trailer():
    assert field_mutant(GOOD[0], []) == GOOD[0]  # the mutants start from the real payload


@FUZZ
@given(MUTANTS)
def test_decoder_refuses_or_returns_a_payload_that_fits(data):
    try:
        decoded = decode_update(data)
    except codec.PayloadError:
        return
    assert_fits_the_model(decoded)


@FUZZ
@given(st.lists(MUTANTS, min_size=1, max_size=4), st.permutations(range(6)))
def test_aggregator_averages_exactly_the_replies_that_decode(mutants, order):
    payloads = [*GOOD, *mutants]
    updates = [Update(node, payloads[node], {}) for node in order if node < len(payloads)]
    accepted = {}
    for update in updates:
        try:
            decoded = decode_update(update.payload)
        except codec.PayloadError:
            continue
        if 0 < decoded.num_examples <= 10**9:
            accepted[update.node] = decoded.to_state_dict(STRATEGY.soup)

    STRATEGY.engine.state = {k: v.clone() for k, v in BASE_SOUP.items()}
    STRATEGY.current = RoundLog(2, 1, 1, 0.0)
    STRATEGY.aggregate_updates(2, updates)

    log = STRATEGY.current
    assert set(log.rejected) == {u.node for u in updates} - set(accepted)
    assert all(isinstance(reason, str) and reason for reason in log.rejected.values())
    assert log.accepted == len(accepted) >= 2
    for name, value in STRATEGY.soup.items():
        if value.is_floating_point():
            expected = torch.stack([state[name] for state in accepted.values()]).mean(0)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for name, keep in STRATEGY.mask.items():
        assert torch.count_nonzero(STRATEGY.soup[name][~keep]) == 0
