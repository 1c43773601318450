"""The user's model and data: a small CNN with BatchNorm, and PNG images read (with Pillow) from an
ImageFolder-style layout (``DIR/train/<class>/*.png``, ``DIR/test/<class>/*.png``).

Both apps import it; fedsms appears only where the images become ``DatasetSplits``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fedsms.data import ArrayData, Augmentation, DatasetSplits, make_splits


class PatternNet(nn.Module):
    """conv-BN-ReLU, max-pool, conv-BN-ReLU, global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, classes)
        return self.head(self.features(images))


def read_image_folder(folder: Path) -> tuple[ArrayData, list[str]]:
    """Every ``folder/<class>/*.png`` as RGB uint8 (N, 3, H, W), labelled by sorted class name."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as image:
                images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))  # (3, H, W)
            labels.append(label)
    if not images:
        raise FileNotFoundError(
            f"no PNG images in {folder}/<class>/; write some with `python make_images.py {folder.parent}`"
        )
    return ArrayData(torch.stack(images), torch.tensor(labels)), classes


@lru_cache(maxsize=2)
def load_splits(data_dir: str, heldout_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """The images under ``data_dir`` as train / held-out / test splits (read once per process)."""
    root = Path(data_dir)
    train, classes = read_image_folder(root / "train")
    test, test_classes = read_image_folder(root / "test")
    if test_classes != classes:
        raise ValueError(f"{root}/train has classes {classes} but {root}/test has {test_classes}")
    return make_splits(
        "patterns",
        train,
        test,
        num_classes=len(classes),
        augmentation=Augmentation(crop_padding=2),
        heldout_fraction=heldout_fraction,
        seed=seed,
    )
