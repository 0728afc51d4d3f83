"""Sparse Structure Selection (Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks",
ECCV 2018): scaling factors on structures, trained with an L1 penalty by the modified accelerated proximal
gradient, so that factors reach exactly zero and their structures can go.

Structures here: whole residual blocks (`blocks.BlockScales`: a scale on each removable block's branch) and
channels: where a BatchNorm follows a layer, a channel's factor is its BatchNorm weight (the neuron-level factor
the paper notes BatchNorm already provides); a prunable layer that no norm follows (LeNet-5's layers, VGG-BN's
hidden fully connected layer) gets an explicit factor per output channel (`ChannelScales`, which needs the model's
example inputs to find those layers), folded into the layer's weight rows and bias at the end, so the saved
model stays ordinary. While the model trains, the factors are taken out of the optimiser's step (their gradients
are read after the backward pass and cleared) and updated by the modified APG of the paper (its SGD form):

    z      = theta - eta * grad
    v_new  = S(z, eta * lam) - theta + mu * v
    theta  = S(z, eta * lam) + mu * v_new          S(z, t) = sign(z) * max(|z| - t, 0)

with `mu = 0.9` and `eta` the paper's SGD rate 0.1 times the schedule of the rest of the training (`fit`'s
learning-rate factor), `lam` the penalty weight. At the end each factor takes its last proximal iterate
`S(z, eta * lam)` (exact zeros where the steps made them; the momentum term alone keeps a factor off zero between
steps), block scales are folded into their branch's last norm, and the blocks at zero are removed
(`blocks.BlockScales.finish`, exact); explicit channel factors are folded into their layers. Channels whose
BatchNorm weight is zero, or whose folded weight rows are, are what the channel criterion `bn_scale` ranks lowest
at the coming cut (a layer without a BatchNorm is ranked by the L1 norm of its rows there).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import is_batch_norm
from .blocks import BlockScales, residual_blocks

__all__ = ["SparseStructureSelection", "ChannelScales", "check_selectable", "NothingToSelect", "ETA", "MOMENTUM"]

ETA = 0.1        # the step of the factors' proximal update at the peak of the schedule (the paper's SGD rate)
MOMENTUM = 0.9


def _soft(z: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(z) * (z.abs() - t).clamp_min(0.0)


_SCALABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def scalable_layers(model: nn.Module, example, ignore=()) -> list:
    """The names of the layers of `model` that get an explicit channel factor: each the only producer of a
    prunable channel group (`ChannelGraph` on `example`) over which no norm runs, a convolution (not grouped) or
    a linear layer whose every output channel is one channel of the group."""
    from .graph import ChannelGraph

    graph = ChannelGraph(model, example, ignore=tuple(ignore))
    names = []
    for group in graph.groups:
        params = graph.channel_params(group.name)
        if any(p.role in ("norm", "scale", "depthwise") for p in params):
            continue
        producers = [p for p in params if p.role == "producer" and p.attr == "weight"]
        if len(producers) != 1:
            continue
        p = producers[0]
        module = graph.modules[p.module]
        outputs = module.out_features if isinstance(module, nn.Linear) else getattr(module, "out_channels", None)
        if isinstance(module, _SCALABLE) and getattr(module, "groups", 1) == 1 and p.index.shape[1] == 1 \
                and p.index.shape[0] == outputs and p.dim == 0:
            names.append(p.module)
    return names


class NothingToSelect(ValueError):
    """`check_selectable`'s refusal: the model has none of the structures SSS would scale."""


def check_selectable(model: nn.Module, blocks: bool = True, channels: bool = True, example=None, ignore=()) -> None:
    """`ValueError` when `model` has none of the structures SSS would scale (removable residual blocks when
    `blocks`; when `channels`, BatchNorm weights, or with `example` inputs a layer `ChannelScales` would scale):
    there the push would be plain training under SSS's name. Attaches nothing, so a loop can call it before
    training anything."""
    if blocks and residual_blocks(model):
        return
    if channels and any(is_batch_norm(m) and m.weight is not None for m in model.modules()):
        return
    if channels and example is not None and scalable_layers(model, example, ignore):
        return
    what = " and ".join(n for n, on in (("residual blocks", blocks),
                                        ("channels (BatchNorm weights or prunable layers)", channels)) if on)
    raise NothingToSelect(f"SparseStructureSelection: the model has no {what} to select; use a model with them, "
                          f"or another push (hgs, group_fisher)")


