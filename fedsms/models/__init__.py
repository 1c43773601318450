"""Models by name. Every model takes [0, 1] images and normalises them itself.

Names: ``mlp`` (two hidden layers of 256), ``mlp-W`` (two of width W), ``cnn`` (digits),
``resnet20``, ``resnet56``, ``wrn-D-K`` (CIFAR), ``cnn1d`` / ``cnn1d-W`` and ``resnet1d-D``
(1-D signals such as MNIST-1D), and ``tv:NAME`` for any torchvision classification model
(``tv:resnet18``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedsms import FedSMSError


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers are not persistent: the state dict holds only
    the network proper, and the builder sets them from the data set.

    Parameters
    ----------
    mean : tuple of float
        Per-channel mean of the [0, 1] inputs.
    std : tuple of float
        Per-channel std of the [0, 1] inputs (nonzero).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch channel by channel.

        Parameters
        ----------
        x : torch.Tensor
            Inputs (N, C, ...) in [0, 1].
        """
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``; parameter names are ``net.*``.

    Parameters
    ----------
    net : torch.nn.Module
        The network proper, taking normalised inputs.
    mean : tuple of float
        Per-channel mean of the [0, 1] inputs.
    std : tuple of float
        Per-channel std of the [0, 1] inputs.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (logits) of the network on normalised ``x``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of [0, 1] inputs (N, C, ...).
        """
        return self.net(self.normalize(x))


MAX_MLP_WIDTH = 65536  # mlp-W beyond this would not fit in memory
MAX_CONV_WIDTH = 4096  # cnn1d-W beyond this would not fit in memory


def _network(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    from fedsms.models import small

    if name == "mlp":
        return small.mlp(num_classes, input_shape)
    if match := re.fullmatch(r"mlp-(\d+)", name):
        if not 1 <= int(match[1]) <= MAX_MLP_WIDTH:
            raise FedSMSError(f"model {name!r}: the width must be 1 to {MAX_MLP_WIDTH}; pick a smaller mlp-WIDTH")
        return small.mlp(num_classes, input_shape, hidden=(int(match[1]),) * 2)
    if name == "cnn":
        return small.SmallCNN(num_classes, input_shape)
    if match := re.fullmatch(r"cnn1d(?:-(\d+))?", name):
        from fedsms.models import signal

        width = int(match[1] or 32)
        if not 1 <= width <= MAX_CONV_WIDTH:
            raise FedSMSError(f"model {name!r}: the width must be 1 to {MAX_CONV_WIDTH}; pick cnn1d-WIDTH within it")
        return signal.SignalCNN(num_classes, input_shape, width)
    if match := re.fullmatch(r"resnet1d-(\d+)", name):
        from fedsms.models import signal

        return signal.SignalResNet(int(match[1]), num_classes, input_shape)
    if name in ("resnet20", "resnet56"):
        from fedsms.models import resnet

        return resnet.cifar_resnet(int(name[6:]), num_classes, in_channels=input_shape[0])
    if match := re.fullmatch(r"wrn-(\d+)-(\d+)", name):
        from fedsms.models import resnet

        return resnet.wide_resnet(int(match[1]), int(match[2]), num_classes, in_channels=input_shape[0])
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], num_classes, input_shape)
    raise FedSMSError(
        f"unknown model {name!r}; use mlp, mlp-WIDTH, cnn, resnet20, resnet56, wrn-DEPTH-WIDTH, cnn1d, "
        "cnn1d-WIDTH, resnet1d-DEPTH or tv:TORCHVISION_NAME"
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
    """A freshly initialised model by name (see the module docstring for the names).

    Parameters
    ----------
    name : str
        ``mlp``, ``mlp-W``, ``cnn``, ``resnet20``, ``resnet56``, ``wrn-D-K``, ``cnn1d``,
        ``cnn1d-W``, ``resnet1d-D`` or ``tv:NAME``.
    num_classes : int
        Width of the output.
    input_shape : tuple of int
        (C, H, W) of one input.
    mean : tuple of float, optional
        Per-channel mean of the inputs; None: 0 for every channel.
    std : tuple of float, optional
        Per-channel std of the inputs; None: 1 for every channel.

    Returns
    -------
    Classifier
        The network wrapped with its normalisation.

    Raises
    ------
    FedSMSError
        If the name is unknown, a ResNet, WideResNet or 1-D net's depth or width is invalid, or a
        torchvision model is asked for with other than 3 channels.
    """
    c = input_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * c
    std = tuple(std) if std is not None else (1.0,) * c
    return Classifier(_network(name, num_classes, input_shape), mean, std)


def build_for(name: str, splits) -> Classifier:
    """The model ``name`` sized and normalised for a ``DatasetSplits``.

    Parameters
    ----------
    name : str
        The model's name (see :func:`build_model`).
    splits : DatasetSplits
        Its ``num_classes``, ``input_shape``, ``mean`` and ``std`` are used.

    Returns
    -------
    Classifier
        The new model.

    Raises
    ------
    FedSMSError
        As :func:`build_model`.
    """
    return build_model(name, splits.num_classes, splits.input_shape, splits.mean, splits.std)
