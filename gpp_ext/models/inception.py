"""Inception modules stacked in stages on a small stem: the network that Grow–Push–Prune grows.

Branch widths are free: the module output is a concatenation, so unlike a residual add nothing has to be
aligned, and a pruner may cut every branch independently.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import _checks

_WIDTH_NAMES = ("b1", "b3_reduce", "b3", "b33_reduce", "b33", "pool_proj", "b33_mid")


def _width(unit: "ConvBNReLU") -> int:
    # read from the weight, not `conv.out_channels`: a structural pruner replaces weights
    return unit.conv.weight.shape[0]


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, `padding = kernel_size // 2` so the spatial size is kept.

    Input [B, in_channels, H, W] -> output [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on the channel dimension.

    - `branch1`: 1x1 conv (`b1` channels)
    - `branch3`: 1x1 conv (`b3_reduce`) -> 3x3 conv (`b3`)
    - `branch33`: 1x1 conv (`b33_reduce`) -> 3x3 conv (`b33_mid`, default `b33`) -> 3x3 conv (`b33`)
    - `branch_pool`: 3x3 max-pool (stride 1, padding 1) -> 1x1 conv (`pool_proj`)

    Every conv is followed by BatchNorm2d and ReLU. `b33_mid` exists so that a pruned middle conv of the
    double-3x3 branch can be rebuilt; it is omitted from `widths` while it equals `b33`.

    Input [B, in_channels, H, W] -> output [B, b1 + b3 + b33 + pool_proj, H, W] (`out_channels`).
    """

    def __init__(self, in_channels: int, b1: int, b3_reduce: int, b3: int, b33_reduce: int, b33: int,
                 pool_proj: int, b33_mid: Optional[int] = None):
        super().__init__()
        b33_mid = b33 if b33_mid is None else b33_mid
        _checks.integer(in_channels, "InceptionModule", "in_channels", minimum=1)
        for arg, value in zip(_WIDTH_NAMES, (b1, b3_reduce, b3, b33_reduce, b33, pool_proj, b33_mid)):
            _checks.integer(value, "InceptionModule", arg, minimum=1)
        self.branch1 = ConvBNReLU(in_channels, b1)
        self.branch3 = nn.Sequential(ConvBNReLU(in_channels, b3_reduce), ConvBNReLU(b3_reduce, b3, 3))
        self.branch33 = nn.Sequential(ConvBNReLU(in_channels, b33_reduce), ConvBNReLU(b33_reduce, b33_mid, 3),
                                      ConvBNReLU(b33_mid, b33, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(in_channels, pool_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch33(x), self.branch_pool(x)], dim=1)

    @property
    def in_channels(self) -> int:
        return self.branch1.conv.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return sum(self.widths[i] for i in (0, 2, 4, 5))  # b1 + b3 + b33 + pool_proj

    @property
    def widths(self) -> tuple:
        """`(b1, b3_reduce, b3, b33_reduce, b33, pool_proj[, b33_mid])`, read from the weights (so pruned
        widths show); `InceptionModule(in_channels, *widths)` rebuilds the module."""
        widths = (_width(self.branch1), _width(self.branch3[0]), _width(self.branch3[1]),
                  _width(self.branch33[0]), _width(self.branch33[2]), _width(self.branch_pool[1]))
        b33_mid = _width(self.branch33[1])
        return widths if b33_mid == widths[4] else widths + (b33_mid,)

    def rebuild_input(self, in_channels: int) -> None:
        """Replace the four 1x1 convs that read the module input by fresh ones reading `in_channels`
        channels (with fresh BatchNorms); everything behind them keeps its weights."""
        _checks.integer(in_channels, "InceptionModule.rebuild_input", "in_channels", minimum=1)
        reference = self.branch1.conv.weight

        def fresh(unit: ConvBNReLU) -> ConvBNReLU:
            return ConvBNReLU(in_channels, _width(unit)).to(device=reference.device, dtype=reference.dtype)

        self.branch1 = fresh(self.branch1)
        self.branch3[0] = fresh(self.branch3[0])
        self.branch33[0] = fresh(self.branch33[0])
        self.branch_pool[1] = fresh(self.branch_pool[1])


def _module_widths(widths, where: str) -> tuple:
    if isinstance(widths, str) or not isinstance(widths, Sequence) or len(widths) not in (6, 7):
        raise ValueError(f"InceptionNet: {where} must be 6 widths (b1, b3_reduce, b3, b33_reduce, b33, pool_proj) "
                         f"or 7 (with b33_mid), got {widths!r}")
    return tuple(_checks.integer(w, "InceptionNet", f"{where}[{i}] ({_WIDTH_NAMES[i]})", minimum=1)
                 for i, w in enumerate(widths))


class InceptionNet(nn.Module):
    """Stem conv, stages of Inception modules, global average pooling, linear classifier.

    `stem`: ConvBNReLU 3x3 with `stem` channels. `stages[s]` is a sequence of module widths (see
    `InceptionModule.widths`); each stage is an `nn.Sequential` of modules, each module reading the previous
    one's concatenated output, with MaxPool2d(2) between consecutive stages when `pool_between`. Then
    AdaptiveAvgPool2d(1) -> flatten -> `classifier`.

    Input: [B, in_channels, H, W] float (H, W >= 2**(len(stages) - 1) with `pool_between`).
    Output: logits [B, num_classes]. Pre-decision layer: the pooled, flattened output of the last stage
    (`pre_decision(x)`, [B, last module's out_channels]).

    Grow with `add_module_to_stage`; `spec()` records the grown (or pruned) architecture.
    """

    registry_name = "inception"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 32,
                 stages: Sequence[Sequence[Sequence[int]]] = (((16, 16, 24, 8, 12, 8),),
                                                             ((32, 32, 48, 16, 24, 16),)),
                 pool_between: bool = True):
        super().__init__()
        _checks.integer(in_channels, "InceptionNet", "in_channels", minimum=1)
        _checks.integer(num_classes, "InceptionNet", "num_classes", minimum=1)
        _checks.integer(stem, "InceptionNet", "stem", minimum=1)
        if isinstance(stages, str) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise ValueError(f"InceptionNet: stages must be a non-empty sequence of stages, got {stages!r}")
        self.pool_between = bool(pool_between)

        self.stem = ConvBNReLU(in_channels, stem, 3)
        channels = stem
        built = []
        for s, stage in enumerate(stages):
            if isinstance(stage, str) or not isinstance(stage, Sequence) or len(stage) == 0:
                raise ValueError(f"InceptionNet: stages[{s}] must be a non-empty sequence of module widths, "
                                 f"got {stage!r}")
            modules = []
            for m, widths in enumerate(stage):
                modules.append(InceptionModule(channels, *_module_widths(widths, f"stages[{s}][{m}]")))
                channels = modules[-1].out_channels
            built.append(nn.Sequential(*modules))
        self.stages = nn.ModuleList(built)
        # pools[s - 1] runs before stage s; Identity keeps forward the same with pool_between=False
        self.pools = nn.ModuleList(nn.MaxPool2d(2) if self.pool_between else nn.Identity()
                                   for _ in range(len(built) - 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def pre_decision(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> the classifier's input [B, last module's out_channels]."""
        x = self.stem(x)
        for s, stage in enumerate(self.stages):  # unrolled by torch.fx: it depends on structure only
            if s > 0:
                x = self.pools[s - 1](x)
            x = stage(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre_decision(x))

    def add_module_to_stage(self, stage_index: int, widths: Optional[Sequence[int]] = None) -> InceptionModule:
        """Append a fresh Inception module to stage `stage_index` and return it.

        The new module reads the stage's current output. With `widths=None` it copies the widths of the
        stage's last module, so its output width equals its input width: the next stage (or the classifier)
        is untouched and every existing weight is kept — growing is a pure warm start. With other widths
        whose output width differs, the consumer's input layers are rebuilt fresh (the next stage's first
        module through `InceptionModule.rebuild_input`, or a new `classifier`).
        """
        stage_index = _checks.integer(stage_index, "InceptionNet.add_module_to_stage", "stage_index")
        if not -len(self.stages) <= stage_index < len(self.stages):
            raise ValueError(f"InceptionNet.add_module_to_stage: stage_index must be in "
                             f"[{-len(self.stages)}, {len(self.stages)}), got {stage_index}")
        stage_index %= len(self.stages)
        stage = self.stages[stage_index]
        last = stage[-1]
        widths = last.widths if widths is None else _module_widths(widths, "widths")
        reference = last.branch1.conv.weight
        module = InceptionModule(last.out_channels, *widths).to(device=reference.device, dtype=reference.dtype)
        stage.append(module)

        if module.out_channels != last.out_channels:
            if stage_index + 1 < len(self.stages):
                self.stages[stage_index + 1][0].rebuild_input(module.out_channels)
            else:
                self.classifier = nn.Linear(module.out_channels, self.classifier.weight.shape[0]).to(
                    device=reference.device, dtype=reference.dtype)
        return module

    def spec(self) -> dict:
        """`{"name": "inception", "kwargs": {...}}` for `gpp_ext.models.build`; widths are read from the
        weights, so the spec of a grown or structurally pruned model rebuilds that architecture."""
        return {"name": self.registry_name, "kwargs": {
            "in_channels": self.stem.conv.weight.shape[1], "num_classes": self.classifier.weight.shape[0],
            "stem": self.stem.conv.weight.shape[0],
            "stages": [[list(module.widths) for module in stage] for stage in self.stages],
            "pool_between": self.pool_between}}
