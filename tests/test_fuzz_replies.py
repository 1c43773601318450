"""Property-based: random and mutated payloads never reach the soup. The decoder refuses
exactly the payloads that an independent reference reader written from the schema
(``wire_reference``) refuses, and returns the values that reader returns; the aggregator
averages exactly the replies the reference reader accepts and logs the rest.

Nothing is built at import time: the world (a pruned cnn soup and two replies, made by
perturbing the soup rather than by training) is built on first use. The aggregator is
driven through the strategy's Flower hooks: ``configure_train`` opens (or reopens) round 2
from the world's soup, ``aggregate_train`` takes the replies as Messages, and
``aggregate_evaluate`` closes the round, whose record is then ``strategy.rounds[-1]``."""

import atexit
import math
import shutil
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wire_reference as ref
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, make_strategy, partitions, reply_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsms import codec
from fedsms.wire import payload_pb2 as pb
from fedsms_client.app import make_client_app

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@lru_cache(maxsize=1)
def world() -> SimpleNamespace:
    """A cnn strategy in round 2 (phase 1: pruned, the mask is sparse) and two valid replies.
    Two rounds a phase, so round 2 only merges (its phase does not end there). Closing a
    round writes its line and checkpoint to a private folder, removed at exit."""
    out = Path(tempfile.mkdtemp(prefix="fedsms-fuzz-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    strategy = make_strategy(out, model="cnn", rounds_per_phase=2)
    grid = LocalGrid(make_client_app(), partitions(2))
    assert not strategy.schedule[1].ends_phase and strategy.schedule[1].prune is not None
    strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)  # opens phase 1: prunes
    base = {k: v.clone() for k, v in strategy.soup.items()}
    good = []
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        state = {
            k: (v + 0.01 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v + seed
            for k, v in base.items()
        }
        state = {k: v * strategy.mask[k] if k in strategy.mask else v for k, v in state.items()}
        good.append(codec.encode(state, strategy.mask, phase=1, round=2, kind="update", num_examples=120))
    return SimpleNamespace(strategy=strategy, base=base, good=good, grid=grid)


def aggregated(replies: list):
    """Round 2 merged from the world's starting soup, as Flower's loop runs it: the soup
    handed to ``configure_train`` (a retry of the round: no second prune), the replies to
    ``aggregate_train``, then ``aggregate_evaluate`` closes the round. Its record."""
    w = world()
    strategy = w.strategy
    strategy.configure_train(2, ArrayRecord(w.base), ConfigRecord(), w.grid)
    assert all(torch.equal(strategy.soup[k], w.base[k]) for k in w.base)  # the round starts from the world's soup
    strategy.aggregate_train(2, replies)
    strategy.aggregate_evaluate(2, [])
    return strategy.rounds[-1]


def good_payload() -> st.SearchStrategy[bytes]:
    return st.integers(0, 1).map(lambda i: world().good[i])


def decode_update(data: bytes) -> codec.Decoded:
    """Exactly what the server expects of a round-2 reply."""
    s = world().strategy
    return codec.decode(
        data,
        expected_mask=s.mask,
        expected_digest=s.digest,
        template=s.soup,
        expected_phase=1,
        expected_round=2,
        expected_kind="update",
    )


@lru_cache(maxsize=64)  # the valid replies come back in every example
def reference_read(data: bytes) -> dict | None:
    """The reference reader's verdict: the payload's contents, or None when it refuses."""
    s = world().strategy
    try:
        return ref.read(data, mask=s.mask, template=s.soup, kind="update", phase=1, round=2)
    except ref.Refused:
        return None


def reference_state(read: dict) -> dict[str, torch.Tensor]:
    """The full state a reply read by the reference stands for: zeros outside the mask."""
    s = world().strategy
    state = {}
    for name, like in s.soup.items():
        if name in s.mask:
            full = torch.zeros(like.shape, dtype=torch.float32)
            full[s.mask[name]] = read["values"][name]
            state[name] = full.to(like.dtype)
        else:
            state[name] = read["dense"][name]
    return state


# ---- mutations: bytes, and fields of a re-sealed message (a valid checksum) --------------


def _set_header(field):
    def edit(message, value):
        setattr(message.header, field, value)

    return edit


def _edit_block(field):
    """Bytes of a block (``values`` or ``dense_data``) from some offset on replaced by others."""

    def edit(message, value):
        index, raw = value
        block = getattr(message, field)
        at = (4 * index) % (len(block) + 1)
        setattr(message, field, block[:at] + raw)

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
    masked = list(message.masked)
    at = 4 * sum(e.nnz for e in masked[: index % len(masked)])  # fp32 values in one block, in mask order
    raw = torch.tensor([number], dtype=torch.float32).numpy().tobytes()
    message.values = message.values[:at] + raw + message.values[at + 4 :]


def _poison_dense(message, value):
    """A non-finite (or huge) number at the start of a float32 dense extra (a bias, a norm statistic)."""
    index, number = value
    sizes = {pb.DENSE_DTYPE_FLOAT32: 4, pb.DENSE_DTYPE_FLOAT64: 8, pb.DENSE_DTYPE_INT64: 8}
    starts, at = [], 0
    for entry in message.dense:
        count = math.prod(entry.shape)
        if entry.dtype == pb.DENSE_DTYPE_FLOAT32 and count:
            starts.append(at)
        at += count * sizes.get(entry.dtype, 4)
    if starts:
        start = starts[index % len(starts)]
        raw = torch.tensor([number], dtype=torch.float32).numpy().tobytes()
        message.dense_data = message.dense_data[:start] + raw + message.dense_data[start + 4 :]


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
    st.tuples(st.just(_edit_block("values")), st.tuples(which, st.binary(max_size=64))),
    st.tuples(st.just(_edit_entry("dense", "dtype")), st.tuples(which, st.sampled_from([1, 2, 5, 0, 11, 99]))),
    st.tuples(st.just(_edit_block("dense_data")), st.tuples(which, st.binary(max_size=64))),
    st.tuples(st.just(_drop_entry("masked")), which),
    st.tuples(st.just(_drop_entry("dense")), which),
    st.tuples(st.just(_duplicate_entry("masked")), which),
    st.tuples(st.just(_duplicate_entry("dense")), which),
    st.tuples(st.just(_poison_value), st.tuples(which, st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))),
    st.tuples(st.just(_poison_dense), st.tuples(which, st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))),
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
    st.builds(field_mutant, good_payload(), st.lists(FIELD_EDITS, min_size=1, max_size=3)),
    good_payload().flatmap(byte_mutant),
)


