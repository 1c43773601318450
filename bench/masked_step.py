"""Masked training overhead: a retraining step under the mask against the same step without one.

    python bench/masked_step.py [--model resnet20] [--batch-size 128] [--steps 4] [--repeats 7] [--out results/masked_step.json]

Both variants run ``fedsms.training.train_candidate``, the real retraining loop (SGD with
Nesterov momentum and weight decay, the learning-rate schedule, ``MaskEnforcer.apply()``
after every optimizer step), for one epoch of ``--steps`` batches of CIFAR-shaped data:
"masked" under a 90 % global-magnitude mask, "dense" with an empty mask, where the
enforcer has nothing to do and the loop is otherwise identical. The calls alternate and the
median seconds per step of each is reported (the per-call set-up, optimizer and enforcer
included, divided over its steps).
"""

from __future__ import annotations

import torch
from common import interleaved, median, parser, report

from fedsms.data.arrays import ArrayData
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_model
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate

SPARSITY = 0.9


def measure(model_name: str, batch_size: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, 10, (3, 32, 32))
    mask = compute_mask(model.state_dict(), dense_mask(model, prunable_names(model)), SPARSITY)
    # steps + 1 batches' worth of examples: drop_last keeps exactly `steps` full batches
    n = batch_size * steps + 1
    data = ArrayData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    config = CandidateConfig(epochs=1, batch_size=batch_size, augment=False, lr=0.05, weight_decay=5e-4)
    models = {"masked": model, "dense": build_model(model_name, 10, (3, 32, 32))}
    models["dense"].load_state_dict(model.state_dict())

    def step(variant: str, variant_mask: dict):
        def run() -> float:
            result = train_candidate(models[variant], variant_mask, data, config)
            assert result["steps"] == steps
            return result["seconds"] / steps

        return run

    times = interleaved({"masked": step("masked", mask), "dense": step("dense", {})}, repeats)
    masked, dense = median(times["masked"]), median(times["dense"])
    return {
        "model": model_name,
        "batch_size": batch_size,
        "sparsity": SPARSITY,
        "steps_per_run": steps,
        "threads": torch.get_num_threads(),
        "masked_step_s": masked,
        "dense_step_s": dense,
        "overhead": masked / dense - 1.0,
        "masked_runs_s": times["masked"],
        "dense_runs_s": times["dense"],
    }


COLUMNS = [
    ("model", "model", ">"),
    ("batch_size", "batch", "d"),
    ("threads", "threads", "d"),
    ("dense_step_s", "no mask s/step", ".4f"),
    ("masked_step_s", "masked s/step", ".4f"),
    ("overhead", "overhead", "+.2%"),
]


def main() -> None:
    p = parser(__doc__, "results/masked_step.json", repeats=7)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps per timed call")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed CPU a 2-thread team mostly waits for itself)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch, steps = (8, 1) if args.tiny else (args.batch_size, args.steps)
    rows = [measure(args.model, batch, steps, args.repeats)]
    report(args.out, rows, COLUMNS, target="masked step <= 1.05x the step without a mask")


if __name__ == "__main__":
    main()
