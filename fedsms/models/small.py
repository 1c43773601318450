"""Small models for the embedded digits data."""

from __future__ import annotations

import math

from torch import nn


def mlp(num_classes: int, input_shape: tuple[int, int, int], hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """A multilayer perceptron: flatten, then Linear-ReLU per hidden layer, then a linear head.

    Parameters
    ----------
    num_classes : int
        Width of the output.
    input_shape : tuple of int
        (C, H, W) of one input; the first layer takes C * H * W features.
    hidden : tuple of int, default (256, 256)
        Width of each hidden layer.

    Returns
    -------
    torch.nn.Sequential
        The network (PyTorch's default initialisation).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head; BatchNorm so recalibration matters.

    Precisely: conv(width)-BN-ReLU, conv(2 width)-BN-ReLU, 2x2 max pool, conv(2 width)-BN-ReLU,
    global average pool, linear head.

    Parameters
    ----------
    num_classes : int
        Width of the output.
    input_shape : tuple of int
        (C, H, W) of one input; any size works (global pooling).
    width : int, default 32
        Channels of the first conv.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        """Logits for a batch of normalised images.

        Parameters
        ----------
        x : torch.Tensor
            Images (N, C, H, W).
        """
        return self.classifier(self.features(x))
