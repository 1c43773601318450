"""Wire: bytes per client per round, fedsms against Flower's FedAvg sending the dense model.

    python bench/wire_bytes.py [--models cnn resnet20] [--out results/wire_bytes.json]

For each model, sparsity (50/90/98 %) and value type (fp32, fp16) it encodes what a round
moves: down, the soup's values under the mask + packed mask bits + dense extras; up, a
reply's values under the mask + dense extras. Each is set against the lower bound
itemsize·nnz (+ N/8 mask bits down) + raw dense extras, and the target 1.02·bound + 4 KiB.
Flower's side is measured, not computed: the dense state dict in an ``ArrayRecord``
(what ``FedAvg`` puts in every message, both ways), deflated into the objects Flower's
transport moves (``get_all_nested_objects``, de-duplicated as Flower does). The fedsms
payload is measured both bare and inside its own ``ArrayRecord`` (``fedsms_flower.records``).
"""

from __future__ import annotations

import torch
from common import parser, report
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedsms import codec
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_model
from fedsms_flower.records import record_of

SHAPES = {
    "mlp": (1, 8, 8),
    "cnn": (1, 8, 8),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "tv:resnet18": (3, 32, 32),
}
SLACK = 4096  # the target allows 2 % + 4 KiB over the bound


def flower_bytes(record: ArrayRecord) -> int:
    """Bytes of the objects Flower's transport moves for ``record`` (each object once)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def measure(model_name: str, sparsity: float, value_dtype: str) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, 10, SHAPES[model_name])
    state = model.state_dict()
    mask = compute_mask(state, dense_mask(model, prunable_names(model)), sparsity)
    sparse_state = {k: v * mask[k] if k in mask else v for k, v in state.items()}
    down = codec.encode(sparse_state, mask, phase=1, round=1, kind="soup", value_dtype=value_dtype)
    up = codec.encode(sparse_state, mask, phase=1, round=1, kind="update", value_dtype=value_dtype, num_examples=1)
    bound_down = codec.payload_size_bound(mask, state, value_dtype, kind="soup")
    bound_up = codec.payload_size_bound(mask, state, value_dtype, kind="update")
    dense = flower_bytes(ArrayRecord(state))
    row = {
        "model": model_name,
        "sparsity": sparsity,
        "value_dtype": value_dtype,
        "tensors": len(state),
        "masked_tensors": len(mask),
        "down": len(down),
        "up": len(up),
        "bound_down": bound_down,
        "bound_up": bound_up,
        "down_in_flower": flower_bytes(record_of(down)),
        "up_in_flower": flower_bytes(record_of(up)),
        "fedavg_dense": dense,
    }
    row.update(
        overhead_down=row["down"] - bound_down,
        overhead_up=row["up"] - bound_up,
        down_over_bound=row["down"] / bound_down,
        up_over_bound=row["up"] / bound_up,
        down_over_dense=row["down_in_flower"] / dense,
        up_over_dense=row["up_in_flower"] / dense,
        within_target=row["down"] <= 1.02 * bound_down + SLACK and row["up"] <= 1.02 * bound_up + SLACK,
    )
    return row


COLUMNS = [
    ("model", "model", ">"),
    ("sparsity", "sparsity", ".0%"),
    ("value_dtype", "values", ">"),
    ("down", "down B", "d"),
    ("bound_down", "bound down", "d"),
    ("overhead_down", "over", "d"),
    ("up", "up B", "d"),
    ("bound_up", "bound up", "d"),
    ("overhead_up", "over", "d"),
    ("fedavg_dense", "FedAvg B", "d"),
    ("down_over_dense", "down/FedAvg", ".3f"),
    ("up_over_dense", "up/FedAvg", ".3f"),
    ("within_target", "target", ""),
]


def main() -> None:
    p = parser(__doc__, "results/wire_bytes.json", repeats=1)  # sizes are exact: --repeats is unused here
    p.add_argument("--models", nargs="+", default=["cnn", "resnet20"], choices=sorted(SHAPES))
    args = p.parse_args()
    models = ["cnn"] if args.tiny else args.models
    rows = [measure(m, s, d) for m in models for s in (0.5, 0.9, 0.98) for d in ("fp32", "fp16")]
    report(
        args.out,
        rows,
        COLUMNS,
        target="bytes <= 1.02 * bound + 4096, both ways",
        note="'B' columns are the bare fedsms payload; ratios to FedAvg use both inside their ArrayRecord "
        "as Flower's transport moves them",
    )


if __name__ == "__main__":
    main()
