"""LeNet-5 for small grey-scale or colour images (MNIST, Fashion-MNIST, CIFAR, 8x8 digits)."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks


def _conv2_padding(input_size: int) -> int:
    # Below 16 pixels an unpadded 5x5 conv2 would leave nothing to pool (8x8 digits: 8 -> 4 -> 0),
    # so small inputs pad conv2 like conv1 and keep their size through it.
    return 2 if input_size < 16 else 0


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling.

    conv1 (5x5, padding 2) -> ReLU -> max-pool 2 -> conv2 (5x5) -> ReLU -> max-pool 2 -> flatten
    -> fc1 -> ReLU -> fc2 -> ReLU -> classifier.

    conv2 is padded by 2 as well when `input_size < 16` (e.g. the 8x8 digits of scikit-learn), so that the
    feature map survives the second pooling; the flatten size is computed from `input_size` here, never in
    `forward`.

    Input: [B, in_channels, input_size, input_size] float. Output: logits [B, num_classes].
    Pre-decision layer: the output of fc2's ReLU (`pre_decision(x)`, [B, fc2]), the input of `classifier`.
    """

    registry_name = "lenet5"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, conv1: int = 6,
                 conv2: int = 16, fc1: int = 120, fc2: int = 84):
        super().__init__()
        for arg, value in [("in_channels", in_channels), ("num_classes", num_classes), ("conv1", conv1),
                           ("conv2", conv2), ("fc1", fc1), ("fc2", fc2)]:
            _checks.integer(value, "LeNet5", arg, minimum=1)
        input_size = _checks.integer(input_size, "LeNet5", "input_size", minimum=1)
        padding = _conv2_padding(input_size)
        side = (input_size // 2 + 2 * padding - 4) // 2  # conv1 keeps the size; pool; conv2; pool
        if side < 1:
            raise ValueError(f"LeNet5: input_size must leave at least a 1x1 map after conv2 and two poolings, "
                             f"got {input_size}")
        self.input_size = input_size

        self.conv1 = nn.Conv2d(in_channels, conv1, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(conv1, conv2, 5, padding=padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(conv2 * side * side, fc1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(fc1, fc2)
        self.relu4 = nn.ReLU()
        self.classifier = nn.Linear(fc2, num_classes)

    def pre_decision(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> the classifier's input [B, fc2]."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        return self.relu4(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_decision(x))

    def spec(self) -> dict:
        """`{"name": "lenet5", "kwargs": {...}}` for `gpp_ext.models.build`; widths are read from the weights,
        so the spec of a structurally pruned model rebuilds the pruned architecture."""
        return {"name": self.registry_name, "kwargs": {
            "in_channels": self.conv1.weight.shape[1], "num_classes": self.classifier.weight.shape[0],
            "input_size": self.input_size, "conv1": self.conv1.weight.shape[0],
            "conv2": self.conv2.weight.shape[0], "fc1": self.fc1.weight.shape[0],
            "fc2": self.fc2.weight.shape[0]}}
