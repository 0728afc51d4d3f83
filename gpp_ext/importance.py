"""How much each channel group matters: the discriminant utility traced down the network, and the baselines.

`trace_utility` is the data-driven deconvolution of DESIGN.md 2.4. A forward pass over a few tracing images
records every intermediate tensor (hence the ReLU masks and max-pool switches); the pre-decision layer's
response is kept only for the selected neurons and walked back to the input, node by node in reverse order:
convolutions and linear layers by `ops.deconv_backproject` with the layer's own weights, ReLUs by
rectification (`rectify="guided"` also applies the forward ReLU mask), max-pools by unpooling with the
recorded switches, and every other op (BatchNorm, average pools, flatten, concatenation, residual add, ...) by
its transpose, i.e. its vector-Jacobian product at the recorded input: a concatenation splits the signal by
branch, an add sends it down both paths, and signals meeting at a tensor are summed. A channel's utility is
the spatial maximum of the magnitude of the image-averaged signal reaching the layer that produced it; a group
of coupled layers sums its members.

The baselines a benchmark compares against take the same graph and return the same dict (group name ->
`[size]` float64 scores): `l1_importance` (L1 norm of each output filter), `bn_scale_importance` (|gamma| of
the BatchNorm after the layer, network-slimming style), `taylor_importance` (first-order Taylor,
|activation · gradient|) and `random_importance`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .graph import _CONV, _NORM, ChannelGraph

__all__ = ["trace_utility", "l1_importance", "bn_scale_importance", "taylor_importance", "random_importance",
           "pre_decision_node"]

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}
_RELU_METHODS = {"relu", "relu_"}
_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_UNPOOL = {F.max_pool1d: F.max_unpool1d, F.max_pool2d: F.max_unpool2d, F.max_pool3d: F.max_unpool3d}


def pre_decision_node(graph: ChannelGraph, classifier: str | None = None) -> torch.fx.Node:
    """The fx node feeding the final classifier (the last linear layer, or `classifier` by module name)."""
    calls = [n for n in graph.gm.graph.nodes if n.op == "call_module"
             and isinstance(graph.modules[n.target], nn.Linear)]
    if classifier is not None:
        calls = [n for n in calls if n.target == classifier]
    if not calls:
        raise ValueError("trace_utility: no linear classifier found in the model's graph; pass classifier=<name>")
    return calls[-1].args[0]


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


def _transpose(graph: ChannelGraph, node: torch.fx.Node, values: dict, signal: torch.Tensor) -> dict:
    """The signal at each tensor input of `node`, given the signal at its output (its vector-Jacobian product)."""
    leaves = {}

    def leaf(arg):
        value = values[arg]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            leaves[arg] = value.detach().requires_grad_(True)
            return leaves[arg].clone()  # a non-leaf copy, so in-place ops (x += y) can run on it
        return value

    with torch.enable_grad():  # the copies made by leaf() must be recorded too
        args = torch.fx.node.map_arg(node.args, leaf)
        kwargs = torch.fx.node.map_arg(node.kwargs, leaf)
        if not leaves:
            return {}
        out = _call(graph, node, args, kwargs)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return {}
        grads = torch.autograd.grad(out, list(leaves.values()), signal, allow_unused=True)
    return {arg: g for arg, g in zip(leaves, grads) if g is not None}


def _backproject(graph: ChannelGraph, node: torch.fx.Node, values: dict, signal: torch.Tensor, rectify: str):
    """One step of the deconvolution: {input node: signal} for the op at `node`."""
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    module = graph.modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, _CONV) or (isinstance(module, nn.Linear) and values[source].dim() == 2):
        weight = module.weight.detach()
        if isinstance(module, nn.Linear):
            return {source: ops.deconv_backproject(signal, weight.to(signal.dtype))}
        if isinstance(module.padding, str):  # "same"/"valid": the transpose is the VJP
            return _transpose(graph, node, values, signal)
        return {source: ops.deconv_backproject(signal, weight.to(signal.dtype), list(module.stride),
                                               list(module.padding), list(module.dilation), module.groups,
                                               list(values[source].shape[2:]))}
    if isinstance(module, _RELU_MODULES) or (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _RELU_METHODS):
        out = signal.clamp_min(0)
        return {source: out * (values[source] > 0) if rectify == "guided" else out}
    pool = _MAXPOOL.get(type(module)) if module is not None else None
    if pool is not None and module.dilation in (1, (1,), (1, 1), (1, 1, 1)):
        _, switches = pool(values[source], module.kernel_size, module.stride, module.padding, module.dilation,
                           module.ceil_mode, return_indices=True)
        unpool = _UNPOOL[pool]
        return {source: unpool(signal, switches, module.kernel_size, module.stride, module.padding,
                               output_size=values[source].shape[2:])}
    return _transpose(graph, node, values, signal)


def _channel_utility(signal: torch.Tensor) -> torch.Tensor:
    """Mean over the tracing images, magnitude, spatial maximum: `[C]`."""
    mean = signal.mean(0).abs()
    return mean.flatten(1).amax(1) if mean.dim() > 1 else mean


def trace_utility(graph: ChannelGraph, inputs: torch.Tensor, neurons: torch.Tensor, classifier: str | None = None,
                  rectify: str = "guided") -> dict:
    """Utility of every prunable group, traced from the selected pre-decision neurons down the network.

    Args:
        graph: the model's `ChannelGraph`.
        inputs: tracing images `[B, ...]` (a few per class; more for small data sets).
        neurons: which pre-decision neurons to keep: a boolean mask or float weights `[D]` (0 drops a neuron),
            or a 1-D tensor of indices.
        classifier: the final linear layer's module name (default: the last linear layer).
        rectify: "guided" (rectify and apply the forward ReLU mask) or "deconvnet" (rectify only).

    Returns:
        `{group name: utility [size] float64}` for every prunable group.
    """
    if rectify not in ("guided", "deconvnet"):
        raise ValueError(f"trace_utility: rectify must be 'guided' or 'deconvnet', got {rectify!r}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError("trace_utility: inputs must be a tensor of tracing images")
    pre = pre_decision_node(graph, classifier)
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
            if node.op == "call_function" and node.target is operator.getitem:
                continue  # parts of a split are frozen channels: nothing to trace through them
            with torch.no_grad():
                for source, s in _backproject(graph, node, values, signal, rectify).items():
                    signals[source] = signals[source] + s if source in signals else s
        utility = {}
        for group in graph.groups:
            total = torch.zeros(group.size, dtype=torch.float64)
            for node in nodes:
                if node.op == "call_module" and node.target in group.modules and node in signals:
                    total += _channel_utility(signals[node]).double().cpu()
            utility[group.name] = total
        return utility
    finally:
        model.train(was_training)


# -------------------------------------------------------------------------------------------- baselines

def l1_importance(graph: ChannelGraph) -> dict:
    """L1 norm of each output filter (summed over a group's coupled layers)."""
    out = {}
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for name in group.modules:
            w = graph.modules[name].weight.detach()
            total += w.abs().flatten(1).sum(1).double().cpu()
        out[group.name] = total
    return out


def _bn_after(graph: ChannelGraph) -> dict:
    """module name -> the BatchNorm applied directly to its output channels."""
    found = {}
    for name, root in graph._producers:
        for bn_name, lay in graph._attached:
            m = graph.modules[bn_name]
            if isinstance(m, _NORM) and lay is not None and len(lay) == 1 and lay[0].root == root:
                found.setdefault(name, m)
    return found


def bn_scale_importance(graph: ChannelGraph) -> dict:
    """|gamma| of the BatchNorm right after each layer (network slimming); layers without one use the L1 norm
    of their filters, scaled to the same mean, so that a mixed network still ranks its channels sensibly."""
    bns = _bn_after(graph)
    l1 = l1_importance(graph)
    out = {}
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for name in group.modules:
            bn = bns.get(name)
            if bn is not None and bn.weight is not None:
                total += bn.weight.detach().abs().double().cpu()
            else:
                w = graph.modules[name].weight.detach().abs().flatten(1).sum(1).double().cpu()
                total += w / w.mean().clamp_min(1e-12)
        out[group.name] = total if total.any() else l1[group.name]
    return out


def taylor_importance(graph: ChannelGraph, inputs: torch.Tensor, labels: torch.Tensor, loss_fn=None) -> dict:
    """First-order Taylor importance (Molchanov et al.): per channel, the batch mean of |sum over positions of
    activation x gradient of the loss| at the layer's output, summed over a group's layers."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = graph.model
    outputs = {}
    handles = []
    names = {name for group in graph.groups for name in group.modules}
    for name in names:
        def hook(m, args, out, name=name):
            out.retain_grad()
            outputs[name] = out
        handles.append(graph.modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels).backward()
        scores = {}
        for name, out in outputs.items():
            prod = (out * out.grad).detach()
            prod = prod.flatten(2).sum(2) if prod.dim() > 2 else prod
            scores[name] = prod.abs().mean(0).double().cpu()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()
    return {g.name: sum(scores[n] for n in g.modules) for g in graph.groups}


def random_importance(graph: ChannelGraph, generator: torch.Generator | None = None) -> dict:
    """Uniform random scores: the baseline every criterion must beat."""
    return {g.name: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in graph.groups}
