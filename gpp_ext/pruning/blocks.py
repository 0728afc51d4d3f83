"""Depth pruning: whole residual blocks removed, beside the channel pruning of `ChannelGraph`.

A residual block here is a module computing `relu(branch(x) + shortcut(x))` whose branch ends in a
normalisation layer: gpp_ext's `BasicBlock` (`conv1, bn1, conv2, bn2`, `shortcut`) and torchvision's
`BasicBlock` / `Bottleneck` (`... bn2` or `bn3`, `downsample`). A block whose shortcut is the identity can go:
with its branch at zero it computes `relu(x)`, and its input is already the output of a ReLU (the previous block
or the stem), so the model without it computes the same. A block that changes the shape (a projection
shortcut) stays.

    scales = BlockScales(model)          # a scale on every removable block's branch (a parameter, 1 at first)
    ...train, drive some scales to 0...
    removed = scales.finish()            # scales folded into each branch's last norm, zero blocks deleted

After `finish` the model is an ordinary one again (no extra parameters or hooks), with fewer blocks; a
gpp_ext ResNet's `spec()` then describes the shallower network, so it saves and loads like any model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import is_batch_norm

__all__ = ["residual_blocks", "BlockScales", "remove_blocks"]


def _last_norm(block: nn.Module):
    for name in ("bn3", "bn2"):
        norm = getattr(block, name, None)
        if norm is not None and is_batch_norm(norm):
            return norm
    return None


def _identity_shortcut(block: nn.Module) -> bool | None:
    """True when the block's shortcut is the identity, False when it projects, None when it is not a block."""
    if hasattr(block, "shortcut"):
        return isinstance(block.shortcut, nn.Identity)
    if hasattr(block, "downsample"):
        return block.downsample is None
    return None


def residual_blocks(model: nn.Module, removable_only: bool = True) -> list:
    """`[(name, block)]`: the residual blocks of `model` (see the module's doc), in order; with
    `removable_only`, those whose shortcut is the identity."""
    out = []
    for name, module in model.named_modules():
        identity = _identity_shortcut(module)
        if identity is None or _last_norm(module) is None or not hasattr(module, "conv1"):
            continue
        if identity or not removable_only:
            out.append((name, module))
    return out


def _parent(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def remove_blocks(model: nn.Module, names) -> list:
    """Deletes the removable blocks `names` from their parent `nn.Sequential`s (each keeps at least one block:
    of a parent whose blocks are all named, the first stays). Returns the names deleted. Only blocks whose
    branch is zero leave the outputs unchanged; the caller decides which."""
    names = list(names)
    removable = dict(residual_blocks(model))
    unknown = [n for n in names if n not in removable]
    if unknown:
        raise ValueError(f"remove_blocks: not removable residual blocks (identity shortcut): {unknown}")
    by_parent = {}
    for name in names:
        parent, child = _parent(model, name)
        if not isinstance(parent, nn.Sequential):
            raise ValueError(f"remove_blocks: block {name!r} is not in an nn.Sequential, so it cannot be deleted")
        by_parent.setdefault(id(parent), (parent, {}))[1][child] = name
    deleted = []
    for parent, children in by_parent.values():
        keep = [(k, m) for k, m in parent.named_children() if k not in children]
        if not keep:  # never an empty stage: its first block stays (its zero branch makes it the identity)
            keep = [next(iter(parent.named_children()))]
        kept = {k for k, _ in keep}
        deleted += [full for k, full in children.items() if k not in kept]
        numbered = all(k.isdigit() for k, _ in parent.named_children())
        for k in list(parent._modules):
            del parent._modules[k]
        for i, (k, module) in enumerate(keep):  # blocks numbered 0, 1, ... stay so (as a rebuilt net numbers
            parent.add_module(str(i) if numbered else k, module)   # them); named ones keep their names
    return deleted


class BlockScales:
    """A scalar scale on the branch of every removable residual block of `model` (`block.block_scale`, a
    parameter initialised to 1, applied to the output of the branch's last normalisation by a forward hook).
    `finish()` folds the scales into those norms, deletes the blocks whose scale is exactly 0 (`delete=False`:
    keeps them, each then computing the identity), removes the parameters and hooks, and returns the names
    deleted. A block whose last norm has no affine weight (`affine=False`) has nothing to fold a scale into and
    gets none."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = [(name, block) for name, block in residual_blocks(model)
                       if _last_norm(block).weight is not None and _last_norm(block).bias is not None]
        self._final: dict | None = None   # the scales at finish, once the parameters are gone
        self._handles = []
        for _, block in self.blocks:
            if hasattr(block, "block_scale"):
                raise ValueError("BlockScales: the model already carries block scales")
            parameter = next(block.parameters())
            block.register_parameter("block_scale", nn.Parameter(torch.ones((), dtype=parameter.dtype,
                                                                            device=parameter.device)))

            def hook(module, args, out, block=block):
                return out * block.block_scale
            self._handles.append(_last_norm(block).register_forward_hook(hook))

    def scales(self) -> dict:
        """`{block: scale}` (after `finish`, the scales it folded)."""
        if self._final is not None:
            return dict(self._final)
        return {name: float(block.block_scale.detach()) for name, block in self.blocks}

    def parameters(self) -> list:
        return [block.block_scale for _, block in self.blocks]

    @torch.no_grad()
    def finish(self, delete: bool = True) -> list:
        if self._final is not None:
            raise RuntimeError("BlockScales.finish: already finished (the scales are folded and gone)")
        self._final = self.scales()
        for h in self._handles:
            h.remove()
        self._handles = []
        zero = []
        for name, block in self.blocks:
            scale = block.block_scale.detach()
            norm = _last_norm(block)
            norm.weight.mul_(scale)
            norm.bias.mul_(scale)
            del block._parameters["block_scale"]
            if float(scale) == 0.0:
                zero.append(name)
        return remove_blocks(self.model, zero) if zero and delete else []
