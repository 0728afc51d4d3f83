"""Surgery: physically removing channels from a model, all or nothing.

`prune(graph, keep)` (what `ChannelGraph.prune` runs) checks `keep` completely before touching the model,
snapshots every tensor and width attribute it may replace, slices (through `gpp_ext.ops.slice_channels`) the
tensors of every module in the graph's tables (producers' output rows and biases, consumers' input columns,
depthwise filters, norm parameters and running statistics, per-channel parameters such as layer scales), updates
the layers' width attributes, and re-traces the model, which also proves it still runs. Any failure restores the
snapshot, so the user's model is never left half pruned.

Kept channels are taken in the order given (index_select semantics), so a permutation preserves the function.

`widen(graph, add)` (what `ChannelGraph.widen` runs) is the inverse: the same tables, the same slicing, with new
channels appended to each named group. New producer rows and depthwise filters are drawn at the scale of the
existing ones, biases start at zero, norms at the identity (weight 1, bias 0, running mean 0, variance 1) and the
consumers' new input columns at zero, so a widened model computes exactly what it computed before.
`reset(graph, name, channels)` (what `ChannelGraph.reset_channels` runs) gives existing channels those values in
place.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from .. import ops
from ..layers import BATCH_NORMS, CONV, WIDTH_ATTRS, WIDTH_LAYERS

__all__ = ["prune", "widen", "reset", "validate_keep", "validate_add", "cross_channel_norm", "layout_index"]


def _is_int(v) -> bool:
    """A channel index: a Python or numpy int, or a 0-d integer tensor; never a bool or a float."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_keep(graph, keep: dict) -> dict:
    """`keep` as `{group name: int64 CPU indices}`, or a clear error naming the entry that is wrong."""
    if not isinstance(keep, dict):
        raise TypeError(f"ChannelGraph.prune: keep must be a dict of group name -> indices, got "
                        f"{type(keep).__name__}")
    prunable = [g.name for g in graph.groups]
    checked = {}
    for name, index in keep.items():
        try:
            group = graph.group(name)
        except KeyError:
            raise ValueError(f"ChannelGraph.prune: unknown group {name!r}; prunable groups: {prunable}") from None
        if not group.prunable:
            raise ValueError(f"ChannelGraph.prune: group {name!r} cannot be pruned: {group.reason}")
        if isinstance(index, (list, tuple, range)):
            bad = next((v for v in index if not _is_int(v)), None)
            if bad is not None:
                raise TypeError(f"ChannelGraph.prune: keep[{name!r}] must hold int channel indices, got {bad!r} "
                                f"({type(bad).__name__}); it would be truncated or read as 0/1")
            index = torch.tensor([int(v) for v in index], dtype=torch.long)
        if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool,) or index.is_floating_point() \
                or index.dim() != 1:
            raise TypeError(f"ChannelGraph.prune: keep[{name!r}] must be a 1-D integer tensor of channel indices")
        index = index.long().cpu()
        if index.numel() == 0:
            raise ValueError(f"ChannelGraph.prune: keep[{name!r}] is empty: a group cannot be pruned to zero "
                             f"channels")
        if int(index.min()) < 0 or int(index.max()) >= group.size:
            raise ValueError(f"ChannelGraph.prune: keep[{name!r}] must hold indices in [0, {group.size}), got "
                             f"{int(index.min())}..{int(index.max())}")
        if index.unique().numel() != index.numel():
            raise ValueError(f"ChannelGraph.prune: keep[{name!r}] holds duplicate indices")
        checked[name] = index
    return checked


def layout_index(graph, lay, keep: dict) -> torch.Tensor | None:
    """Indices along a tensor's channel dimension that survive `keep` (None: nothing changes); a negative entry
    of `keep` is a new channel (widening), whose positions are -1."""
    if lay is None:
        return None
    parts, changed = [], False
    for offset, seg, group in graph._segments(lay):
        kept = keep.get(group)
        if kept is None:
            parts.append(torch.arange(offset, offset + seg.width))
        else:
            changed = True
            positions = kept.unsqueeze(1) * seg.block + torch.arange(seg.block) + offset
            parts.append(torch.where(kept.unsqueeze(1) < 0, -1, positions).reshape(-1))
    return torch.cat(parts) if changed else None


def prune(graph, keep: dict) -> nn.Module:
    """Keeps exactly `keep[name]` of each named group of `graph` (see `ChannelGraph.prune`); returns the model."""
    keep = validate_keep(graph, keep)
    if not keep:
        return graph.model
    return _change(graph, keep, None)


