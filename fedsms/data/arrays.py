"""In-memory image arrays and the batch iterator every trainer and evaluator uses.

Images are kept as ``uint8`` (0..255) or ``float32`` (already in [0, 1]) tensors of shape
(N, C, H, W); a batch is always float32 in [0, 1]. Normalisation lives inside the model
(see ``fedsms.models.Normalize``) so that corruptions act on real pixel values.
Everything is a tensor op on a whole batch: no DataLoader workers, no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class ArrayData:
    images: torch.Tensor  # (N, C, H, W), uint8 in 0..255 or float32 in [0, 1]
    labels: torch.Tensor  # (N,), int64

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"images ({self.images.shape[0]}) and labels ({self.labels.shape[0]}) differ in length"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> "ArrayData":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ArrayData(self.images[indices], self.labels[indices])

    def head(self, n: int) -> "ArrayData":
        return ArrayData(self.images[:n], self.labels[:n])

    def float_images(self, indices: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.images if indices is None else self.images[indices]
        return to_float(x)


def to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.to(torch.float32, copy=True)  # never hand out the data set's own storage


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to ``crop_padding`` pixels (zero padding), optional h-flip."""

    crop_padding: int = 0
    flip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_padding > 0:
            x = random_translate(x, self.crop_padding, generator)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad-and-random-crop for a whole batch with one gather (no per-sample loop)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def batches(
    data: ArrayData,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Augmentation | None = None,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images float32 in [0, 1], labels) batches; shuffling and augmentation draw
    from ``generator`` only, so a seed fixes the batch order exactly."""
    n = len(data)
    if shuffle or augment is not None:
        if generator is None:
            raise ValueError("shuffling or augmenting needs a torch.Generator for reproducibility")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = data.float_images(idx)
        if augment is not None:
            x = augment(x, generator)
        yield x.to(device, non_blocking=True), data.labels[idx].to(device, non_blocking=True)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
