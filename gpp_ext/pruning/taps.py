"""Reading `activation x gradient` at a layer's output, safely: the criteria that need it (Taylor, Group Fisher)
share these.

- `inplace_after(graph, name)`: whether the layer's output may be changed in place after it: a module with
  `inplace=True`, an `inplace=True` keyword, a `relu_`-style call, or a binary operator with the output as its
  left operand (the trace shows `x += y` as `x + y`, so every `operator.add(x, ...)` counts: torchvision's
  residual blocks end in `out += identity`). The activation must then be copied at the forward pass: the
  in-place op overwrites it before the gradient arrives.
- `tap(out, copy)`: `([activation, version, gradient], output)`: the activation is `out` detached, the gradient
  comes from a tensor hook on `out` (not `retain_grad`: after an in-place op `.grad` is the new version's), and
  with `copy` the forward hook returns `output`, a clone of `out`, so the in-place op that follows changes the
  clone and `out` keeps its values and its gradient. The version is compared by `check_unchanged` when the
  gradient arrives, so an in-place op the trace cannot show (`x += y` in a forward) is an error, never silently
  wrong scores.
- `per_sample(module, prod)`: `[N, channels]`, `prod` summed over every axis but the batch and the layer's
  channel axis (the last one for `nn.Linear` and `nn.LayerNorm`, which also act on `[N, H, W, C]` tensors).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn

from .graph import ChannelGraph

__all__ = ["inplace_after", "check_unchanged", "tap", "channel_axis", "per_sample"]

# `x op= y` on a traced tensor is recorded as `x op y` (a proxy has no in-place operators), so these may be in place.
_AUGMENTABLE = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                          operator.mod, operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor,
                          operator.lshift, operator.rshift})


def inplace_after(graph: ChannelGraph, name: str) -> bool:
    """Whether module `name`'s output may be changed in place after it (see the module's doc)."""
    for node in graph.gm.graph.nodes:
        if node.op != "call_module" or node.target != name:
            continue
        for user in node.users:
            if user.op == "call_module" and getattr(graph.modules.get(user.target), "inplace", False) is True:
                return True
            if user.op == "call_function" and user.target in _AUGMENTABLE and user.args and user.args[0] is node:
                return True
            called = getattr(user.target, "__name__", str(user.target))
            if user.op in ("call_function", "call_method") and user.args and user.args[0] is node and (
                    user.kwargs.get("inplace") is True or called.endswith("_") and not called.endswith("__")):
                return True
    return False


def check_unchanged(op: str, name: str, value: torch.Tensor, version) -> None:
    """`RuntimeError` when the view `value` of layer `name`'s output changed in place since it was recorded."""
    if version is not None and value._version != version:
        raise RuntimeError(f"{op}: the output of {name!r} was changed in place after it was computed (an in-place "
                           f"op the traced graph does not show, e.g. `x += y` or `x.relu_()`), so activation x "
                           f"gradient cannot be measured there; make that op out-of-place")


def tap(out: torch.Tensor, copy: bool, on_grad=None):
    """`(entry, output)` for a forward hook at a layer's output `out` (see the module's doc): `entry` is
    `[activation, version, gradient]`, the gradient (detached) filled by the backward pass, or passed to
    `on_grad(activation, version, gradient)` instead when given; the hook returns `output` (None, or with `copy`
    a clone of `out` for the in-place op to change)."""
    value = out.detach()
    entry = [value, value._version, None]

    def hook(grad):
        if on_grad is not None:
            on_grad(value, entry[1], grad.detach())
        else:
            entry[2] = grad.detach()
    out.register_hook(hook)
    return entry, (out.clone() if copy else None)


def channel_axis(module: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def per_sample(module: nn.Module, prod: torch.Tensor) -> torch.Tensor:
    """`[N, channels]` (on the CPU): `prod` (batch first) summed over all but the batch and the channel axis."""
    axis = channel_axis(module, prod)
    return prod.movedim(axis, 1).reshape(prod.shape[0], prod.shape[axis], -1).sum(2).cpu()
