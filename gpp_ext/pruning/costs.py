"""What a choice of widths would cost, without cutting anything: parameters, FLOPs or latency.

- `CostModel(graph, "params" | "flops")`: exact. Every tensor that carries a group's channels loses
  `index.shape[1]` positions along its channel dimension per channel removed (the graph's group-parameter API
  says which tensors, along which dimension), and a convolution's or linear layer's FLOPs follow its weight
  (`positions per sample x (2 x weight elements + bias elements)`).
- `LatencyModel(graph, table)`: measured. Each traced convolution or linear call costs what the per-layer
  latency table (`gpp_ext.latency.LatencyTable`, measured on this machine in the deploy runtime) says for its
  input and output widths; everything else (activations, pooling, normalisation, the layers no group touches)
  is a constant, the whole model's measured latency less its layers' at full width.

Both give `cost(widths)`, `terms()` (the cost as a constant plus terms each depending on a few groups' widths:
what the width solvers decompose) and `sizes`; `cost_model(graph, kind, latency)` builds the one a budget
kind needs.
"""

from __future__ import annotations

import math

from ..cost import count_flops, count_params
from ..layers import CONV
from .graph import ChannelGraph

__all__ = ["CostModel", "LatencyModel", "cost_model", "KINDS"]

KINDS = ("params", "flops", "latency")


def cost_model(graph: ChannelGraph, kind: str, latency=None):
    """The cost model of budget kind `kind`: `CostModel` for "params" and "flops", `LatencyModel` on the
    `latency` table (a `gpp_ext.latency.LatencyTable`) for "latency"."""
    if kind == "latency":
        if latency is None:
            raise ValueError("a latency budget needs latency=<gpp_ext.latency.LatencyTable> (the per-layer table "
                             "measured in the runtime you deploy with)")
        return LatencyModel(graph, latency)
    return CostModel(graph, kind)


class CostModel:
    """The cost (parameters or FLOPs per sample) of `graph.model` after pruning, as a function of the number of
    channels each group keeps.

        model = CostModel(graph, "params")
        model.cost({"conv1": 3, "fc1": 60})    # == count_params of the model pruned to those widths

    Exact for every tensor the graph slices; layers the graph leaves alone (frozen groups, ignored modules)
    are a constant.
    """

    def __init__(self, graph: ChannelGraph, kind: str = "params"):
        if kind not in ("params", "flops"):
            raise ValueError(f"CostModel: kind must be 'params' or 'flops', got {kind!r}")
        self.kind = kind
        self.sizes = {g.name: g.size for g in graph.groups}
        # (module, attr) -> [shape, [(dim, group, positions per channel)], is a parameter]
        self._tensors: dict[tuple, list] = {}
        for group in graph.groups:
            for p in graph.channel_params(group.name):
                entry = self._tensors.setdefault((p.module, p.attr), [list(p.tensor.shape), [], p.is_parameter])
                entry[1].append((p.dim, group.name, p.index.shape[1]))
        if kind == "params":
            self._calls = []
            self._constant = count_params(graph.model) - sum(
                math.prod(shape) for shape, _, is_param in self._tensors.values() if is_param)
            self._tensors = {k: v for k, v in self._tensors.items() if v[2]}
            return
        # FLOPs: every traced call of a conv or linear layer, with its output positions per sample
        batch = graph.example_inputs[0].shape[0] if graph.example_inputs[0].dim() > 0 else 1
        self._calls = []  # (positions per sample, weight key, weight shape, has bias)
        for node, name, module in graph.layer_calls():
            shape = tuple(node.meta["tensor_meta"].shape)
            positions = math.prod(shape) // max(batch, 1) // module.weight.shape[0]
            self._calls.append((positions, (name, "weight"), list(module.weight.shape), module.bias is not None))
        full = {name: 0 for name in self.sizes}
        self._constant = count_flops(graph.model, graph.example_inputs) - self._flops(full)

    def _shape(self, key, shape, removed: dict) -> list:
        entry = self._tensors.get(key)
        if entry is None:
            return shape
        shape = list(entry[0])
        for dim, group, per_channel in entry[1]:
            shape[dim] -= removed.get(group, 0) * per_channel
        return shape

    def _flops(self, removed: dict) -> int:
        total = 0
        for positions, key, shape, bias in self._calls:
            new = self._shape(key, shape, removed)
            total += positions * (2 * math.prod(new) + (new[0] if bias else 0))
        return total

    def terms(self) -> tuple:
        """`(constant, [(groups, cost_of)...])`: the cost as a constant plus one term per tensor (parameters) or
        per layer call (FLOPs), each depending only on the widths of `groups` (a tuple of group names):
        `cost_of(widths)` with `widths` naming at least those groups. `cost(w) == constant + sum of the terms`.
        What the width solvers decompose (a chain of groups coupled only pairwise is solved exactly)."""
        out = []
        if self.kind == "params":
            for key, entry in self._tensors.items():
                groups = tuple(dict.fromkeys(g for _, g, _ in entry[1]))
                out.append((groups, self._term(key, entry[0], groups, None)))
        else:
            for positions, key, shape, bias in self._calls:
                entry = self._tensors.get(key)
                groups = tuple(dict.fromkeys(g for _, g, _ in entry[1])) if entry else ()
                out.append((groups, self._term(key, shape, groups, (positions, bias))))
        return self._constant, out

    def _term(self, key, shape, groups, call):
        def cost_of(widths):
            removed = {g: self.sizes[g] - int(widths[g]) for g in groups}
            new = self._shape(key, shape, removed)
            if call is None:
                return math.prod(new)
            positions, bias = call
            return positions * (2 * math.prod(new) + (new[0] if bias else 0))
        return cost_of

    def cost(self, widths: dict) -> int:
        """The cost with group `name` keeping `widths[name]` channels (groups not named stay whole)."""
        unknown = set(widths) - set(self.sizes)
        if unknown:
            raise ValueError(f"CostModel.cost: widths name groups that are not prunable: {sorted(unknown)}")
        removed = {name: size - int(widths.get(name, size)) for name, size in self.sizes.items()}
        if self.kind == "flops":
            return self._constant + self._flops(removed)
        return self._constant + sum(math.prod(self._shape(key, entry[0], removed))
                                    for key, entry in self._tensors.items())


