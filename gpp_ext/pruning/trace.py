"""Tracing the discriminant utility down the network: the data-driven deconvolution of docs/design.md §2.4.

A forward pass over a few tracing images records every intermediate tensor (hence the ReLU masks and
max-pool switches); the pre-decision layer's response is kept only for the selected neurons and walked back
to the input, node by node in reverse order:
convolutions and linear layers by `ops.deconv_backproject` with the layer's own weights, ReLUs by
rectification (`rectify="guided"` also applies the forward ReLU mask), max-pools by unpooling with the
recorded switches, and every other op (BatchNorm, average pools, flatten, concatenation, residual add, ...) by
its transpose, i.e. its vector-Jacobian product at the recorded input: a concatenation splits the signal by
branch, an add sends it down both paths, and signals meeting at a tensor are summed. A channel's utility is
the spatial maximum of the magnitude of the image-averaged signal reaching the layer that produced it; a group
of coupled layers sums its members.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..classifier import find_classifier, pre_decision_node
from ..layers import BATCH_NORMS, CONV
from .graph import ChannelGraph

__all__ = ["trace_utility"]

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}
_RELU_METHODS = {"relu", "relu_"}
_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_UNPOOL = {F.max_pool1d: F.max_unpool1d, F.max_pool2d: F.max_unpool2d, F.max_pool3d: F.max_unpool3d}


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out


def _call(graph: ChannelGraph, node: torch.fx.Node, args, kwargs):
    if node.op == "call_module":
        return graph.modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _transpose(graph: ChannelGraph, node: torch.fx.Node, values: dict, signal) -> dict:
    """The signal at each tensor input of `node`, given the signal at its output (its vector-Jacobian product);
    for an op with several outputs (a split) `signal` lists one tensor per output."""
    leaves = {}

    def leaf(arg):
        value = values[arg]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if arg not in leaves:  # one leaf per input, however often the op reads it (cat([y, y]), x * x)
                leaves[arg] = value.detach().requires_grad_(True)
            return leaves[arg].clone()  # a non-leaf copy, so in-place ops (x += y) can run on it
        return value

    with torch.enable_grad():  # the copies made by leaf() must be recorded too
        args = torch.fx.node.map_arg(node.args, leaf)
        kwargs = torch.fx.node.map_arg(node.kwargs, leaf)
        if not leaves:
            return {}
        out = _call(graph, node, args, kwargs)
        outs, signals = (list(out), list(signal)) if isinstance(out, (tuple, list)) else ([out], [signal])
        if not all(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
            return {}
        grads = torch.autograd.grad(outs, list(leaves.values()), signals, allow_unused=True)
    return {arg: g for arg, g in zip(leaves, grads) if g is not None}


def _backproject(graph: ChannelGraph, node: torch.fx.Node, values: dict, signal: torch.Tensor, rectify: str):
    """One step of the deconvolution: {input node: signal} for the op at `node`."""
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    module = graph.modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, CONV) or (isinstance(module, nn.Linear) and values[source].dim() == 2):
        weight = module.weight.detach()
        if isinstance(module, nn.Linear):
            return {source: ops.deconv_backproject(signal, weight.to(signal.dtype))}
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return _transpose(graph, node, values, signal)  # "same"/"valid" or reflect padding: the plain VJP
        return {source: ops.deconv_backproject(signal, weight.to(signal.dtype), list(module.stride),
                                               list(module.padding), list(module.dilation), module.groups,
                                               list(values[source].shape[2:]))}
    if isinstance(module, _RELU_MODULES) or (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _RELU_METHODS):
        out = signal.clamp_min(0)
        if rectify == "deconvnet":
            return {source: out}
        mask = values[source] > 0
        if isinstance(module, nn.ReLU6) or node.target is F.relu6:
            mask &= values[source] < 6
        return {source: out * mask}
    if isinstance(module, BATCH_NORMS) and not module.training and module.running_var is not None:
        # eval-mode BatchNorm is a per-channel affine map: its transpose scales by gamma / sqrt(var + eps)
        # (the generic VJP below gives the same, re-running the layer under autograd)
        scale = (module.running_var.detach() + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight.detach()
        return {source: signal * scale.to(signal.dtype).view((1, -1) + (1,) * (signal.dim() - 2))}
    pool = _MAXPOOL.get(type(module)) if module is not None else None
    if pool is not None and module.dilation in (1, (1,), (1, 1), (1, 1, 1)):
        _, switches = pool(values[source], module.kernel_size, module.stride, module.padding, module.dilation,
                           module.ceil_mode, return_indices=True)
        unpool = _UNPOOL[pool]
        return {source: unpool(signal, switches, module.kernel_size, module.stride, module.padding,
                               output_size=values[source].shape[2:])}
    return _transpose(graph, node, values, signal)


def _channel_utility(signal: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Mean over the tracing images, magnitude, spatial maximum: `[C]`, the channels on `axis` of `signal`
    (the last one for a `Linear` on `[N, H, W, C]`)."""
    mean = signal.movedim(axis, 1).mean(0).abs()
    return mean.flatten(1).amax(1) if mean.dim() > 1 else mean


