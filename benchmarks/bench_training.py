"""Training-step benchmarks: `fit` in its default memory layout (`memory_format="auto"`: channels-last for 2-D
convolutions on the CPU) against the same steps in the default PyTorch layout (`reference`:
`memory_format="contiguous"`), on the compression benchmark's models and batch size (128 Fashion-MNIST-shaped
inputs; ResNet-20 as the benchmark builds it, 1 input channel). Each round is a few optimiser steps of one
`fit` call with the loop's recipe (AdamW, OneCycle); both rows start from the same weights and data, and the
two layouts' first steps are checked to agree before they are timed.
"""

import os

import pytest
import torch

from gpp_ext import models
from gpp_ext.training import fit

FULL = os.environ.get("GPP_EXT_BENCH", "full") == "full"  # validated in conftest.py
ROUNDS = 5 if FULL else 1
STEPS = 5 if FULL else 1
MODELS = ("lenet5", "vgg", "resnet20", "inception") if FULL else ("lenet5",)
BATCH = 128


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH * STEPS, 1, 28, 28, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 10, (len(x),), generator=g))


def _model(name):
    torch.manual_seed(0)
    return models.build(name, **({"in_channels": 1} if name == "resnet20" else {}))


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("name", MODELS)
def test_fit_steps(benchmark, impl, name):
    data = _data()
    layout = "contiguous" if impl == "reference" else "auto"

    def run(memory_format):
        return fit(_model(name), data, 1.0, lr=4e-3, batch_size=BATCH, lr_schedule="onecycle",
                   memory_format=memory_format)

    # the layouts train alike: one step gives the same logits up to rounding (each convolution sums in another
    # order, and AdamW's first step, lr times the gradient's sign, turns that into changes of up to lr in weights
    # whose gradient is near zero: measured 0.03-0.24% of the logits' norm)
    one = [fit(_model(name), data, 1 / STEPS, lr=4e-3, batch_size=BATCH, lr_schedule="onecycle",
               memory_format=f) for f in ("auto", "contiguous")]
    with torch.no_grad():
        x = data.tensors[0][:256]
        assert float((one[0](x) - one[1](x)).norm() / one[1](x).norm()) < 1e-2
    benchmark.group = f"fit[cpu] {name} {STEPS} steps of {BATCH}x1x28x28"
    benchmark.pedantic(lambda: run(layout), rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)
