"""1-D convolutional networks for signals such as MNIST-1D.

A signal data set stores each example as an image of shape (C, 1, L) so that loaders,
corruptions and augmentation work unchanged; these networks read it as C channels of
length L (a (C, H, L) input is read as C·H channels) and convolve along L only. Built only
from ``nn.Conv1d``, ``nn.BatchNorm1d`` and ``nn.Linear``, so pruning finds every weight by
module type. A 2-D net on a (1, 1, L) input would waste two thirds of each 3x3 kernel on
the zero padding above and below the signal, and magnitude pruning would keep those
never-trained weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsms import FedSMSError


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv1d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


def _init_weights(model: nn.Module) -> None:
    """Kaiming (He) normal init for convs; BatchNorm starts as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _as_signal(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, L) → (N, C·H, L)."""
    return x.flatten(1, -2)


class SignalCNN(nn.Module):
    """Three conv-BN-ReLU layers along the signal, then a linear head on the flattened maps.

    Precisely: conv5(width), conv3(2 width, stride 2), conv3(2 width, stride 2), each
    followed by BatchNorm and ReLU, then flatten and linear. Flattening (no global pool)
    keeps where along the signal a feature fired, which MNIST-1D's classes depend on.

    Parameters
    ----------
    num_classes : int
        Width of the output.
    input_shape : tuple of int
        (C, H, L) of one input.
    width : int, default 32
        Channels of the first conv.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        c, h, length = input_shape
        self.features = nn.Sequential(
            _conv(c * h, width, 5),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            _conv(width, 2 * width, 3, stride=2),
            nn.BatchNorm1d(2 * width),
            nn.ReLU(inplace=True),
            _conv(2 * width, 2 * width, 3, stride=2),
            nn.BatchNorm1d(2 * width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        out_length = (length + 1) // 2
        out_length = (out_length + 1) // 2
        self.classifier = nn.Linear(2 * width * out_length, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised signals.

        Parameters
        ----------
        x : torch.Tensor
            Signals (N, C, H, L).
        """
        return self.classifier(self.features(_as_signal(x)))


class BasicBlock1d(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus shortcut, then ReLU (a CIFAR ResNet block along one axis).

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of the output.
    stride : int
        Stride of the first conv; a 1-wide conv + BN projects the shortcut where the shape
        changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm1d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for a batch of feature maps.

        Parameters
        ----------
        x : torch.Tensor
            Feature maps (N, in_channels, L).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SignalResNet(nn.Module):
    """A CIFAR-style ResNet of depth 6n + 2 along the signal: stem conv3(width), three stages
    of n blocks at width, 2 width, 4 width channels (stride 2 at the start of stages 2 and
    3), global average pool, linear head.

    Parameters
    ----------
    depth : int
        6n + 2 with n >= 1 (8, 14, 20, ...).
    num_classes : int
        Width of the output.
    input_shape : tuple of int
        (C, H, L) of one input.
    width : int, default 16
        Channels of the stem and the first stage.

    Raises
    ------
    FedSMSError
        If ``depth`` is not 6n + 2 for some n >= 1.
    """

    def __init__(self, depth: int, num_classes: int, input_shape: tuple[int, int, int], width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise FedSMSError(
                f"resnet1d-{depth}: the depth must be 6n + 2 with n >= 1; use resnet1d-DEPTH with DEPTH 8, 14, 20, ..."
            )
        c, h, _ = input_shape
        self.stem = nn.Sequential(_conv(c * h, width, 3), nn.BatchNorm1d(width), nn.ReLU(inplace=True))
        stages, channels = [], width
        for stage_width, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks = [BasicBlock1d(channels, stage_width, stride)]
            blocks += [BasicBlock1d(stage_width, stage_width, 1) for _ in range((depth - 2) // 6 - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = stage_width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised signals.

        Parameters
        ----------
        x : torch.Tensor
            Signals (N, C, H, L).
        """
        out = self.stages(self.stem(_as_signal(x)))
        return self.fc(torch.flatten(self.pool(out), 1))
