"""Group Fisher (Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021): the Fisher
information of a mask on every channel of a coupled group, per unit of cost its removal saves.

A channel group shares one mask `m` (all its coupled channels go together), applied at the output of each of
the group's layers (after the normalisation that follows a convolution: removing the channel removes the
norm's output): the gradient of the batch loss with respect to `m_c` is `g_c = sum over those outputs, the
batch and the positions of out * dL/dout` at channel `c` (`ChannelGraph.channel_params` says which layers and
where). The importance is the Fisher estimate `sum over batches of g_c^2` (the squared batch-summed product, accumulated
over batches), divided by what removing one channel of the group saves in the budget's unit (`CostModel`:
FLOPs, or parameters when the budget counts them), so a cheap channel must carry less information to stay.

Registered as the criterion `group_fisher`; with `allocation="global"` and `normalize="none"` its scores are
ranked across groups as the paper ranks them (one threshold), and the loop's default solver uses them as it
uses any criterion's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..training import labelled_batches
from .costs import CostModel
from .graph import ChannelGraph

__all__ = ["mask_gradients", "mask_fisher", "group_fisher", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = 16   # batches of the loader the Fisher estimate accumulates over, unless the context limits them


def _masked_outputs(graph: ChannelGraph) -> dict:
    """`{module name: [(group name, positions [size, k])]}`: the modules at whose outputs a group's mask sits,
    each normalisation layer of the group and each producer whose output no normalisation of the group takes
    (a producer followed by its BatchNorm is masked after it: removing the channel removes the norm's output)."""
    out = {}
    for group in graph.groups:
        params = graph.channel_params(group.name)
        norms = {p.module: p for p in params if p.role == "norm" and p.attr == "weight"}
        producers = {p.module: p for p in params if p.role == "producer" and p.attr == "weight"}
        normalised = set()
        for node in graph.gm.graph.nodes:
            if node.op == "call_module" and node.target in norms and node.args:
                source = node.args[0]
                if getattr(source, "op", None) == "call_module" and source.target in producers:
                    normalised.add(source.target)
        for name, p in list(norms.items()) + [(n, p) for n, p in producers.items() if n not in normalised]:
            out.setdefault(name, []).append((group.name, p.index))
    return out


def _channel_axis(module: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def mask_gradients(graph: ChannelGraph, batches, loss_fn=None):
    """Per batch of `batches` (`(inputs, labels)` on the model's device), `{group: [size] float64}`: the
    gradient of the batch loss with respect to each channel's mask, one mask shared by the group's coupled
    layers and applied at each of their outputs (`_masked_outputs`), so the gradient is the sum over those
    outputs, the batch and the positions of `output x dL/doutput` (a generator). The model runs in eval mode;
    its gradients are cleared after each batch, and its mode and hooks restored at the end."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = graph.model
    masked = _masked_outputs(graph)
    outputs: dict[str, list] = {}
    handles = []
    for name in masked:
        def hook(module, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.retain_grad()
                outputs.setdefault(name, []).append(out)
        handles.append(graph.modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            outputs.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(model(x), y).backward()
            grads = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.groups}
            for name, entries in masked.items():
                for out in outputs.get(name, ()):
                    if out.grad is None:
                        continue
                    prod = (out * out.grad).detach().double()
                    axis = _channel_axis(graph.modules[name], out)
                    per_channel = prod.movedim(axis, 0).reshape(prod.shape[axis], -1).sum(1).cpu()
                    for group, index in entries:
                        grads[group] += per_channel[index.cpu()].sum(1)
            model.zero_grad(set_to_none=True)
            yield grads
    finally:
        outputs.clear()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()


def mask_fisher(graph: ChannelGraph, batches, loss_fn=None) -> dict:
    """`{group: [size] float64}`: the squared mask gradients (`mask_gradients`) accumulated over `batches`:
    the Fisher estimate."""
    fisher = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.groups}
    seen = 0
    for grads in mask_gradients(graph, batches, loss_fn):
        for name in fisher:
            fisher[name] += grads[name].square()
        seen += 1
    if seen == 0:
        raise ValueError("group_fisher: the loader yielded no batches")
    return fisher


def group_fisher(graph: ChannelGraph, context) -> dict:
    """Group Fisher importance per channel: the mask Fisher information (`mask_fisher`, over the context's
    first `max_batches` batches, `DEFAULT_BATCHES` when unset) divided by the cost one channel of the group
    saves (`context.cost_kind`: "flops" or "params")."""
    limit = context.max_batches or DEFAULT_BATCHES
    batches = list(labelled_batches(context._need_loader("group_fisher"), context.device, limit=limit))
    fisher = mask_fisher(graph, batches)
    kind = context.cost_kind if context.cost_kind in ("params", "flops") else "flops"
    costs = CostModel(graph, kind)
    full = costs.cost({})
    scores = {}
    for group in graph.groups:
        saved = full - costs.cost({group.name: group.size - 1}) if group.size > 1 else 0
        scores[group.name] = fisher[group.name] / max(float(saved), 1.0)
    return scores
