"""A small VGG for 28x28 / 32x32 images."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .. import _checks

Width = Union[int, str]


class VGGSmall(nn.Module):
    """VGG-style network: 3x3 conv blocks, global average pooling, one hidden fully connected layer.

    `widths` lists the layers of `features` in order: an int is Conv3x3 (padding 1) -> BatchNorm2d -> ReLU
    with that many output channels (no BatchNorm, and a conv bias, when `batch_norm=False`); `'M'` is
    MaxPool2d(2). Then AdaptiveAvgPool2d(1) -> flatten -> `fc` (`hidden` units) -> ReLU -> Dropout ->
    `classifier`. The global pooling makes the model independent of the input size.

    Input: [B, in_channels, H, W] float with H, W >= 2**(number of 'M'). Output: logits [B, num_classes].
    Pre-decision layer: the output of the dropout after `fc` (`pre_decision(x)`, [B, hidden]).
    """

    registry_name = "vgg"

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[Width] = (32, 32, "M", 64, 64, "M", 128, 128, "M"), hidden: int = 256,
                 batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        _checks.integer(in_channels, "VGGSmall", "in_channels", minimum=1)
        _checks.integer(num_classes, "VGGSmall", "num_classes", minimum=1)
        _checks.integer(hidden, "VGGSmall", "hidden", minimum=1)
        dropout = _checks.real(dropout, "VGGSmall", "dropout")
        if dropout >= 1.0:
            raise ValueError(f"VGGSmall: dropout must be in [0, 1), got {dropout}")
        if isinstance(widths, str) or not isinstance(widths, Sequence):
            raise TypeError(f"VGGSmall: widths must be a list or tuple of ints and 'M', got {widths!r}")
        self.batch_norm = bool(batch_norm)

        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = _checks.integer(width, "VGGSmall", f"widths[{i}] (an int or 'M')", minimum=1)
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not self.batch_norm))
            if self.batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            channels = width
        if not any(isinstance(m, nn.Conv2d) for m in layers):
            raise ValueError(f"VGGSmall: widths must contain at least one conv width, got {widths!r}")

        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def pre_decision(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> the classifier's input [B, hidden]."""
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.dropout(self.relu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_decision(x))

    def spec(self) -> dict:
        """`{"name": "vgg", "kwargs": {...}}` for `gpp_ext.models.build`; widths are read from the weights,
        so the spec of a structurally pruned model rebuilds the pruned architecture."""
        widths: list[Width] = [layer.weight.shape[0] if isinstance(layer, nn.Conv2d) else "M"
                               for layer in self.features if isinstance(layer, (nn.Conv2d, nn.MaxPool2d))]
        first_conv = next(layer for layer in self.features if isinstance(layer, nn.Conv2d))
        return {"name": self.registry_name, "kwargs": {
            "in_channels": first_conv.weight.shape[1], "num_classes": self.classifier.weight.shape[0], "widths": widths,
            "hidden": self.fc.weight.shape[0], "batch_norm": self.batch_norm, "dropout": self.dropout.p}}
