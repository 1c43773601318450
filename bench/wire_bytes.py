"""Bytes per client per round: fedsms payloads (down: soup + mask bits, up: values under the
mask) against the dense model that Flower's FedAvg sends both ways, and against the lower
bound 4·nnz (+ N/8 mask bits down) + dense extras.

    python bench/wire_bytes.py [--models cnn resnet20] [--out results/wire_bytes.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedsms import codec
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "tv:resnet18": (3, 32, 32)}


def measure(model_name: str, sparsity: float, value_dtype: str) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, 10, SHAPES[model_name])
    state = model.state_dict()
    mask = compute_mask(state, dense_mask(model, prunable_names(model)), sparsity)
    sparse_state = {k: v * mask[k] if k in mask else v for k, v in state.items()}
    dense_extras = {k: v for k, v in state.items() if k not in mask}
    down = len(codec.encode(sparse_state, mask, phase=1, round=1, kind="soup", value_dtype=value_dtype, include_mask=True))
    up = len(codec.encode(sparse_state, mask, phase=1, round=1, kind="update", value_dtype=value_dtype,
                          include_mask=False, num_examples=1))
    bound_down = codec.payload_size_bound(mask, dense_extras, value_dtype, include_mask=True)
    bound_up = codec.payload_size_bound(mask, dense_extras, value_dtype, include_mask=False)
    flower_dense = ArrayRecord(state).count_bytes()
    return {"model": model_name, "sparsity": sparsity, "value_dtype": value_dtype, "down": down, "up": up,
            "bound_down": bound_down, "bound_up": bound_up, "flower_dense": flower_dense,
            "within_target": down <= 1.02 * bound_down + 4096 and up <= 1.02 * bound_up + 4096}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet20"])
    parser.add_argument("--out", default="results/wire_bytes.json")
    args = parser.parse_args()
    rows = [measure(m, s, d) for m in args.models for s in (0.5, 0.9, 0.98) for d in ("fp32", "fp16")]
    print(f"{'model':>9} {'sparsity':>8} {'values':>6} {'down B':>10} {'up B':>10} {'FedAvg dense B':>15} "
          f"{'down/dense':>10} {'up/dense':>9} {'down-bound':>10} {'up-bound':>9} target")
    for r in rows:
        print(f"{r['model']:>9} {r['sparsity']:>8.0%} {r['value_dtype']:>6} {r['down']:>10} {r['up']:>10} "
              f"{r['flower_dense']:>15} {r['down'] / r['flower_dense']:>10.3f} {r['up'] / r['flower_dense']:>9.3f} "
              f"{r['down'] - r['bound_down']:>10} {r['up'] - r['bound_up']:>9} {'ok' if r['within_target'] else 'MISSED'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