def test_the_sealed_message_is_the_payload_minus_its_trailer():
    assert field_mutant(world().good[0], []) == world().good[0]  # the mutants start from the real payload


def test_the_reference_reader_reads_the_valid_replies_as_the_codec_does():
    for payload in world().good:
        read, decoded = reference_read(payload), decode_update(payload)
        assert read is not None and read["num_examples"] == decoded.num_examples == 120
        assert all(torch.equal(read["values"][n], decoded.values[n]) for n in decoded.values)
        assert all(torch.equal(read["dense"][n], decoded.dense[n]) for n in decoded.dense)


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16", "bf16"])
def test_the_reference_reader_agrees_on_every_value_dtype(value_dtype):
    s = world().strategy
    first = codec.decode(world().good[0], expected_mask=s.mask, expected_digest=None, template=s.soup)
    state = first.to_state_dict(s.soup)
    payload = codec.encode(state, s.mask, phase=1, round=2, kind="update", value_dtype=value_dtype, num_examples=7)
    read, decoded = reference_read(payload), decode_update(payload)
    assert read is not None and all(torch.equal(read["values"][n], decoded.values[n]) for n in decoded.values)
    if value_dtype != "fp32":  # really rounded: the reader had to convert the half values itself
        assert any(not torch.equal(read["values"][n], state[n][s.mask[n]]) for n in s.mask)


def _swap_dense(message, _):
    """The first two dense entries change places, names and all: the order is not the schema's
    (state-dict order) but each entry is still named right."""
    dense = list(message.dense)
    masked, names = codec._names(message)
    sizes = {pb.DENSE_DTYPE_FLOAT32: 4, pb.DENSE_DTYPE_FLOAT64: 8, pb.DENSE_DTYPE_INT64: 8}
    one, two = (math.prod(e.shape) * sizes.get(e.dtype, 4) for e in dense[:2])
    data = message.dense_data
    message.dense_data = data[one : one + two] + data[:one] + data[one + two :]  # their bytes swap too
    first, second = dense[0].SerializeToString(), dense[1].SerializeToString()
    message.dense[0].ParseFromString(second)
    message.dense[1].ParseFromString(first)
    names[0], names[1] = names[1], names[0]
    message.names = zlib.compress("\n".join(masked + names).encode())