class ChannelScales:
    """An explicit factor per output channel (`channel_scale`, a parameter initialised to 1, multiplying the
    layer's output by a forward hook) on every layer `scalable_layers` names. `finish()` folds the factors into
    the layers' weight rows and biases (exact: `s * (W x + b) = (s W) x + s b`), removes the parameters and hooks,
    and returns the layers' names."""

    def __init__(self, model: nn.Module, example, ignore=()):
        self.model = model
        modules = dict(model.named_modules())
        self.layers = [(name, modules[name]) for name in scalable_layers(model, example, ignore)]
        self._handles = []
        for _, layer in self.layers:
            if hasattr(layer, "channel_scale"):
                raise ValueError("ChannelScales: the model already carries channel scales")
            weight = layer.weight
            layer.register_parameter("channel_scale", nn.Parameter(torch.ones(weight.shape[0], dtype=weight.dtype,
                                                                              device=weight.device)))

            def hook(module, args, out):
                scale = module.channel_scale
                return out * (scale if isinstance(module, nn.Linear) else scale.view(-1, *(1,) * (out.dim() - 2)))
            self._handles.append(layer.register_forward_hook(hook))

    def parameters(self) -> list:
        return [layer.channel_scale for _, layer in self.layers]

    @torch.no_grad()
    def finish(self) -> list:
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, layer in self.layers:
            scale = layer.channel_scale.detach()
            layer.weight.mul_(scale.view(-1, *(1,) * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.mul_(scale)
            del layer._parameters["channel_scale"]
        return [name for name, _ in self.layers]


class SparseStructureSelection:
    """The factors of `model` (block scales; when `channels`, BatchNorm weights and, given `example` inputs, the
    explicit factors of `ChannelScales`) trained by the modified APG with L1 weight `lam`; `after_backward` and
    `after_step` go to `training.fit`, `finish()` ends it.

        sss = SparseStructureSelection(model, lam=1e-4, schedule="onecycle", example=torch.zeros(2, 1, 28, 28))
        fit(model, data, epochs, after_backward=sss.after_backward, after_step=sss.after_step)
        removed_blocks = sss.finish()
    """

    def __init__(self, model: nn.Module, lam: float, schedule: str = "constant", warmup: float = 0.1,
                 blocks: bool = True, channels: bool = True, example=None, ignore=()):
        from ..training import LR_SCHEDULES

        if not lam >= 0:
            raise ValueError(f"SparseStructureSelection: lam must be >= 0, got {lam!r}")
        if schedule not in LR_SCHEDULES or not 0 <= warmup < 1:
            raise ValueError(f"SparseStructureSelection: schedule must be one of {LR_SCHEDULES} (fit's lr_schedule) "
                             f"and warmup in [0, 1), got {schedule!r}, {warmup!r}")
        check_selectable(model, blocks, channels, example, ignore)
        self.model, self.lam, self.schedule, self.warmup = model, float(lam), schedule, warmup
        # the channel factors first: their layers are found by tracing the model as it is, without block scales
        self.channels = ChannelScales(model, example, ignore) if channels and example is not None else None
        self.blocks = BlockScales(model) if blocks else None
        self.factors = list(self.blocks.parameters()) if blocks else []
        if channels:
            self.factors += [m.weight for m in model.modules() if is_batch_norm(m) and m.weight is not None]
        if self.channels is not None:
            self.factors += self.channels.parameters()
        self._grads: list = [None] * len(self.factors)
        self._velocity = [torch.zeros_like(f) for f in self.factors]
        self._prox: list = [None] * len(self.factors)   # the last proximal iterate of each factor
        self._taken = False   # after_backward has run since the last after_step

    def after_backward(self, model) -> None:
        """Takes the factors' gradients out of the optimiser's step."""
        for i, f in enumerate(self.factors):
            self._grads[i] = None if f.grad is None else f.grad.detach().clone()
            f.grad = None
        self._taken = True

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """One modified-APG update of every factor (step `step` of `total`)."""
        from ..training import lr_factor

        if not self._taken:
            raise RuntimeError("SparseStructureSelection: after_step ran without after_backward, so the optimiser "
                               "trained the factors and no proximal step was taken; pass both to fit: "
                               "fit(..., after_backward=sss.after_backward, after_step=sss.after_step)")
        self._taken = False
        eta = ETA * lr_factor(self.schedule, step - 1, total, self.warmup)
        for i, f in enumerate(self.factors):
            grad = self._grads[i]
            if grad is None:
                continue
            if self._velocity[i].device != f.device:  # the model moved (fit's device) since construction
                self._velocity[i] = self._velocity[i].to(f.device)
            z = f - eta * grad
            shrunk = _soft(z, eta * self.lam)
            self._prox[i] = shrunk
            self._velocity[i] = shrunk - f + MOMENTUM * self._velocity[i]
            f.copy_(shrunk + MOMENTUM * self._velocity[i])

    @torch.no_grad()
    def finish(self, delete: bool = True) -> list:
        """Sets every factor to its last proximal iterate (the update's momentum extrapolation moves a factor the
        threshold zeroed off zero again; the iterates are what converges, exact zeros included), folds the
        explicit channel factors into their layers, folds the block scales and deletes the blocks at zero (unless
        `delete=False`); returns the names deleted. A factor that never got a gradient keeps its value."""
        for f, prox in zip(self.factors, self._prox):
            if prox is not None:
                f.copy_(prox)
        if self.channels is not None:
            self.channels.finish()
        return self.blocks.finish(delete) if self.blocks is not None else []

    def zero_blocks(self) -> list:
        return [name for name, value in (self.blocks.scales().items() if self.blocks else ()) if value == 0.0]
