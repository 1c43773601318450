"""Models by name. Every model takes [0, 1] images and normalises them itself.

Names: ``mlp`` (two hidden layers of 256), ``mlp-W`` (two of width W), ``cnn`` (digits),
``resnet20``, ``resnet56``, ``wrn-D-K`` (CIFAR), and ``tv:NAME`` for any torchvision classification model (``tv:resnet18``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedsms import FedSMSError


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers are not persistent: the state dict holds only
    the network proper, and the builder sets them from the data set."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``; parameter names are ``net.*``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _network(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    from fedsms.models import small

    if name == "mlp":
        return small.mlp(num_classes, input_shape)
    if match := re.fullmatch(r"mlp-(\d+)", name):
        return small.mlp(num_classes, input_shape, hidden=(int(match[1]),) * 2)
    if name == "cnn":
        return small.SmallCNN(num_classes, input_shape)
    if name in ("resnet20", "resnet56"):
        from fedsms.models import resnet

        return resnet.cifar_resnet(int(name[6:]), num_classes, in_channels=input_shape[0])
    if match := re.fullmatch(r"wrn-(\d+)-(\d+)", name):
        from fedsms.models import resnet

        return resnet.wide_resnet(int(match[1]), int(match[2]), num_classes, in_channels=input_shape[0])
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], num_classes, input_shape)
    raise FedSMSError(
        f"unknown model {name!r}; use mlp, mlp-WIDTH, cnn, resnet20, resnet56, wrn-DEPTH-WIDTH or tv:TORCHVISION_NAME"
    )


def _torchvision_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise FedSMSError(f"torchvision has no classification model {name!r}; see torchvision.models.list_models()")
    if input_shape[0] != 3:
        raise FedSMSError(
            f"torchvision model {name!r} expects 3-channel images, the data has {input_shape[0]}; "
            "use cnn, resnet20, resnet56 or wrn-DEPTH-WIDTH, which take any channel count"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Classifier:
    c = input_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * c
    std = tuple(std) if std is not None else (1.0,) * c
    return Classifier(_network(name, num_classes, input_shape), mean, std)


def build_for(name: str, splits) -> Classifier:
    """The model ``name`` sized and normalised for a ``DatasetSplits``."""
    return build_model(name, splits.num_classes, splits.input_shape, splits.mean, splits.std)
