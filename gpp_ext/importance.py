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
    if isinstance(module, _CONV) or (isinstance(module, nn.Linear) and values[source].dim() == 2):
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
        classifier: the final linear layer's module name (default: the last linear layer).
        rectify: "guided" (rectify and apply the forward ReLU mask) or "deconvnet" (rectify only).

    Returns:
        `{group name: utility [size] float64}` for every prunable group the signal reaches (groups it does not
        reach, e.g. an auxiliary head, are left out, so a selection keeps them whole).
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
                utility[group.name] = sum(_fold(_channel_utility(signals[n]), group.size) for n in reached)
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
            total += _fold(w.abs().flatten(1).sum(1), group.size)
        out[group.name] = total
    return out


def _bn_after(graph: ChannelGraph) -> dict:
    """module name -> the BatchNorm applied directly to its output channels."""
    found = {}
    for name, root in graph._producers:
        for bn_name, lay in graph._attached.items():
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
                total += _fold(bn.weight.abs(), group.size)
            else:
                w = _fold(graph.modules[name].weight.abs().flatten(1).sum(1), group.size)
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
            if out.requires_grad:  # layers whose parameters are frozen and inputs constant carry no gradient
                out.retain_grad()
                outputs.setdefault(name, []).append(out)
        handles.append(graph.modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels).backward()
        scores = {}
        for name, outs in outputs.items():  # every call of a layer used more than once counts
            for out in outs:
                if out.grad is None:
                    continue
                prod = (out * out.grad).detach()
                prod = prod.flatten(2).sum(2) if prod.dim() > 2 else prod
                scores[name] = scores.get(name, 0) + prod.abs().mean(0).double().cpu()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()
    result = {}
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for name in group.modules:
            if name in scores:
                total += _fold(scores[name], group.size)
        result[group.name] = total
    return result


def random_importance(graph: ChannelGraph, generator: torch.Generator | None = None) -> dict:
    """Uniform random scores: the baseline every criterion must beat."""
    return {g.name: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in graph.groups}
