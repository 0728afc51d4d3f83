"""CIFAR-style ResNets (He et al. 2016, section 4.2) with projection shortcuts where the shape changes."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import _checks
from .inception import ConvBNReLU


class BasicBlock(nn.Module):
    """conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, otherwise a projection, 1x1 conv (stride) -> BN
    ("option B"). `mid_channels` (default `out_channels`) is the width between the two convs: it is not
    tied to the residual add, so a pruner may cut it on its own.

    Input [B, in_channels, H, W] -> output [B, out_channels, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, mid_channels: Optional[int] = None):
        super().__init__()
        mid_channels = out_channels if mid_channels is None else mid_channels
        for arg, value in [("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride),
                           ("mid_channels", mid_channels)]:
            _checks.integer(value, "BasicBlock", arg, minimum=1)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 -> BN -> ReLU (`widths[0]` channels), stages of `BasicBlock`, global average pooling,
    `classifier`.

    Stage `s` has `widths[s]` channels and `blocks_per_stage` blocks (an int for every stage, or one count
    per stage); the first block of every stage after the first halves the spatial size (stride 2, projection
    shortcut). `mid_widths[s][b]` sets the inner width of block `b` of stage `s` (default: the stage width),
    so pruned inner convs can be rebuilt.

    Input: [B, in_channels, H, W] float. Output: logits [B, num_classes]. Pre-decision layer: the pooled,
    flattened output of the last stage (`pre_decision(x)`, [B, widths[-1]]).

    Every ResNet is rebuilt by the registry's `"resnet20"` factory, which is this class with CIFAR defaults.
    """

    registry_name = "resnet20"

    def __init__(self, widths: Sequence[int], blocks_per_stage: Union[int, Sequence[int]], in_channels: int = 3,
                 num_classes: int = 10, mid_widths: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        _checks.integer(in_channels, "ResNet", "in_channels", minimum=1)
        _checks.integer(num_classes, "ResNet", "num_classes", minimum=1)
        if isinstance(widths, str) or not isinstance(widths, Sequence) or len(widths) == 0:
            raise ValueError(f"ResNet: widths must be a non-empty sequence of stage widths, got {widths!r}")
        widths = [_checks.integer(w, "ResNet", f"widths[{s}]", minimum=1) for s, w in enumerate(widths)]
        if isinstance(blocks_per_stage, Sequence):
            if len(blocks_per_stage) != len(widths):
                raise ValueError(f"ResNet: blocks_per_stage must be an int or one count per stage "
                                 f"({len(widths)}), got {blocks_per_stage!r}")
            blocks = [_checks.integer(n, "ResNet", f"blocks_per_stage[{s}]", minimum=1)
                      for s, n in enumerate(blocks_per_stage)]
        else:
            blocks = [_checks.integer(blocks_per_stage, "ResNet", "blocks_per_stage", minimum=1)] * len(widths)
        if mid_widths is None:
            mid_widths = [[w] * n for w, n in zip(widths, blocks)]
        elif (not isinstance(mid_widths, Sequence) or len(mid_widths) != len(widths)
              or any(not isinstance(m, Sequence) or len(m) != n for m, n in zip(mid_widths, blocks))):
            raise ValueError(f"ResNet: mid_widths must hold one width per block of every stage "
                             f"(blocks {blocks}), got {mid_widths!r}")

        self.stem = ConvBNReLU(in_channels, widths[0], 3)
        channels = widths[0]
        stages = []
        for s, (width, mids) in enumerate(zip(widths, mid_widths)):
            stage = []
            for b, mid in enumerate(mids):
                stride = 2 if s > 0 and b == 0 else 1
                stage.append(BasicBlock(channels, width, stride, mid))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def pre_decision(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> the classifier's input [B, widths[-1]]."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_decision(x))

    def spec(self) -> dict:
        """`{"name": "resnet20", "kwargs": {...}}` for `gpp_ext.models.build`; widths are read from the
        weights, so the spec of a structurally pruned model rebuilds the pruned architecture."""
        widths = [stage[0].conv2.weight.shape[0] for stage in self.stages]
        blocks = [len(stage) for stage in self.stages]
        mids = [[block.conv1.weight.shape[0] for block in stage] for stage in self.stages]
        return {"name": self.registry_name, "kwargs": {
            "in_channels": self.stem.conv.weight.shape[1], "num_classes": self.classifier.weight.shape[0],
            "widths": widths, "blocks_per_stage": blocks[0] if len(set(blocks)) == 1 else blocks,
            "mid_widths": None if mids == [[w] * n for w, n in zip(widths, blocks)] else mids}}


class ResNet20(ResNet):
    """ResNet-20 for CIFAR-10 (3 stages of 3 blocks, widths 16/32/64, about 0.27M parameters).

    Input: [B, in_channels, 32, 32] float (any size >= 4 works). Output: logits [B, num_classes].
    Takes every argument of `ResNet`, so it rebuilds any `ResNet.spec()`.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: Union[int, Sequence[int]] = 3,
                 mid_widths: Optional[Sequence[Sequence[int]]] = None):
        super().__init__(widths, blocks_per_stage, in_channels=in_channels, num_classes=num_classes,
                         mid_widths=mid_widths)
