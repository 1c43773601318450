"""CIFAR ResNets (He et al. 2016) and WideResNets (Zagoruyko & Komodakis 2016).

Both are built only from standard layers (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``)
so that pruning finds every conv and linear weight by module type.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsms import FedSMSError


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed (or, pre-activation, preceded) by BatchNorm, whose
    # shift makes a conv bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """Kaiming (He) normal init for convs, as in both papers; BatchNorm starts as identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ---- CIFAR ResNet ------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (post-activation, He et al. 2016).

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of the output.
    stride : int
        Stride of the first conv (2 halves the resolution); the shortcut is a 1x1 conv + BN
        projection where the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # Option B: a 1x1 conv + BN projection only where the shape changes; identity elsewhere.
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for a batch of feature maps.

        Parameters
        ----------
        x : torch.Tensor
            Feature maps (N, in_channels, H, W).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3x3(16), three stages of ``n`` BasicBlocks at 16/32/64 channels (stride 2
    at the start of stages 2 and 3), global average pool, linear head.

    Parameters
    ----------
    blocks_per_stage : int
        n, blocks in each stage (depth 6n + 2).
    num_classes : int
        Width of the output.
    in_channels : int, default 3
        Channels of the input images.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        width = 16
        for stage_width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(width, stage_width, stride)]
            blocks += [BasicBlock(stage_width, stage_width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width = stage_width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised images.

        Parameters
        ----------
        x : torch.Tensor
            Images (N, in_channels, H, W).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-``depth`` for CIFAR; depth = 6n + 2 (20, 32, 44, 56, 110, ...).

    Parameters
    ----------
    depth : int
        6n + 2 with n >= 1.
    num_classes : int
        Width of the output.
    in_channels : int, default 3
        Channels of the input images.

    Returns
    -------
    torch.nn.Module
        A :class:`CifarResNet`, Kaiming-initialised.

    Raises
    ------
    FedSMSError
        If ``depth`` is not 6n + 2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6:
        raise FedSMSError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}; pick such a depth, e.g. 20 or 56")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels)


# ---- WideResNet --------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-dropout-conv plus shortcut (pre-activation, WRN paper).

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of the output.
    stride : int
        Stride of the first conv; the shortcut is a 1x1 conv of the pre-activated input
        where the shape changes.
    dropout : float
        Dropout probability between the two convs, in [0, 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # Where the shape changes, the shortcut is a 1x1 conv of the pre-activated input, as
        # in the reference implementation; elsewhere it is the raw input.
        self.projection = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for a batch of feature maps.

        Parameters
        ----------
        x : torch.Tensor
            Feature maps (N, in_channels, H, W).
        """
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


class WideResNet(nn.Module):
    """Stem conv3x3(16), three stages of ``n`` pre-activation blocks at 16k/32k/64k
    channels, final BN-ReLU, global average pool, linear head.

    Parameters
    ----------
    blocks_per_stage : int
        n, blocks in each stage (depth 6n + 4).
    widen : int
        k, the widening factor.
    num_classes : int
        Width of the output.
    in_channels : int, default 3
        Channels of the input images.
    dropout : float, default 0.0
        Dropout probability inside each block.
    """

    def __init__(
        self, blocks_per_stage: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        stages = []
        width = 16
        for stage_width, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            blocks = [PreActBlock(width, stage_width, stride, dropout)]
            blocks += [PreActBlock(stage_width, stage_width, 1, dropout) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width = stage_width
        self.layer1, self.layer2, self.layer3 = stages
        # Pre-activation blocks end on a conv, so the output needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised images.

        Parameters
        ----------
        x : torch.Tensor
            Images (N, in_channels, H, W).
        """
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-``depth``-``widen``; depth = 6n + 4 (10, 16, 22, 28, 40, ...).

    Parameters
    ----------
    depth : int
        6n + 4 with n >= 1.
    widen : int
        Widening factor k, >= 1.
    num_classes : int
        Width of the output.
    in_channels : int, default 3
        Channels of the input images.
    dropout : float, default 0.0
        Dropout probability inside each block, in [0, 1).

    Returns
    -------
    torch.nn.Module
        A :class:`WideResNet`, Kaiming-initialised.

    Raises
    ------
    FedSMSError
        If ``depth``, ``widen`` or ``dropout`` is out of range.
    """
    if depth < 10 or (depth - 4) % 6:
        raise FedSMSError(
            f"WideResNet depth must be 6n+4 with n >= 1, got {depth}; use such a depth, e.g. wrn-16-4 or wrn-28-10"
        )
    if widen < 1:
        raise FedSMSError(f"WideResNet widening factor must be at least 1, got {widen}; use e.g. wrn-16-4")
    if not 0.0 <= dropout < 1.0:
        raise FedSMSError(f"WideResNet dropout must be in [0, 1), got {dropout}; use e.g. 0.3")
    return WideResNet((depth - 4) // 6, widen, num_classes, in_channels, dropout)
