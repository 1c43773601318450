"""Client codec cost: per client per round, decode of the soup and encode of the reply.

    python bench/client_codec.py [--model cnn tv:resnet18 tv:resnet50] [--repeats 5] [--out results/client_codec.json]

What ``fedsms_client.toolkit`` does each round: ``receive`` = the payload read in place
from its record (``payload_of``), ``codec.decode`` of it (mask bits included, every check)
and ``Decoded.load_into`` the model's own tensors (until 2026-12-04: a copy of the payload
out of its record, ``Decoded.to_state_dict`` and ``model.load_state_dict``); ``reply`` =
``codec.encode`` of the trained state as an
``update`` under the mask. Each model is pruned to 90 % (global magnitude). For ``cnn`` the
two are set against one epoch of training on the digits data (plain SGD, batch 32, one torch
thread), the digits-sized model of the demo; the big models report ms and MB/s of payload.
"""

from __future__ import annotations

import time

import torch
from common import interleaved, median, parser, report

from fedsms import codec
from fedsms.models import build_model
from fedsms_flower.records import payload_of, record_of

SPARSITY = 0.9


def pruned(model_name: str, input_shape: tuple[int, ...], classes: int):
    torch.manual_seed(0)
    model = build_model(model_name, classes, input_shape)
    state = model.state_dict()
    weights = [n for n, t in state.items() if t.dim() > 1 and t.is_floating_point()]
    flat = torch.cat([state[n].abs().flatten() for n in weights])
    cut = flat.kthvalue(int(SPARSITY * flat.numel())).values
    mask = {n: state[n].abs() > cut for n in weights}
    for n in weights:
        state[n].mul_(mask[n])
    return model, state, mask


def epoch_seconds(model: torch.nn.Module) -> tuple[float, int]:
    from fedsms.data import load_dataset

    splits = load_dataset("digits")
    x = splits.train.images.float()
    y = splits.train.labels.long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        optimizer.step()
    return time.perf_counter() - start, len(x)


def measure(model_name: str, repeats: int, tiny: bool) -> dict:
    if model_name == "cnn":
        from fedsms.data import load_dataset

        splits = load_dataset("digits")
        shape, classes = tuple(splits.input_shape), splits.num_classes
    else:
        shape, classes = (3, 32, 32), 10
    model, state, mask = pruned(model_name, shape, classes)
    soup = codec.encode(state, mask, phase=1, round=1, kind="soup")
    record = record_of(soup)
    template = model.state_dict()

    def receive() -> None:
        decoded = codec.decode(
            payload_of(record),
            expected_mask=None,
            expected_digest=None,
            template=template,
            expected_phase=1,
            expected_round=1,
            expected_kind="soup",
        )
        decoded.load_into(template)

    reply_bytes = [0]

    def reply() -> None:
        reply_bytes[0] = len(codec.encode(model.state_dict(), mask, phase=1, round=1, kind="update", num_examples=1))

    times = interleaved({"decode": receive, "encode": reply}, repeats)
    decode_s, encode_s = median(times["decode"]), median(times["encode"])
    row = {
        "model": model_name,
        "soup_bytes": len(soup),
        "reply_bytes": reply_bytes[0],
        "decode_ms": 1000 * decode_s,
        "encode_ms": 1000 * encode_s,
        "decode_MBps": len(soup) / decode_s / 1e6,
        "encode_MBps": reply_bytes[0] / encode_s / 1e6,
        "epoch_s": float("nan"),
        "codec_over_epoch": float("nan"),
    }
    if model_name == "cnn":
        epochs = [epoch_seconds(model)[0] for _ in range(1 if tiny else max(1, repeats // 2))]
        row["epoch_s"] = median(epochs)
        row["codec_over_epoch"] = (decode_s + encode_s) / row["epoch_s"]
    return row


COLUMNS = [
    ("model", "model", "s"),
    ("soup_bytes", "soup B", "d"),
    ("reply_bytes", "reply B", "d"),
    ("decode_ms", "decode ms", ".2f"),
    ("decode_MBps", "decode MB/s", ".0f"),
    ("encode_ms", "encode ms", ".2f"),
    ("encode_MBps", "encode MB/s", ".0f"),
    ("epoch_s", "epoch s", ".2f"),
    ("codec_over_epoch", "codec/epoch", ".3f"),
]


def main() -> None:
    p = parser(__doc__, "results/client_codec.json", repeats=5)
    p.add_argument("--model", nargs="+", default=["cnn", "tv:resnet18", "tv:resnet50"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = ["cnn"] if args.tiny else args.model
    rows = [measure(m, args.repeats, args.tiny) for m in models]
    report(
        args.out,
        rows,
        COLUMNS,
        sparsity=SPARSITY,
        target="decode + encode per client per round <= 5% of one epoch on digits (cnn)",
    )


if __name__ == "__main__":
    main()
