"""Deployed sparse models: file sizes and inference latency against the dense model.

For each model and sparsity (global magnitude pruning of every Linear / Conv weight and the
attention input projections, on freshly initialised weights: the timing depends on the
sparsity pattern's density, not on training): the dense fp32 safetensors file, the compact
file with fp32 and fp16 values (``fedsms.compact``); then per thread count and batch size,
the model after ``fedsms.sparse_inference.sparsify`` (measured per layer at that batch and
thread count) against the dense model, timed side by side (interleaved, median of
``--repeats``); and the peak memory of one forward at the largest batch (weights plus
the forward's peak resident growth; CUDA: peak allocated). Ratios are sparse / dense.

    python bench/sparse_inference.py            # every model, 50/90/95/98 %, a few minutes on 2 cores
    python bench/sparse_inference.py --quick    # no ResNet-18, 90 % only
    python bench/sparse_inference.py --device cuda
"""

from __future__ import annotations

import copy
import gc
import math
import os
import sys

import common
import torch
from torch import nn

from fedsms.compact import compact_bytes
from fedsms.masks import compute_mask, prunable_names
from fedsms.models import build_model
from fedsms.sparse_inference import sparsify


class Encoder(nn.Module):
    """A small Transformer encoder classifier over a sequence of token vectors."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


# name -> (builder, one input's shape); the digits models at their embedded size
MODELS = {
    "mlp (digits)": (lambda: build_model("mlp", 10, (1, 8, 8)), (1, 8, 8)),
    "mlp-2048 (32x32x3)": (lambda: build_model("mlp-2048", 10, (3, 32, 32)), (3, 32, 32)),
    "cnn (digits)": (lambda: build_model("cnn", 10, (1, 8, 8)), (1, 8, 8)),
    "resnet20 (32x32)": (lambda: build_model("resnet20", 10, (3, 32, 32)), (3, 32, 32)),
    "cnn1d (MNIST-1D)": (lambda: build_model("cnn1d", 10, (1, 1, 40)), (1, 1, 40)),
    "tv:resnet18 (224x224)": (lambda: build_model("tv:resnet18", 1000, (3, 224, 224)), (3, 224, 224)),
    "transformer (4x512, 16 tokens)": (lambda: Encoder(512, 4, 8), (16, 512)),
}
TINY = {
    "mlp (digits)": MODELS["mlp (digits)"],
    "cnn (digits)": MODELS["cnn (digits)"],
    "transformer (2x64, 8 tokens)": (lambda: Encoder(64, 2, 4), (8, 64)),
}
SLOW = {"tv:resnet18 (224x224)"}  # seconds per forward at batch 64: all threads only, 3 repetitions


def prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Global magnitude pruning of the prunable weights and attention input projections."""
    names = prunable_names(model) + [n for n, _ in model.named_parameters() if n.endswith("in_proj_weight")]
    params = dict(model.named_parameters())
    mask = compute_mask(params, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, sparsity)
    with torch.no_grad():
        for name, keep in mask.items():
            params[name].masked_fill_(~keep, 0.0)
    return model.eval()


def sizes(model: nn.Module) -> dict:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dense = len(save(state))
    return {
        "dense_bytes": dense,
        "compact_fp32": len(compact_bytes(state)) / dense,
        "compact_fp16": len(compact_bytes(state, value_dtype="fp16")) / dense,
    }


def synced(call, device: torch.device):
    """``call`` timed as a variant: returns None (``interleaved`` reads a return value as seconds), waits for CUDA."""

    def run() -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    total = 0
    for t in tensors:
        if t.layout == torch.sparse_csr:
            total += sum(x.numel() * x.element_size() for x in (t.values(), t.crow_indices(), t.col_indices()))
        else:
            total += t.numel() * t.element_size()
    return total


def peak_forward(model: nn.Module, x: torch.Tensor) -> int:
    """Weights plus the peak extra memory of one forward."""
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        with torch.no_grad():
            model(x)
        torch.cuda.synchronize(x.device)
        return model_bytes(model) + torch.cuda.max_memory_allocated(x.device) - base
    common.peak_rss_reset()
    base = common.rss()
    with torch.no_grad():
        model(x)
    return model_bytes(model) + max(0, common.peak_rss() - base)


