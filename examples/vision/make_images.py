"""Write a small, seeded, learnable image data set in the ImageFolder layout the vision
example reads: ``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png``.

Four classes of colour patterns (checks, diagonal, horizontal and vertical stripes) with a
random period, phase and pair of colours per image, plus pixel noise.

    python make_images.py DIR [--train-per-class 100] [--test-per-class 25] [--size 16] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

CLASSES = ("checks", "diagonal", "horizontal", "vertical")


def pattern(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """One (3, size, size) uint8 image of ``kind``."""
    period = int(torch.randint(2, 5, (1,), generator=g))
    phase = int(torch.randint(0, period, (1,), generator=g))
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    coordinate = {"horizontal": y, "vertical": x, "diagonal": x + y}.get(kind)
    if coordinate is None:  # checks
        on = ((x + phase) // period + (y + phase) // period) % 2 == 0
    else:
        on = ((coordinate + phase) // period) % 2 == 0
    foreground = torch.randint(0, 256, (3, 1, 1), generator=g)
    background = (foreground + 128 + torch.randint(-40, 41, (3, 1, 1), generator=g)) % 256  # always some contrast
    image = torch.where(on, foreground, background).float()
    image += 20 * torch.randn(image.shape, generator=g)
    return image.clamp(0, 255).to(torch.uint8)


def write_images(
    root: Path, train_per_class: int = 100, test_per_class: int = 25, size: int = 16, seed: int = 0
) -> None:
    """Write the data set under ``root`` (train and test drawn from one seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(pattern(kind, size, g).permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--size", type=int, default=16, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_images(args.root, args.train_per_class, args.test_per_class, args.size, args.seed)
    total = len(CLASSES) * (args.train_per_class + args.test_per_class)
    print(f"wrote {total} images of {len(CLASSES)} classes to {args.root}")


if __name__ == "__main__":
    main()
