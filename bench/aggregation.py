"""Aggregation: server time and peak memory to aggregate m replies through the real path.

    python bench/aggregation.py [--model tv:resnet18 tv:resnet50] [--clients 4 16 64] [--repeats 5] [--out results/aggregation.json]

The defaults are the full matrix of the target (issue 14 point 1): tv:resnet18 and
tv:resnet50 at 90 % sparsity, m = 4, 16, 64, 5 repeats; about a minute on a 2-core machine
(44 s with ``--repeats 3`` at load 4-6) (``--model tv:resnet18 --clients 4 16 --repeats 3`` for a quick look).
Install the ``fast`` extra (``pip install -e '.[fast]'``: ISA-L's CRC-32) for the
server's fast checksum; the table's header names the CRC-32 implementation in use.

One child process per m (so memory figures do not mix). In it, a ``SparseSoupStrategy``
for the model prunes to 90 % (``configure_train`` of round 1), then ``merge_replies`` (what
``aggregate_train`` and ``start`` run: the gate unpacking each reply Message,
``codec.UpdateReader`` reading it in place with every check, the flat streaming sum, the
round's soup from it, kept compact: the mean's values under the mask) takes the list of m
reply Messages, as Flower's grid hands them over (each carrying its own copy of one encoded
update; made before the timing and the memory baseline).
Until the strategy's hooks took Messages, the bench handed the strategy unpacked payloads
from a generator: the ``unpack`` stage (the gate's copy of the payload out of its record)
was not timed then; the ``excl. unpack`` column takes it off again, for comparison with
those figures.

Throughput is set against a plain memory copy (``numpy.copyto`` into a preallocated
buffer) of the same m·payload bytes: each reply's own payload, as the aggregation reads
them (``memcpy``), timed interleaved with the aggregation in the same process. Until
2026-12-04 the copy read one payload m times, from the cache (``hot memcpy``, still
printed: the comparator of the earlier tables; 1.5-2x the other on this machine). Each
stage's own cost is timed apart on one reply (``checks_ms``: the CRC-32 in use and zlib's,
the layout walk, the whole checked read, the finiteness pass, the add, a memcpy of the
reply) and once per soup (``make_dense``: the full state dict from the compact soup, paid
where a tensor is read: evaluation, pruning, the checkpoint; until 2026-12-04 every round's
aggregation paid it).
Peak memory is the child's peak RSS (Linux VmHWM, reset through ``/proc/self/clear_refs``
just before the timed aggregations, the m replies already in memory, so every allocator
counts, torch's included) minus its RSS at that moment: what aggregating adds.

Columns: ``MB/s`` the m replies' bytes over the aggregation time; ``memcpy MB/s`` the same
bytes copied; ``vs memcpy`` their ratio (target >= 0.5); ``vs hot memcpy`` the ratio to the
copy of one payload m times; ``excl. CRC`` the ratio to memcpy with
m CRC-32 passes (the stage's median) taken off the aggregation time: analysis of what the
checksum costs, not the target; ``peak/(soup+reply)`` the peak over the soup plus one reply;
``peak <= 2 soup + reply`` whether the memory target holds.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time

import numpy as np
import torch
from common import interleaved, median, parser, peak_rss, peak_rss_reset, report, rss
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsms import codec
from fedsms.config import FederationConfig, RunConfig
from fedsms.models import build_model
from fedsms_flower.local_grid import LocalGrid, partitions, train_reply
from fedsms_flower.records import UPDATE_KEY, payload_of, record_of
from fedsms_server import gate
from fedsms_server.strategy import SparseSoupStrategy

SPARSITY = 0.9


def measure(model_name: str, m: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = RunConfig(model=model_name, phases=1, target_sparsity=SPARSITY, ood=False)
    fed = FederationConfig(pretrain_rounds=0, min_train_clients=1)
    with tempfile.TemporaryDirectory() as out_dir:
        strategy = SparseSoupStrategy(
            run, fed, build_model(model_name, 10, (3, 32, 32)), server_data=None, out_dir=out_dir, log=lambda _: None
        )
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), LocalGrid(None, partitions(m)))  # prunes to 90 %
        soup_bytes = sum(t.numel() * t.element_size() for t in strategy.soup.values())
        update = codec.encode(strategy.soup, strategy.mask, phase=1, round=1, kind="update", num_examples=100)
        replies = [reply_message(node, update) for node in range(m)]  # as the grid hands them over

        def aggregate() -> float:
            start = time.perf_counter()
            metrics = strategy.merge_replies(1, replies)
            elapsed = time.perf_counter() - start
            assert metrics is not None, "a reply was rejected"
            return elapsed

        sources = [np.frombuffer(payload_of(r.content[UPDATE_KEY]), dtype=np.uint8) for r in replies]
        target = np.empty_like(sources[0])

        def memcpy() -> None:  # the replies' own bytes, as the aggregation reads them
            for source in sources:
                np.copyto(target, source)

        def hot_memcpy() -> None:  # one payload m times, from the cache
            for _ in range(m):
                np.copyto(target, sources[0])

        peak_rss_reset()
        before = rss()
        times = interleaved({"aggregate": aggregate, "memcpy": memcpy, "hot_memcpy": hot_memcpy}, repeats)
        peak = peak_rss() - before
    checks = check_costs(strategy, update, repeats)
    agg, copy, hot = median(times["aggregate"]), median(times["memcpy"]), median(times["hot_memcpy"])
    nnz = sum(int(k.sum()) for k in strategy.mask.values())
    return {
        "model": model_name,
        "clients": m,
        "torch_threads": threads,
        "sparsity": SPARSITY,
        "nnz": nnz,
        "payload_bytes": len(update),
        "soup_bytes": soup_bytes,
        "aggregate_s": agg,
        "per_reply_ms": 1000 * agg / m,
        "memcpy_s": copy,
        "aggregate_MBps": m * len(update) / agg / 1e6,
        "memcpy_MBps": m * len(update) / copy / 1e6,
        "throughput_vs_memcpy": copy / agg,
        "hot_memcpy_s": hot,
        "throughput_vs_hot_memcpy": hot / agg,
        "throughput_vs_memcpy_without_crc": copy / max(agg - m * checks["crc32"] / 1000, 1e-9),
        "throughput_vs_memcpy_without_unpack": copy / max(agg - m * checks["unpack"] / 1000, 1e-9),
        "crc32_implementation": codec.CRC32_IMPLEMENTATION,
        "peak_delta_bytes": peak,
        "peak_over_soup": peak / soup_bytes,
        "peak_over_soup_plus_reply": peak / (soup_bytes + len(update)),
        "memory_target": "met" if peak <= 2 * soup_bytes + len(update) else "missed",
        "checks_ms": checks,
        "crc_ms": checks["crc32"],
        "aggregate_runs_s": times["aggregate"],
        "memcpy_runs_s": times["memcpy"],
        "hot_memcpy_runs_s": times["hot_memcpy"],
    }


def check_costs(strategy, update: bytes, repeats: int) -> dict[str, float]:
    """Milliseconds of each stage of reading and adding one reply (medians)."""
    import zlib

    from fedsms.merge import FlatSum

    reader = codec.UpdateReader(strategy.mask, strategy.soup, digest=strategy.digest, phase=1, round=1)
    reply = reader.read(update)
    message = reply_message(0, update)
    assert isinstance(reply, codec.FlatReply)
    body = memoryview(update)[:-5]
    total = FlatSum()
    total.add(reply)
    merge = strategy.engine.merge("uniform", ends_phase=False)
    merge.add_reply(reply, 1)
    soup = merge.flat_state(strategy.digest)
    stages = {
        "unpack": lambda: gate.train_reply(message),
        "crc32": lambda: codec._crc32(body),
        "crc32_zlib": lambda: zlib.crc32(body),
        "open_parse": lambda: codec._split(memoryview(update), len(update) - 5),
        "read_all_checks": lambda: reader.read(update),
        "finite": lambda: codec.in_range(reply.values),
        "add": lambda: total.add(reply),
        "memcpy_one": lambda: bytes(bytearray(body)),
        "make_dense": lambda: type(soup)(soup.layout, soup.values, soup.dense).full(),
    }
    times = interleaved({name: (lambda f=f: f() and None) for name, f in stages.items()}, max(repeats, 5))
    return {name: 1000 * median(t) for name, t in times.items()}


def reply_message(node: int, update: bytes):
    """The train reply Message of ``node`` carrying a fresh copy of ``update``."""
    content = RecordDict({"update": record_of(update), "metrics": MetricRecord({"train_loss": 0.5})})
    return train_reply(1, node, node, content)


def _child(args: tuple, queue) -> None:
    try:
        queue.put(measure(*args))
    except BaseException:  # the parent waits on the queue: tell it, do not leave it hanging
        import traceback

        queue.put({"error": traceback.format_exc()})
        raise


def measure_in_child(model_name: str, m: int, repeats: int, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=((model_name, m, repeats, threads), queue))
    child.start()
    row = queue.get()
    child.join()
    if "error" in row:
        raise RuntimeError(f"measuring {model_name} with m = {m} failed:\n{row['error']}")
    return row


COLUMNS = [
    ("clients", "m", "d"),
    ("payload_bytes", "reply B", "d"),
    ("aggregate_s", "aggregate s", ".3f"),
    ("per_reply_ms", "ms/reply", ".1f"),
    ("aggregate_MBps", "MB/s", ".0f"),
    ("memcpy_MBps", "memcpy MB/s", ".0f"),
    ("throughput_vs_memcpy", "vs memcpy", ".3f"),
    ("throughput_vs_hot_memcpy", "vs hot memcpy", ".3f"),
    ("throughput_vs_memcpy_without_crc", "excl. CRC (analysis)", ".3f"),
    ("throughput_vs_memcpy_without_unpack", "excl. unpack", ".3f"),
    ("peak_delta_bytes", "peak +B", "d"),
    ("peak_over_soup_plus_reply", "peak/(soup+reply)", ".2f"),
    ("memory_target", "peak <= 2 soup + reply", "s"),
    ("crc_ms", "crc32 ms", ".2f"),
]


def main() -> None:
    p = parser(__doc__, "results/aggregation.json", repeats=5)
    p.add_argument(
        "--model", nargs="+", default=["tv:resnet18", "tv:resnet50"], help="models (default: tv:resnet18 tv:resnet50)"
    )
    p.add_argument(
        "--clients", nargs="+", type=int, default=[4, 16, 64], help="numbers of replies m (default: 4 16 64)"
    )
    # One thread by default: on a shared, oversubscribed CPU torch's OpenMP team of 2 spins
    # waiting for a descheduled partner and runs elementwise ops ~10x slower than 1 thread.
    p.add_argument("--threads", type=int, default=1, help="torch threads in the measuring process (default 1)")
    args = p.parse_args()
    models, clients = (["cnn"], [2, 4]) if args.tiny else (args.model, args.clients)
    rows = [measure_in_child(model, m, args.repeats, args.threads) for model in models for m in clients]
    print(f"CRC-32: {codec.CRC32_IMPLEMENTATION}'s; torch threads: {args.threads}")
    for row in rows:
        print(
            f"{row['model']} m={row['clients']}: one reply's stages (ms): "
            + ", ".join(f"{k} {v:.3f}" for k, v in row["checks_ms"].items())
        )
    report(
        args.out,
        rows,
        [("model", "model", "s"), *COLUMNS],
        models=models,
        crc32=codec.CRC32_IMPLEMENTATION,
        target="peak memory independent of m and <= 2x the soup plus one reply; throughput >= 0.5x memcpy of the same bytes",
        memory="peak RSS (VmHWM after clear_refs) of the child process minus its RSS before aggregating",
        holds="the m reply Messages (each its own copy of one encoded update), made before the baseline",
    )


if __name__ == "__main__":
    main()