def measure(name: str, sparsity: float, args, device: torch.device, batches, thread_counts) -> dict:
    build, shape = (TINY if args.tiny else MODELS)[name]
    torch.manual_seed(0)
    dense = prune(build(), sparsity).to(device)
    row = {"model": name, "sparsity": sparsity, **sizes(dense)}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in batches:
            key = f"b{batch}_t{threads}"
            slow = name in SLOW and batch > 1
            if slow and threads != thread_counts[-1]:  # seconds per forward: all threads only
                row[f"{key}_dense_ms"] = row[key] = math.nan
                row[f"{key}_sparse_layers"] = "-"
                continue
            repeats = min(3, args.repeats) if slow else args.repeats
            x = torch.rand(batch, *shape, device=device)
            sparse = copy.deepcopy(dense)
            plan = sparsify(sparse, x, repeats=1 if slow else 3)
            with torch.no_grad():
                reference, got = dense(x), sparse(x)
            assert torch.allclose(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())), name
            with torch.no_grad():
                times = common.interleaved(
                    {
                        "dense": synced(lambda m=dense, x=x: m(x), device),
                        "sparse": synced(lambda m=sparse, x=x: m(x), device),
                    },
                    max(1, repeats),
                )
            row[f"{key}_dense_ms"] = 1e3 * common.median(times["dense"])
            row[key] = common.median(times["sparse"]) / common.median(times["dense"])
            row[f"{key}_sparse_layers"] = f"{sum(c.kernel == 'csr' for c in plan.layers)}/{len(plan.layers)}"
            if threads == thread_counts[-1] and batch == batches[-1]:
                row["peak_dense_mb"] = peak_forward(dense, x) / 2**20
                row["peak"] = peak_forward(sparse, x) / 2**20 / row["peak_dense_mb"]
                row["conv_gain"] = conv_gain(plan)
    return row


def conv_gain(plan) -> str:
    """Where convolutions stand: how many ran sparse, in words when none did."""
    convs = [c for c in plan.layers if c.kind == "conv"]
    if not convs:
        return "-"
    won = sum(c.kernel == "csr" for c in convs)
    return f"{won}/{len(convs)} sparse" if won else "none: dense wins"


def main() -> None:
    p = common.parser(__doc__, "bench/reports/sparse_inference.json", repeats=7)
    p.add_argument("--quick", action="store_true", help="no ResNet-18, 90 %% sparsity only")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        names, sparsities, batches = list(TINY), [0.9], [1, 4]
    else:
        names = [n for n in MODELS if not (args.quick and n in SLOW)]
        sparsities, batches = ([0.9] if args.quick else [0.5, 0.9, 0.95, 0.98]), [1, 64]
    cores = os.cpu_count() or 1
    thread_counts = [1] if device.type == "cuda" or args.tiny else sorted({1, cores})
    rows = []
    for name in names:
        for sparsity in sparsities:
            rows.append(measure(name, sparsity, args, device, batches, thread_counts))
            print(f"  {name} at {sparsity:.0%} done", file=sys.stderr, flush=True)
    columns = [
        ("model", "model", "<"),
        ("sparsity", "sparsity", ".0%"),
        ("dense_bytes", "dense B", ",d"),
        ("compact_fp32", "fp32 file", ".3f"),
        ("compact_fp16", "fp16 file", ".3f"),
    ]
    for threads in thread_counts:
        for batch in batches:
            key = f"b{batch}_t{threads}"
            columns += [(f"{key}_dense_ms", f"b{batch} t{threads} dense ms", ".3f"), (key, "x", ".2f")]
    columns += [("peak", "peak mem", ".2f"), ("conv_gain", "convolutions", "<")]
    common.report(args.out, rows, columns, device=str(device), gpu_has_run=device.type == "cuda")


if __name__ == "__main__":
    main()
