"""What a model costs: parameters and floating-point operations.

FLOPs count a multiply and an add separately (a multiply-accumulate is 2 FLOPs) for convolutions and linear
layers, plus one add per output for a bias; normalisation, activations, pooling and element-wise adds are not
counted (they are a few percent in the models here). Counts are per input sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .layers import CONV

__all__ = ["count_params", "count_flops"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass per sample on inputs shaped like `example_inputs` (a tensor or a tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    batch = example_inputs[0].shape[0] if example_inputs and example_inputs[0].dim() > 0 else 1
    total = 0

    def conv_hook(m, inputs, output):
        nonlocal total
        macs_per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        total += output.numel() * (2 * macs_per_output + (1 if m.bias is not None else 0))

    def linear_hook(m, inputs, output):
        nonlocal total
        total += output.numel() * (2 * m.in_features + (1 if m.bias is not None else 0))

    handles = []
    for m in model.modules():
        if isinstance(m, CONV):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // max(batch, 1)
