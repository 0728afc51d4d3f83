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
  Only the part of the traced graph downstream of what silencing a group changes is run again per channel: the
  activations it reads are computed once per group and batch (`_Suffix`), and each rerun reads its own copies.
  Checked against a whole forward pass once per group; where they disagree, that group falls back to whole
  passes with a warning.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx
import torch.nn as nn
from tqdm.auto import tqdm

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


def _touches(target: str, path: str) -> bool:
    """Whether an fx target (a module or attribute path) is `path` (a `module.attr`), holds it or lies in it."""
    return target == path or path.startswith(target + ".") or target.startswith(path + ".")


def _copied(value):
    """`value` with every tensor in it (not parameters) cloned, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_copied(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


class _Suffix:
    """The traced graph of `graph` split for one group: the nodes that read a tensor in `changed` (module.attr
    paths) or depend on one (`nodes`, in order), and what they read from the rest (`reads`), computed once per
    batch by the nodes they need (`prefix`, in `prepare`); `summed` then runs only `nodes`."""

    def __init__(self, graph: ChannelGraph, changed: set):
        self.gm = graph.gm
        order = list(self.gm.graph.nodes)
        dirty = set()
        for node in order:
            if node.op in ("call_module", "get_attr") and any(_touches(node.target, p) for p in changed):
                dirty.add(node)
            elif any(a in dirty for a in node.all_input_nodes):
                dirty.add(node)
        self.nodes = [n for n in order if n in dirty]
        self.reads = {a for n in self.nodes for a in n.all_input_nodes if a not in dirty}
        needed, todo = set(), list(self.reads)
        while todo:  # what the cached values are computed from
            node = todo.pop()
            if node not in needed:
                needed.add(node)
                todo.extend(node.all_input_nodes)
        # every placeholder, in order, so that the inputs bind to the parameters they bind to in a whole pass
        self.prefix = [n for n in order if n in needed or n.op == "placeholder"]
        self.complete = bool(self.nodes) and self.nodes[-1].op == "output"

    @staticmethod
    def _run(interpreter, nodes: list, env: dict, keep: set):
        """Runs `nodes` in order into `env`, freeing each value after its last use among them unless in `keep`;
        returns the output node's value (None if `nodes` has none)."""
        last = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last[a] = i
        interpreter.env = env
        result = None
        for i, node in enumerate(nodes):
            value = interpreter.run_node(node)
            if node.op == "output":
                result = value
            else:
                env[node] = value
            for a in node.all_input_nodes:
                if last.get(a) == i and a not in keep:
                    env.pop(a, None)
        return result

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> dict:
        """What the rerun nodes read from the rest of the graph, for the inputs `x`."""
        interpreter = torch.fx.Interpreter(self.gm)
        interpreter.args_iter = iter((x,))
        env = {}
        self._run(interpreter, self.prefix, env, self.reads)
        return {n: env[n] for n in self.reads}

    @torch.no_grad()
    def summed(self, prepared: dict, y: torch.Tensor) -> float:
        """The summed cross-entropy of one batch (labels `y`, its `prepare`d values in `prepared`)."""
        interpreter = torch.fx.Interpreter(self.gm)
        # copies: an in-place op among the rerun nodes (`x.add_(branch)`) must not change what the next
        # channel's rerun reads
        out = self._run(interpreter, self.nodes, {n: _copied(v) for n, v in prepared.items()}, set())
        return float(nn.functional.cross_entropy(out, y, reduction="sum"))


def _silenced(graph: ChannelGraph, group: str, params: list, saved: list, channel: int, measure):
    """`measure()` with `channel` of `group` silenced; the tensors in `params` are restored exactly (from `saved`,
    not rescaled) afterwards, also when `measure` raises."""
    graph.scale_channels(group, [channel], 0.0)
    try:
        return measure()
    finally:
        for p, original in zip(params, saved):
            p.tensor.data.copy_(original)


def _rerun_sums(suffix: _Suffix, model: nn.Module, size: int, batches: list, silenced, bar):
    """Per channel, the cross-entropy summed over `batches` with that channel silenced (`silenced(c, measure)`),
    rerunning only `suffix`'s nodes, one batch at a time (only one batch's cached activations are held). None,
    with a warning, when the rerun disagrees with a whole pass on the first batch (channel 0 silenced)."""
    sums = [0.0] * size
    for b, (x, y) in enumerate(batches):
        prepared = suffix.prepare(x)
        if b == 0:
            whole, short = silenced(0, lambda: (_loss(model, [(x, y)]), suffix.summed(prepared, y) / y.numel()))
            if abs(short - whole) > 1e-5 * max(1.0, abs(whole)):
                warnings.warn(f"loss_increase: rerunning only the layers after a group gives a loss of "
                              f"{short:.6g}, a whole pass {whole:.6g}; the group is scored with whole passes",
                              RuntimeWarning, stacklevel=3)
                return None
        for c in range(size):
            sums[c] += silenced(c, lambda: suffix.summed(prepared, y))
            if b == len(batches) - 1:
                bar.update()
    return sums


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
    bar = tqdm(total=sum(g.size for g in graph.groups), desc="loss increase", leave=False,
               disable=None if context.progress else True)
    try:
        base = _loss(model, batches)
        count = sum(int(y.numel()) for _, y in batches)
        scores = {}
        for group in graph.groups:
            params = [p for p in graph.channel_params(group.name)
                      if p.role != "consumer" and not p.attr.startswith("running_")]
            saved = [p.tensor.detach().clone() for p in params]

            def silenced(c, measure):
                return _silenced(graph, group.name, params, saved, c, measure)

            suffix = _Suffix(graph, {f"{p.module}.{p.attr}" for p in params})
            sums = _rerun_sums(suffix, model, group.size, batches, silenced, bar) if suffix.complete else None
            if sums is not None:
                rise = [total / max(count, 1) - base for total in sums]
            else:
                rise = []
                for c in range(group.size):
                    rise.append(silenced(c, lambda: _loss(model, batches)) - base)
                    bar.update()
            scores[group.name] = torch.tensor(rise, dtype=torch.float64).clamp_min(0.0)
    finally:
        bar.close()
        model.train(was_training)
    return scores