def cross_channel_norm(graph, name: str) -> str | None:
    """`"module (type)"` of a norm that normalises group `name`'s channels together with others (LayerNorm,
    GroupNorm with several channels per group), where a channel added, or silenced, changes the other channels'
    outputs; None when there is none."""
    for p in graph.channel_params(name):
        m = graph.modules[p.module]
        if p.role == "norm" and (isinstance(m, nn.LayerNorm) or
                                 (isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels)):
            return f"{p.module} ({type(m).__name__})"
    return None


def validate_add(graph, add: dict) -> dict:
    """`add` as `{group name: int >= 1}`, or a clear error naming the entry that is wrong: an unknown or frozen
    group, a count that is not a positive int, or a group a norm normalises across (LayerNorm, GroupNorm with
    several channels per group), where a new channel would change every output of the norm."""
    if not isinstance(add, dict):
        raise TypeError(f"ChannelGraph.widen: add must be a dict of group name -> channels to add, got "
                        f"{type(add).__name__}")
    checked = {}
    for name, n in add.items():
        try:
            group = graph.group(name)
        except KeyError:
            raise ValueError(f"ChannelGraph.widen: unknown group {name!r}; groups: "
                             f"{[g.name for g in graph.groups]}") from None
        if not group.prunable:
            raise ValueError(f"ChannelGraph.widen: group {name!r} cannot change width: {group.reason}")
        if not _is_int(n) or int(n) < 1:
            raise ValueError(f"ChannelGraph.widen: add[{name!r}] must be an int >= 1 (channels to add), got {n!r}")
        norm = cross_channel_norm(graph, name)
        if norm is not None:
            raise ValueError(f"ChannelGraph.widen: group {name!r} is normalised across channels by {norm}; a new "
                             f"channel would change its outputs")
        where = graph.broadcast_at(name)
        if where is not None:
            raise ValueError(f"ChannelGraph.widen: group {name!r} is one channel broadcast onto a wider tensor at "
                             f"{where} (e.g. a spatial attention map): it must keep width 1")
        checked[name] = torch.cat([torch.arange(group.size), torch.full((int(n),), -1)])
    return checked


def widen(graph, add: dict, generator: torch.Generator | None = None) -> nn.Module:
    """Appends `add[name]` new channels to each named group of `graph` (see `ChannelGraph.widen`); returns the
    model, which computes what it computed before."""
    keep = validate_add(graph, add)
    if not keep:
        return graph.model
    return _change(graph, keep, _NewChannels(generator))


def reset(graph, name: str, channels: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Channels `channels` (int64 indices) of group `name` take, in place, the values `widen` gives new channels
    (`_NewChannels`), a producer row's scale taken from the tensor's other channels (see
    `ChannelGraph.reset_channels`)."""
    new = _NewChannels(generator)
    with torch.no_grad():
        for p in graph.channel_params(name):
            positions = p.index[channels].reshape(-1)
            if not positions.numel():
                continue
            others = torch.ones(p.tensor.shape[p.dim], dtype=torch.bool)
            others[positions] = False
            existing = p.tensor.detach()
            if others.any():
                existing = existing.index_select(p.dim, others.nonzero().squeeze(1).to(existing.device))
            shape = list(p.tensor.shape)
            shape[p.dim] = positions.numel()
            value = new(graph.modules[p.module], p.attr, p.role, existing, shape)
            p.tensor.index_copy_(p.dim, positions.to(p.tensor.device), value)


def _change(graph, keep: dict, new) -> nn.Module:
    snapshot = _snapshot(graph)
    try:
        _apply(graph, keep, new)
        graph._build()  # also proves the changed model still runs on the example inputs
    except Exception as error:
        failed = _restore(graph, snapshot)
        if failed:  # the model could not be put back as it was: say so beside the error that stopped the change
            raise RuntimeError(f"ChannelGraph: the change failed ({type(error).__name__}: {error}) and these could "
                               f"not be restored: {failed}; the model is not as it was") from error
        graph._build()
        raise
    return graph.model


class _NewChannels:
    """The values of new channels' entries: producer rows and depthwise filters drawn at the scale of the
    existing ones (`generator`), biases zero, norms the identity, consumers' input columns zero (so the function
    is kept), a per-channel scale the mean of the existing ones."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def __call__(self, module: nn.Module, attr: str, role: str, existing: torch.Tensor, shape) -> torch.Tensor:
        if role in ("producer", "depthwise") and attr == "weight":
            std = float(existing.float().std()) if existing.numel() > 1 else 0.1
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
            return (noise * std).to(existing.device, existing.dtype)
        if role == "scale" or (role == "norm" and attr == "weight" and isinstance(module, nn.PReLU)):
            return torch.full(shape, float(existing.float().mean()), dtype=existing.dtype, device=existing.device)
        one = (role == "norm" and attr in ("weight", "running_var"))
        return torch.full(shape, 1.0 if one else 0.0, dtype=existing.dtype, device=existing.device)


