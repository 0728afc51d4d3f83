"""Hierarchical group-sparse regularisation and loss-increase selection (Mitsuno & Kurita, "Hierarchical Group
Sparse Regularization for Deep Convolutional Neural Networks", IJCNN 2020, and their filter-pruning
follow-up): train with a group lasso over nested groups, then keep the channels whose removal raises the loss
most.

- `hierarchical_penalty(graph)`: per channel `c` of every prunable group, `||everything that produces c||_2`
  (the output neuron: its filters, bias and norm parameters) `+ sum over its filters ||W[c, i]||_2` (each
  filter, nested inside its neuron) `+ ||every consumer column that reads c||_2` (the input-channel view). Weight
  `lam` per unit; trained in the push phase (the loop's push `hgs`), it drives whole channels toward zero.
- `loss_increase(graph, context)`: a registered criterion. Each channel is silenced in turn
  (`ChannelGraph.scale_channels(..., 0)`, then restored exactly) and the increase of the cross-entropy on a
  fixed set of randomly drawn training samples is its score (clamped at zero: removing it does not help).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..training import labelled_batches
from .graph import ChannelGraph

__all__ = ["hierarchical_penalty", "loss_increase", "DEFAULT_SAMPLES"]

DEFAULT_SAMPLES = 512   # training samples the loss increase is measured on


def hierarchical_penalty(graph: ChannelGraph, lam: float):
    """`penalty(model) -> scalar`: `lam` times the nested group lasso of every prunable group (see the module's
    doc), for `training.fit(..., penalty=...)`. The tensors are read from `graph` each call, so the penalty
    follows the model as it trains."""
    parts = []  # (tensor, dim, index [size, k], kind) per group
    for group in graph.groups:
        for p in graph.channel_params(group.name):
            if p.attr.startswith("running_") or not p.is_parameter:
                continue
            parts.append((p.tensor, p.dim, p.index, p.role, group.name))
    sizes = {g.name: g.size for g in graph.groups}

    def penalty(model) -> torch.Tensor:
        total = 0.0
        for name, size in sizes.items():
            neuron = 0.0      # squared norm of what produces each channel
            column = 0.0      # squared norm of what reads it
            filters = 0.0     # sum of the norms of its filters (nested in the neuron)
            for tensor, dim, index, role, group in parts:
                if group != name:
                    continue
                moved = tensor.movedim(dim, 0)
                per = moved[index.to(tensor.device).reshape(-1)].reshape(size, index.shape[1], *moved.shape[1:])
                squares = per.square().flatten(1).sum(1)
                if role == "consumer":
                    column = column + squares
                else:
                    neuron = neuron + squares
                    if role == "producer" and per.dim() > 3:   # convolution filters: [size, 1, in, k...]
                        filters = filters + per.flatten(3).square().sum(3).clamp_min(1e-24).sqrt().sum((1, 2))
            total = total + (torch.as_tensor(neuron).clamp_min(1e-24).sqrt() + filters
                             + torch.as_tensor(column).clamp_min(1e-24).sqrt()).sum()
        return lam * total
    return penalty


@torch.no_grad()
def _loss(model: nn.Module, batches) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
        count += int(y.numel())
    return total / max(count, 1)


def loss_increase(graph: ChannelGraph, context) -> dict:
    """Per channel, the rise of the cross-entropy on `DEFAULT_SAMPLES` training samples drawn at random (seeded
    by `context.seed`; from the context's first `max_batches` batches, or 16) when that channel alone is silenced."""
    model = graph.model
    limit = context.max_batches or 16
    xs, ys = [], []
    for x, y in labelled_batches(context._need_loader("loss_increase"), context.device, limit=limit):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("loss_increase: the loader yielded no batches")
    x, y = torch.cat(xs), torch.cat(ys)
    pick = torch.randperm(len(y), generator=context.generator())[:DEFAULT_SAMPLES].to(y.device)
    batches = [(x[pick[i:i + 256]], y[pick[i:i + 256]]) for i in range(0, len(pick), 256)]
    was_training = model.training
    model.eval()
    try:
        base = _loss(model, batches)
        scores = {}
        for group in graph.groups:
            params = [p for p in graph.channel_params(group.name)
                      if p.role != "consumer" and not p.attr.startswith("running_")]
            saved = [p.tensor.detach().clone() for p in params]
            rise = torch.zeros(group.size, dtype=torch.float64)
            for c in range(group.size):
                graph.scale_channels(group.name, [c], 0.0)
                rise[c] = _loss(model, batches) - base
                for p, original in zip(params, saved):  # restored exactly, not rescaled
                    p.tensor.data.copy_(original)
            scores[group.name] = rise.clamp_min(0.0)
    finally:
        model.train(was_training)
    return scores