# Every kind of edit once, so each rule is held against the reference whatever the fuzzer draws.
SINGLE_EDITS = {
    "version 1": (_set_header("codec_version"), 1),
    "version 2": (_set_header("codec_version"), 2),
    "version 4": (_set_header("codec_version"), 4),
    "phase": (_set_header("phase"), 2),
    "round": (_set_header("round"), 3),
    "digest": (_set_header("mask_digest"), "0" * 64),
    "no dtype": (_set_header("value_dtype"), 0),
    "fp16 label on fp32 bytes": (_set_header("value_dtype"), 2),
    "unknown dtype": (_set_header("value_dtype"), 5),
    "no kind": (_set_header("kind"), 0),
    "soup kind": (_set_header("kind"), 1),
    "stats kind": (_set_header("kind"), 3),
    "renamed masked": (_rename, (0, "net.other.weight")),
    "renamed dense": (_rename, (-1, "net.other.bias")),
    "dense named twice": (_rename, (-1, "net.features.1.weight")),
    "self-named entry": (_name_entry, (0, "w")),
    "name table garbage": (lambda m, v: setattr(m, "names", v), b"\x78\x9c\x00"),
    "no name table": (lambda m, v: setattr(m, "names", v), b""),
    "masked shape": (_edit_entry("masked", "shape"), (0, [5])),
    "nnz": (_edit_entry("masked", "nnz"), (0, 1)),
    "values short": (_edit_block("values"), (0, b"abcd")),
    "dense dtype": (_edit_entry("dense", "dtype"), (0, pb.DENSE_DTYPE_FLOAT16)),
    "dense int": (_edit_entry("dense", "dtype"), (0, pb.DENSE_DTYPE_INT64)),
    "dense dtype unknown": (_edit_entry("dense", "dtype"), (0, 11)),
    "dense data": (_edit_block("dense_data"), (0, b"")),
    "drop masked": (_drop_entry("masked"), 0),
    "drop dense": (_drop_entry("dense"), 0),
    "duplicate masked": (_duplicate_entry("masked"), 0),
    "duplicate dense": (_duplicate_entry("dense"), 0),
    "nan": (_poison_value, (0, math.nan)),
    "inf": (_poison_value, (1, math.inf)),
    "finite 1e30": (_poison_value, (2, 1e30)),
    "9e19, under the limit": (_poison_value, (3, 9e19)),
    "-3e20, over it": (_poison_value, (3, -3e20)),
    "nan in a bias": (_poison_dense, (0, math.nan)),
    "inf in a norm statistic": (_poison_dense, (3, -math.inf)),
    "mask bits in an update": (lambda m, v: setattr(m, "mask_bits", v), b"\x01\x02"),
    "no examples": (lambda m, v: setattr(m, "num_examples", v), 0),
    "many examples": (lambda m, v: setattr(m, "num_examples", v), 2**40),
    "dense in another order": (_swap_dense, None),
}


@pytest.mark.parametrize("edit", list(SINGLE_EDITS))
def test_each_kind_of_edit_is_judged_as_the_reference_judges_it(edit):
    test_decoder_refuses_exactly_what_the_reference_refuses_and_reads_the_same_values.hypothesis.inner_test(
        field_mutant(world().good[0], [SINGLE_EDITS[edit]])
    )


@FUZZ
@given(MUTANTS)
def test_decoder_refuses_exactly_what_the_reference_refuses_and_reads_the_same_values(data):
    expected = reference_read(data)
    try:
        decoded = decode_update(data)
    except codec.PayloadError:
        assert expected is None, "the codec refused a payload the schema allows"
        return
    assert expected is not None, "the codec accepted a payload the schema refuses"
    assert decoded.num_examples == expected["num_examples"]
    for name, values in expected["values"].items():
        assert torch.equal(decoded.values[name], values), name
    for name, tensor in expected["dense"].items():
        assert decoded.dense[name].dtype == tensor.dtype and torch.equal(decoded.dense[name], tensor), name
    s = world().strategy
    state = decoded.to_state_dict(s.soup)
    for name, keep in s.mask.items():
        assert torch.count_nonzero(state[name][~keep]) == 0


@settings(FUZZ, max_examples=40)
@given(st.lists(MUTANTS, min_size=1, max_size=4), st.permutations(range(6)))
def test_aggregator_averages_exactly_the_replies_the_reference_accepts(mutants, order):
    w = world()
    strategy = w.strategy
    payloads = [*w.good, *mutants]
    nodes = [node for node in order if node < len(payloads)]  # the order the replies arrive in
    accepted = {}
    for node in nodes:
        read = reference_read(payloads[node])
        if read is not None and 0 < read["num_examples"] <= 10**9:
            accepted[node] = reference_state(read)

    log = aggregated([reply_of(2, node, node, payloads[node]) for node in nodes])

    assert (log.server_round, log.phase) == (2, 1)
    assert set(log.rejected) == set(nodes) - set(accepted)
    assert all(isinstance(reason, str) and reason for reason in log.rejected.values())
    assert log.accepted == len(accepted) >= 2
    for name, value in strategy.soup.items():
        stacked = torch.stack([state[name] for state in accepted.values()])
        if value.is_floating_point():
            torch.testing.assert_close(value, stacked.double().mean(0).float(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, stacked.max(0).values)
    for name, keep in strategy.mask.items():
        assert torch.count_nonzero(strategy.soup[name][~keep]) == 0


def test_a_reply_with_an_absurd_finite_value_never_reaches_the_soup():
    w = world()
    strategy = w.strategy
    poisoned = field_mutant(w.good[1], [(_poison_value, (0, 1e30))])
    log = aggregated([reply_of(2, i, i, p) for i, p in enumerate([w.good[0], poisoned, w.good[0]])])
    assert set(log.rejected) == {1} and log.accepted == 2
    assert all(float(v.abs().max()) < 1e6 for v in strategy.soup.values() if v.is_floating_point())


def test_a_reply_claiming_absurdly_many_examples_never_reaches_the_soup():
    w = world()
    many = field_mutant(w.good[1], [(lambda message, n: setattr(message, "num_examples", n), 10**9 + 1)])
    assert reference_read(many) is not None  # the schema allows any count: plausibility is the server's call
    log = aggregated([reply_of(2, i, i, p) for i, p in enumerate([w.good[0], many, w.good[1]])])
    assert set(log.rejected) == {1} and "training examples" in log.rejected[1] and log.accepted == 2