def _snapshot(graph) -> dict:
    """References to every tensor and width attribute pruning may replace, to undo a failed prune (widths only of
    torch's own layers: a container's attributes of those names may be read-only properties)."""
    snapshot = {}
    for name in [n for n, _, _ in graph._tables()] + [module for module, _ in graph._scales]:
        m = graph.modules[name]
        widths = {a: getattr(m, a) for a in WIDTH_ATTRS if hasattr(m, a)} if isinstance(m, WIDTH_LAYERS) else {}
        snapshot[name] = (dict(m._parameters), dict(m._buffers), widths)
    return snapshot


def _restore(graph, snapshot: dict) -> list:
    """Puts every snapshot entry back; returns what could not be (each entry is tried)."""
    failed = []
    for name, (params, buffers, attrs) in snapshot.items():
        m = graph.modules[name]
        m._parameters.update(params)
        m._buffers.update(buffers)
        for attr, value in attrs.items():
            try:
                setattr(m, attr, value)
            except Exception as error:  # keep restoring the rest; reported with the error that stopped the change
                failed.append(f"{name}.{attr} ({type(error).__name__}: {error})")
    return failed


def _apply(graph, keep: dict, new=None) -> None:
    with torch.no_grad():
        for name, role, lay in list(graph._tables()):
            index = layout_index(graph, lay, keep)
            if index is None:
                continue
            m = graph.modules[name]
            if role == "producer":
                slice_module(m, index, output=True, new=new)
            elif role == "consumer":
                slice_module(m, index, output=False, new=new)
            elif role == "depthwise":
                slice_depthwise(m, index, new=new)
            else:
                slice_attached(m, index, new=new)
        for (name, attr), (lay, dim) in list(graph._scales.items()):
            index = layout_index(graph, lay, keep)
            if index is not None:  # a per-channel parameter (layer scale): sliced along its channel dimension
                _replace(graph.modules[name], attr, dim, index, new, "scale")


def _replace(module: nn.Module, attr: str, dim: int, index: torch.Tensor, new=None, role: str = "") -> None:
    """`module.attr` keeps positions `index` along `dim`; positions -1 are new, their values from
    `new(module, attr, role, existing tensor, shape)`."""
    tensor = getattr(module, attr, None)
    if tensor is None:
        return
    fresh = (index < 0).nonzero().squeeze(1)
    sliced = ops.slice_channels(tensor.detach(), dim, index.clamp(min=0).to(tensor.device))
    if fresh.numel():
        shape = list(sliced.shape)
        shape[dim] = fresh.numel()
        sliced.index_copy_(dim, fresh.to(sliced.device), new(module, attr, role, tensor.detach(), shape))
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attr, sliced)


def slice_module(m: nn.Module, index: torch.Tensor, output: bool, new=None) -> None:
    """A conv or linear layer keeps `index` of its outputs (weight dim 0 and bias) or inputs (weight dim 1)."""
    conv = isinstance(m, CONV)
    if output:
        _replace(m, "weight", 0, index, new, "producer")
        _replace(m, "bias", 0, index, new, "producer")
        setattr(m, "out_channels" if conv else "out_features", index.numel())
    else:
        _replace(m, "weight", 1, index, new, "consumer")
        setattr(m, "in_channels" if conv else "in_features", index.numel())


def slice_depthwise(m: nn.Module, index: torch.Tensor, new=None) -> None:
    """A depthwise convolution keeps channels `index` (filters and bias; in = out = groups)."""
    _replace(m, "weight", 0, index, new, "depthwise")
    _replace(m, "bias", 0, index, new, "depthwise")
    m.in_channels = m.out_channels = m.groups = index.numel()


def slice_attached(m: nn.Module, index: torch.Tensor, new=None) -> None:
    """A norm or PReLU over the channels keeps `index` of its parameters and running statistics."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _replace(m, attr, 0, index, new, "norm")
    k = index.numel()
    if isinstance(m, BATCH_NORMS):
        m.num_features = k
    elif isinstance(m, nn.PReLU):
        m.num_parameters = k
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (k,)
    elif isinstance(m, nn.GroupNorm):
        if m.num_groups == m.num_channels:
            m.num_groups = k
        m.num_channels = k
