"""Sparse Structure Selection (Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks",
ECCV 2018): scaling factors on structures, trained with an L1 penalty by the modified accelerated proximal
gradient, so that factors reach exactly zero and their structures can go.

Structures here: whole residual blocks (`blocks.BlockScales`: a scale on each removable block's branch) and
channels (the scale of each channel is its BatchNorm weight, the neuron-level factor the paper notes BatchNorm
already provides). While the model trains, the factors are taken out of the optimiser's step (their gradients
are read after the backward pass and cleared) and updated by the modified APG of the paper (its SGD form):

    z      = theta - eta * grad
    v_new  = S(z, eta * lam) - theta + mu * v
    theta  = S(z, eta * lam) + mu * v_new          S(z, t) = sign(z) * max(|z| - t, 0)

with `mu = 0.9` and `eta` the paper's SGD rate 0.1 times the schedule of the rest of the training (`fit`'s
learning-rate factor), `lam` the penalty weight. At the end each factor takes its last proximal iterate
`S(z, eta * lam)` (exact zeros where the steps made them; the momentum term alone keeps a factor off zero between
steps), block scales are folded into their branch's last norm, and the blocks at zero are removed
(`blocks.BlockScales.finish`, exact); channels whose BatchNorm weight is
zero are what the channel criterion `bn_scale` ranks lowest at the coming cut.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import is_batch_norm
from .blocks import BlockScales, residual_blocks

__all__ = ["SparseStructureSelection", "check_selectable", "ETA", "MOMENTUM"]

ETA = 0.1        # the step of the factors' proximal update at the peak of the schedule (the paper's SGD rate)
MOMENTUM = 0.9


def _soft(z: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(z) * (z.abs() - t).clamp_min(0.0)


def check_selectable(model: nn.Module, blocks: bool = True, channels: bool = True) -> None:
    """`ValueError` when `model` has none of the structures SSS would scale (removable residual blocks when
    `blocks`, BatchNorm weights when `channels`): there the push would be plain training under SSS's name.
    Reads the model only (no scale or hook is attached), so a loop can call it before training anything."""
    if blocks and residual_blocks(model):
        return
    if channels and any(is_batch_norm(m) and m.weight is not None for m in model.modules()):
        return
    what = " and ".join(n for n, on in (("residual blocks", blocks), ("BatchNorm weights", channels)) if on)
    raise ValueError(f"SparseStructureSelection: the model has no {what} to select (a channel's factor is its "
                     f"BatchNorm weight); use a model with them, or another push (hgs, group_fisher)")


class SparseStructureSelection:
    """The factors of `model` (block scales, and BatchNorm weights when `channels`) trained by the modified APG
    with L1 weight `lam`; `after_backward` and `after_step` go to `training.fit`, `finish()` ends it.

        sss = SparseStructureSelection(model, lam=1e-4, schedule="onecycle")
        fit(model, data, epochs, after_backward=sss.after_backward, after_step=sss.after_step)
        removed_blocks = sss.finish()
    """

    def __init__(self, model: nn.Module, lam: float, schedule: str = "constant", warmup: float = 0.1,
                 blocks: bool = True, channels: bool = True):
        if not lam >= 0:
            raise ValueError(f"SparseStructureSelection: lam must be >= 0, got {lam!r}")
        check_selectable(model, blocks, channels)
        self.model, self.lam, self.schedule, self.warmup = model, float(lam), schedule, warmup
        self.blocks = BlockScales(model) if blocks else None
        self.factors = list(self.blocks.parameters()) if blocks else []
        if channels:
            self.factors += [m.weight for m in model.modules() if is_batch_norm(m) and m.weight is not None]
        self._grads: list = [None] * len(self.factors)
        self._velocity = [torch.zeros_like(f) for f in self.factors]
        self._prox: list = [None] * len(self.factors)   # the last proximal iterate of each factor

    def after_backward(self, model) -> None:
        """Takes the factors' gradients out of the optimiser's step."""
        for i, f in enumerate(self.factors):
            self._grads[i] = None if f.grad is None else f.grad.detach().clone()
            f.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """One modified-APG update of every factor (step `step` of `total`)."""
        from ..training import lr_factor

        eta = ETA * lr_factor(self.schedule, step - 1, total, self.warmup)
        for i, f in enumerate(self.factors):
            grad = self._grads[i]
            if grad is None:
                continue
            z = f - eta * grad
            shrunk = _soft(z, eta * self.lam)
            self._prox[i] = shrunk
            self._velocity[i] = shrunk - f + MOMENTUM * self._velocity[i]
            f.copy_(shrunk + MOMENTUM * self._velocity[i])

    @torch.no_grad()
    def finish(self, delete: bool = True) -> list:
        """Sets every factor to its last proximal iterate (the update's momentum extrapolation moves a factor the
        threshold zeroed off zero again; the iterates are what converges, exact zeros included), folds the block
        scales and deletes the blocks at zero (unless `delete=False`); returns the names deleted. A factor that
        never got a gradient keeps its value."""
        for f, prox in zip(self.factors, self._prox):
            if prox is not None:
                f.copy_(prox)
        return self.blocks.finish(delete) if self.blocks is not None else []

    def zero_blocks(self) -> list:
        return [name for name, value in (self.blocks.scales().items() if self.blocks else ()) if value == 0.0]