def _calls(graph: ChannelGraph):
    """Every traced call of a convolution or linear layer: `(node, module, input shape, output shape)`."""
    for node, _, module in graph.layer_calls():
        source = node.args[0] if node.args else None
        meta = getattr(source, "meta", {}).get("tensor_meta") if source is not None else None
        yield node, module, (tuple(meta.shape) if meta is not None else None), tuple(node.meta["tensor_meta"].shape)


def _cut_copy(graph: ChannelGraph, widths: dict):
    """A copy of `graph.model` with group `name` cut to its first `widths[name]` channels."""
    import copy

    import torch

    trial = copy.deepcopy(graph.model)
    ChannelGraph(trial, graph.example_inputs, ignore=graph.ignore).prune(
        {name: torch.arange(w) for name, w in widths.items()})
    return trial


class LatencyModel:
    """The latency (milliseconds per call of the model, at the table's runtime and batch) of `graph.model`
    after pruning, from the per-layer latency table `table` (`gpp_ext.latency.LatencyTable`).

        table = LatencyTable("eager", batch=1)
        model = LatencyModel(graph, table)
        model.cost({})                           # the model's measured latency
        model.cost({"features.0": 16})           # predicted after keeping 16 channels of that group

    A layer's input and output widths follow the groups its weight carries (a flattened input counts every
    position of a channel); its latency is the table's at those widths, interpolated between the measured
    points. The rest of the model's latency (activations, normalisation, pooling, additions, call overhead) is
    a fixed part plus a part that scales with the output activations of the layers, found from the whole model
    timed at full width and at a quarter of every group's width (`table.model_ms`); each layer carries its
    share of the scaled part. Layers no group touches, and grouped (not depthwise) convolutions, are a constant
    at full width.
    """

    kind = "latency"

    def __init__(self, graph: ChannelGraph, table):
        self.table = table
        self.sizes = {g.name: g.size for g in graph.groups}
        calls = list(_calls(graph))
        shape = graph.example_inputs[0].shape[1:]
        quarter = {g.name: max(1, g.size // 4) for g in graph.groups}
        small = _cut_copy(graph, quarter) if graph.groups else None
        # every table and both whole-model timings in one window, so they share the machine's load
        table.prepare(layers=[(module, in_shape) for _, module, in_shape, _ in calls if in_shape is not None],
                      models=[(graph.model, shape)] + ([(small, shape)] if small is not None else []))
        carried = {}  # (module, "weight") -> [(dim, group, positions per channel)]
        for group in graph.groups:
            for p in graph.channel_params(group.name):
                if p.attr == "weight":
                    carried.setdefault(p.module, []).append((p.dim, group.name, p.index.shape[1]))
        # (layer table, groups, {dim: [(group, per channel)]}, full in, full out, depthwise, output elements)
        self._layers = []
        full_sum = 0.0
        for node, module, in_shape, out_shape in calls:
            if in_shape is None:
                raise ValueError(f"LatencyModel: the input shape of {node.target!r} was not traced")
            layer = table.layer(module, in_shape)
            depthwise = isinstance(module, CONV) and module.groups > 1 and module.groups == module.in_channels
            by_dim = {}
            for dim, group, per in carried.get(node.target, ()):
                by_dim.setdefault(dim, []).append((group, per))
            if isinstance(module, CONV) and module.groups > 1 and not depthwise:
                by_dim = {}  # grouped convolutions: a constant at full width
            groups = tuple(dict.fromkeys(g for entries in by_dim.values() for g, _ in entries))
            full_in = module.in_channels if isinstance(module, CONV) else module.in_features
            full_out = module.out_channels if isinstance(module, CONV) else module.out_features
            self._layers.append((layer, groups, by_dim, full_in, full_out, depthwise, math.prod(out_shape[1:])))
            full_sum += layer.ms(full_in, full_out)
        # Everything that is not a tabulated layer (activations, normalisation, pooling, additions, call overhead)
        # is `fixed + scaled * (share of the layers' output activations kept)`: the two found from the whole model
        # timed at full width and at a quarter of every group's width (a real cut of a copy).
        self.measured_ms = table.model_ms(graph.model, shape)
        total = float(sum(entry[6] for entry in self._layers)) or 1.0
        rest_full = self.measured_ms - full_sum
        if small is not None:
            rest_small = table.model_ms(small, shape) - sum(
                self._layer_ms(entry, quarter, share=False) for entry in self._layers)
            kept = self._activations(quarter) / total
            scaled = (rest_full - rest_small) / (1 - kept) if kept < 1 else 0.0
        else:
            scaled = 0.0
        self._scaled = min(max(0.0, scaled), max(0.0, rest_full))
        self._constant = max(0.0, rest_full - self._scaled)
        self._total_outputs = total

    def _activations(self, widths: dict) -> float:
        """The output activations of the tabulated layers at `widths` (per sample)."""
        out = 0.0
        for _, _, by_dim, _, full_out, _, elements in self._layers:
            out += elements * self._width(full_out, by_dim.get(0, ()), widths, self.sizes) / full_out
        return out

    @staticmethod
    def _width(full: int, entries, widths, sizes) -> int:
        return full - sum((sizes[g] - int(widths.get(g, sizes[g]))) * per for g, per in entries)

    def _layer_ms(self, layer_entry, widths: dict, share: bool = True) -> float:
        """A layer's table latency at `widths`, plus (`share`) its share of the scaled rest: the activations
        that follow it scale with its output width."""
        layer, _, by_dim, full_in, full_out, depthwise, elements = layer_entry
        c_out = self._width(full_out, by_dim.get(0, ()), widths, self.sizes)
        c_in = c_out if depthwise else self._width(full_in, by_dim.get(1, ()), widths, self.sizes)
        ms = layer.ms(max(1, c_in), max(1, c_out))
        if share:
            ms += self._scaled * elements * max(1, c_out) / full_out / self._total_outputs
        return ms

    def terms(self) -> tuple:
        """`(constant, [(groups, cost_of)...])` as `CostModel.terms`: one term per layer call."""
        out = []
        for entry in self._layers:
            def cost_of(widths, entry=entry):
                return self._layer_ms(entry, widths)
            out.append((entry[1], cost_of))
        return self._constant, out

    def cost(self, widths: dict) -> float:
        """The predicted latency (ms) with group `name` keeping `widths[name]` channels (others whole)."""
        unknown = set(widths) - set(self.sizes)
        if unknown:
            raise ValueError(f"LatencyModel.cost: widths name groups that are not prunable: {sorted(unknown)}")
        return self._constant + sum(self._layer_ms(entry, widths) for entry in self._layers)
