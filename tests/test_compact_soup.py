"""Between the rounds of a phase the soup stays compact (``fedsms.merge.Soup``: the mean's
values under the mask): the streamed merge never builds the dense state, sending it writes
the bytes its full state dict would, checking it reads its blocks, and it stands for that
full state wherever one is read. Replies are read in place from their records (no copy)."""

import io
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from helpers import LocalGrid, make_strategy, partitions
from numpy.lib import format as npy

from fedsms import codec
from fedsms.engine import SoupEngine
from fedsms.masks import dense_mask, mask_digest, prunable_names, prune_state
from fedsms.merge import Soup, out_of_range, values_under_mask
from fedsms.models import build_model
from fedsms_client.app import make_client_app
from fedsms_flower.records import KEY, SOUP_KEY, npy_data_offset, payload_of, record_of
from fedsms_server import gate

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_after_a_streamed_round(replies: int = 3) -> tuple[SoupEngine, list[dict]]:
    """A resnet20 (norm layers: float and integer dense extras) pruned to 80 %, then one
    uniform round of ``replies`` perturbed candidates read in place; the engine and the
    candidates' full states."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 32, 32))
    state, mask = prune_state(model.state_dict(), dense_mask(model, prunable_names(model)), 0.8)
    engine = SoupEngine(state, mask)
    reader = codec.UpdateReader(engine.mask, engine.soup, digest=engine.digest, phase=1, round=1)
    merge = engine.merge("uniform", ends_phase=False)
    candidates, payloads = [], []
    for i in range(replies):
        candidate = {
            k: (v + 0.01 * (i + 1) * torch.randn_like(v)) * mask[k] if k in mask else v + i for k, v in state.items()
        }
        candidates.append(candidate)
        payloads.append(codec.encode(candidate, mask, phase=1, round=1, kind="update", num_examples=10))
    for payload in payloads:  # kept alive: the replies are read in place
        merge.add_reply(reader.read(payload), 10)
    engine.end_round(merge)
    return engine, candidates


def test_a_streamed_round_keeps_the_soup_compact_and_it_stands_for_the_masked_mean():
    engine, candidates = engine_after_a_streamed_round()
    soup = engine.soup
    assert isinstance(soup, Soup) and soup._full is None  # nothing dense was built by the merge
    assert (
        list(soup) == list(candidates[0])
        and "net.conv1.weight" in soup
        and "conv1.weight" not in soup
        and len(soup) == len(candidates[0])
    )
    assert soup._full is None  # names, order and `in` read no tensor
    full = engine.state
    assert list(full) == list(candidates[0])
    for name, value in full.items():
        stacked = torch.stack([c[name] for c in candidates])
        if value.is_floating_point():
            torch.testing.assert_close(value, stacked.double().mean(0).float(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, stacked.max(0).values)  # num_batches_tracked
        assert value.dtype == candidates[0][name].dtype
    for name, keep in engine.mask.items():
        assert torch.count_nonzero(full[name][~keep]) == 0, name
    assert engine.state is full  # made dense once


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["soup", "update"])
def test_encoding_the_compact_soup_writes_the_bytes_of_its_full_state(value_dtype, kind):
    engine, _ = engine_after_a_streamed_round()
    compact = codec.encode(engine.soup, engine.mask, phase=1, round=2, kind=kind, value_dtype=value_dtype)
    assert engine.soup._full is None  # written from the blocks
    dense = codec.encode(dict(engine.state), engine.mask, phase=1, round=2, kind=kind, value_dtype=value_dtype)
    assert compact == dense


def test_a_compact_soup_out_of_range_is_named_when_sent_and_when_checked():
    engine, _ = engine_after_a_streamed_round()
    soup = engine.soup
    assert out_of_range(soup) is None and soup._full is None  # checked on its blocks
    broken = Soup(soup.layout, soup.values.clone(), soup.dense)
    broken.values[soup.layout.counts[0] + 3] = float("inf")  # in the second masked tensor
    second = soup.layout.masked[1]
    assert out_of_range(broken) == second
    with pytest.raises(codec.PayloadError, match=repr(second)):
        codec.encode(Soup(soup.layout, broken.values, soup.dense), engine.mask, phase=1, round=2, kind="soup")


def test_the_compact_soup_under_its_mask_pickles_and_restores_as_its_full_state():
    engine, _ = engine_after_a_streamed_round()
    soup, full = engine.soup, {k: v.clone() for k, v in engine.state.items()}
    compact = values_under_mask(soup, engine.mask)
    reference = values_under_mask(full, engine.mask)
    assert list(compact) == list(reference)
    assert all(torch.equal(compact[k], reference[k]) for k in reference)
    copy = pickle.loads(pickle.dumps(soup))
    assert type(copy) is dict and all(torch.equal(copy[k], full[k]) for k in full)
    other = {k: v.clone() for k, v in engine.mask.items()}  # an equal mask, another object: same digest
    assert soup.blocks_under(other) is not None
    first = next(iter(other))
    other[first] = ~other[first]
    assert mask_digest(other) != engine.digest and soup.blocks_under(other) is None
    engine.restore(copy, engine.mask)
    assert type(engine.soup) is dict and all(torch.equal(engine.state[k], full[k]) for k in full)


def test_a_payload_is_read_in_place_from_its_record_and_any_npy_layout_still_reads():
    payload = bytes(range(256)) * 40
    record = record_of(payload)
    view = payload_of(record)
    assert view.obj is record[KEY].data and view == payload  # a view of the record's own buffer
    gate.array_fits(KEY, record[KEY])
    # a version 2.0 header (valid .npy, not what np.save writes for it): parsed, then copied out
    out = io.BytesIO()
    array = np.frombuffer(payload, dtype=np.uint8)
    npy.write_array_header_2_0(out, npy.header_data_from_array_1_0(array))
    other = Array(dtype="uint8", shape=(len(payload),), stype="numpy.ndarray", data=out.getvalue() + payload)
    assert npy_data_offset(other) is None
    gate.array_fits(KEY, other)
    assert bytes(payload_of(ArrayRecord({KEY: other}))) == payload


def test_an_npy_header_that_disagrees_with_the_array_is_still_refused():
    payload = bytes(100)
    array = record_of(payload)[KEY]
    short = Array(dtype="uint8", shape=(100,), stype="numpy.ndarray", data=array.data[:-1])
    assert npy_data_offset(short) is not None  # the header is np.save's ...
    with pytest.raises(gate.Rejected, match="carries 99 bytes"):  # ... but the bytes are one short
        gate.array_fits(KEY, short)
    claims = Array(dtype="uint8", shape=(99,), stype="numpy.ndarray", data=array.data)
    assert npy_data_offset(claims) is None
    with pytest.raises(gate.Rejected, match="declares"):
        gate.array_fits(KEY, claims)


def test_the_strategy_merges_checks_and_sends_the_next_round_without_a_dense_soup(tmp_path):
    # server_data=None: nothing evaluates the soup centrally; round 1 is not closed (its
    # checkpoint reads the soup dense), as between aggregate_train and configure_train.
    strategy = make_strategy(tmp_path, server_data=None, pretrain_rounds=0, rounds_per_phase=2)
    grid = LocalGrid(make_client_app(), partitions(2))
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert strategy.merge_replies(1, replies) is not None
    soup = strategy.engine.soup
    assert isinstance(soup, Soup) and soup._full is None  # merged and checked on its blocks
    (message, *_) = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    assert strategy.engine.soup is soup and soup._full is None  # sent from its blocks
    sent = bytes(payload_of(message.content[SOUP_KEY]))
    assert sent == codec.encode(dict(strategy.soup), strategy.mask, phase=1, round=2, kind="soup")


def test_a_received_soup_is_written_into_the_models_own_tensors_as_load_state_dict_would():
    torch.manual_seed(0)
    sender = build_model("resnet20", 10, (3, 32, 32))
    state, mask = prune_state(sender.state_dict(), dense_mask(sender, prunable_names(sender)), 0.8)
    payload = codec.encode(state, mask, phase=1, round=1, kind="soup")
    receiver = build_model("resnet20", 10, (3, 32, 32))  # other weights
    conv = next(m for m in receiver.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 3)
    conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last)  # a strided parameter too
    template = receiver.state_dict()
    storage = {name: tensor.data_ptr() for name, tensor in template.items()}
    decoded = codec.decode(payload, expected_mask=None, expected_digest=None, template=template, expected_kind="soup")
    before = {name: tensor.clone() for name, tensor in template.items()}
    with pytest.raises(codec.PayloadError, match="missing"):
        decoded.load_into({**template, "head.extra": torch.zeros(2)})
    assert all(torch.equal(receiver.state_dict()[k], before[k]) for k in before)  # refused before any write
    decoded.load_into(template)
    after = receiver.state_dict()
    assert {name: tensor.data_ptr() for name, tensor in after.items()} == storage  # in place
    assert all(torch.equal(after[k], state[k]) for k in state)  # the sender's pruned state, exactly
