"""GPU-ready training: epoch time and masked-step overhead of the candidate trainer on a device.

    python bench/gpu_train.py --device cuda [--repeats 5] [--out results/gpu_train.json]
    python bench/gpu_train.py --device cpu --tiny          # the smoke size (figures mean nothing)

Two workloads, each one epoch of ``fedsms.training.train_candidate`` (the real loop: SGD
with Nesterov momentum and weight decay, the schedule, the mask after every step):

- ``tv:resnet18`` on CIFAR-shaped synthetic data (uint8 3×32×32, 10 classes, translation
  and flip augmentation on), ``--cifar-examples`` examples;
- ``cnn1d`` on generated MNIST-1D (``--mnist1d-examples`` signals), its shift augmentation on.

Per workload and precision setting (``fp32``; ``bf16`` autocast; for the 2-D model also
bf16 with the channels-last layout) the bench times a *masked* epoch (90 % global
magnitude mask) and a *dense* one (an empty mask: the loop is otherwise identical),
interleaved, ``--repeats`` times, and prints the median epoch seconds, examples per
second and the masked-step overhead (masked / dense − 1). On CUDA the data set is moved to
the device once and batched, shuffled and augmented there (``fedsms.data.arrays.resident``);
the epoch time ends with the epoch's loss read back, so it includes the GPU's queue.

The server's aggregation is host-side by design (the codec reads the replies' bytes with
numpy); ``bench/aggregation.py`` measures it, on a GPU box as anywhere else.
"""

from __future__ import annotations

import functools

import torch
from common import interleaved, median, parser, report

from fedsms.data import load_dataset
from fedsms.data.arrays import ArrayData, Augmentation
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_model
from fedsms.recipe import CandidateConfig
from fedsms.training import resolve_device, train_candidate, uses_channels_last

SPARSITY = 0.9


def cifar_shaped(n: int) -> tuple[ArrayData, Augmentation]:
    """Synthetic CIFAR-10-shaped images and labels (timing needs their shape, not their content)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ArrayData(images, torch.randint(0, 10, (n,), generator=g)), Augmentation(crop_padding=4, flip=True)


def mnist1d(n: int) -> tuple[ArrayData, Augmentation]:
    """Generated MNIST-1D signals (no download, no cache folder)."""
    splits = load_dataset(f"mnist1d-{max(200, -(-n * 10 // 7))}")  # train is 72 % of the samples
    return splits.train.head(n), splits.augmentation


WORKLOADS = {"tv:resnet18": cifar_shaped, "cnn1d": mnist1d}


def variants(model: torch.nn.Module) -> list[tuple[str, str, bool]]:
    """(label, precision, channels_last) of each setting timed for ``model``."""
    found = [("fp32", "fp32", False), ("bf16", "bf16", False)]
    if uses_channels_last(model):
        found.append(("bf16 + channels-last", "bf16", True))
    return found


def epoch_seconds(train: functools.partial, model: torch.nn.Module, mask: dict) -> float:
    """Seconds of one training epoch, as the trainer measured it."""
    return train(model, mask)["seconds"]


def measure(model_name: str, examples: int, batch_size: int, repeats: int, device: torch.device) -> list[dict]:
    data, augmentation = WORKLOADS[model_name](examples)
    torch.manual_seed(0)
    shape = tuple(data.images.shape[1:])
    masked_model = build_model(model_name, 10, shape).to(device)
    dense_model = build_model(model_name, 10, shape).to(device)
    dense_model.load_state_dict(masked_model.state_dict())
    mask = compute_mask(masked_model.state_dict(), dense_mask(masked_model, prunable_names(masked_model)), SPARSITY)
    config = CandidateConfig(epochs=1, batch_size=batch_size, augment=True, lr=0.05, weight_decay=5e-4)
    rows = []
    for label, precision, channels_last in variants(masked_model):
        train = functools.partial(
            train_candidate,
            data=data,
            config=config,
            augmentation=augmentation,
            device=device,
            precision=precision,
            channels_last=channels_last,
        )
        arms = {
            "masked": functools.partial(epoch_seconds, train, masked_model, mask),
            "dense": functools.partial(epoch_seconds, train, dense_model, {}),  # the same loop, nothing to mask
        }
        times = interleaved(arms, repeats)
        masked, dense = median(times["masked"]), median(times["dense"])
        rows.append(
            {
                "model": model_name,
                "setting": label,
                "device": str(device),
                "examples": len(data),
                "batch_size": batch_size,
                "masked_epoch_s": masked,
                "dense_epoch_s": dense,
                "masked_examples_per_s": len(data) / masked,
                "overhead": masked / dense - 1.0,
                "masked_runs_s": times["masked"],
                "dense_runs_s": times["dense"],
            }
        )
    return rows


COLUMNS = [
    ("model", "model", ">"),
    ("setting", "setting", ">"),
    ("device", "device", ">"),
    ("examples", "examples", "d"),
    ("dense_epoch_s", "no mask s/epoch", ".3f"),
    ("masked_epoch_s", "masked s/epoch", ".3f"),
    ("masked_examples_per_s", "masked ex/s", ".0f"),
    ("overhead", "mask overhead", "+.1%"),
]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, "results/gpu_train.json", repeats=5)
    p.add_argument("--device", default="cuda", help="auto, cpu or cuda[:N]")
    p.add_argument("--cifar-examples", type=int, default=10_000)
    p.add_argument("--mnist1d-examples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    sizes = {"tv:resnet18": args.cifar_examples, "cnn1d": args.mnist1d_examples}
    if args.tiny:
        sizes, args.batch_size, args.repeats = {"tv:resnet18": 16, "cnn1d": 64}, 8, 1
    rows = [row for name, n in sizes.items() for row in measure(name, n, args.batch_size, args.repeats, device)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (not run on a GPU)"
    return report(args.out, rows, COLUMNS, target="masked step <= 1.05x the step without a mask", gpu=gpu)


if __name__ == "__main__":
    main()