def _fold(score: torch.Tensor, size: int) -> torch.Tensor:
    """Scores of a layer's output channels as scores of its group: the parts of a chunked output are one group
    pruned at the same positions, so their scores add up."""
    score = score.detach().double().cpu()
    return score if score.numel() == size else score.view(-1, size).sum(0)


def trace_utility(graph: ChannelGraph, inputs: torch.Tensor, neurons: torch.Tensor, classifier: str | None = None,
                  rectify: str = "guided") -> dict:
    """Utility of every prunable group, traced from the selected pre-decision neurons down the network.

    Args:
        graph: the model's `ChannelGraph`.
        inputs: tracing images `[B, ...]` (a few per class; more for small data sets).
        neurons: which pre-decision neurons to keep: a boolean mask or float weights `[D]` (0 drops a neuron),
            or a 1-D tensor of indices.
        classifier: the final linear layer's module name (default: `gpp_ext.classifier.find_classifier`).
        rectify: "guided" (rectify and apply the forward ReLU mask) or "deconvnet" (rectify only).

    Returns:
        `{group name: utility [size] float64}` for every prunable group the signal reaches (groups it does not
        reach, e.g. an auxiliary head, are left out, so a selection keeps them whole).
    """
    if rectify not in ("guided", "deconvnet"):
        raise ValueError(f"trace_utility: rectify must be 'guided' or 'deconvnet', got {rectify!r}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError("trace_utility: inputs must be a tensor of tracing images")
    pre = pre_decision_node(graph.gm, classifier or find_classifier(graph.model))
    model = graph.model
    was_training = model.training
    model.eval()
    try:
        recorder = _Recorder(graph.gm)
        with torch.no_grad():
            recorder.run(inputs)
        values = recorder.values
        response = values[pre]
        width = response.shape[1]
        neurons = torch.as_tensor(neurons, device=response.device)
        if neurons.dtype == torch.bool or neurons.is_floating_point():
            if neurons.shape != (width,):
                raise ValueError(f"trace_utility: neurons must be a [{width}] mask or weights, got "
                                 f"{tuple(neurons.shape)}")
            weights = neurons.to(response.dtype)
        else:
            weights = torch.zeros(width, dtype=response.dtype, device=response.device)
            weights[neurons.long()] = 1
        shape = (1, width) + (1,) * (response.dim() - 2)
        signals = {pre: response * weights.view(shape)}
        nodes = list(graph.gm.graph.nodes)
        for node in reversed(nodes[: nodes.index(pre) + 1]):
            signal = signals.get(node)
            if signal is None or node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "call_function" and node.target is operator.getitem \
                    and isinstance(values.get(node.args[0]), (tuple, list)):
                parts = signals.setdefault(node.args[0], {})  # one part of a split: gathered for the split
                index = node.args[1]
                parts[index] = parts[index] + signal if index in parts else signal
                continue
            if isinstance(signal, dict):  # a split: every part's signal, zeros where none arrived
                signal = [signal.get(i, torch.zeros_like(v)) for i, v in enumerate(values[node])]
            with torch.no_grad():
                for source, s in _backproject(graph, node, values, signal, rectify).items():
                    signals[source] = signals[source] + s if source in signals else s
        utility = {}
        for group in graph.groups:
            reached = [n for n in nodes if n.op == "call_module" and n.target in group.modules
                       and isinstance(signals.get(n), torch.Tensor)]
            if reached:  # a group no signal reaches has no evidence either way and is left out (kept whole)
                utility[group.name] = sum(_fold(_channel_utility(signals[n], graph.axis(n)), group.size)
                                          for n in reached)
        return utility
    finally:
        model.train(was_training)
