"""Choosing the channels to keep from their utilities (docs/design.md §2.5), and what a choice would cost.

Three ways, one result (`{group name: kept indices}` ready for `ChannelGraph.prune`):
- `method="eta"`: per group, drop the channels whose utility is below `eta * std(non-zero utilities)`;
- `method="ratio"`: per group, drop the fraction `ratio` of channels with the lowest utility;
- `method="budget"`: one global threshold on utilities normalised per group (divided by the group's mean),
  found by bisection so the pruned model keeps at most `budget` of the original parameters (or FLOPs); or,
  with `allocation="uniform"`, the same fraction of every group, found the same way.
Guards for every method: at least `min_channels` per group, widths rounded up to a multiple of `round_to`
(hardware-friendly; a group narrower than that stays whole), and coupled channels are decided together because
a group is scored as one. A utility of exactly zero means "carries nothing": with `eta=0` such channels still
go (and only they do).

`costs.CostModel` gives the parameters or FLOPs of the model a keep-set would leave, from the number of
channels each group keeps, without cutting anything (`costs.LatencyModel` its latency, from a measured
per-layer table). The budget search bisects on it and checks a parameter or FLOP choice once by a real cut
(`search="cuts"` measures every candidate on a pruned copy instead, kept for the tests and benchmarks as the
cost model's oracle and as the fallback).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from ..cost import count_flops, count_params
from .costs import KINDS, CostModel, LatencyModel, cost_model
from .graph import ChannelGraph

__all__ = ["select_channels", "resolve_method", "CostModel", "LatencyModel"]


def _real_cost(graph: ChannelGraph, keep: dict, kind: str) -> int:
    """The cost of `keep`, measured on a pruned copy of the model."""
    if not keep:
        return count_params(graph.model) if kind == "params" else count_flops(graph.model, graph.example_inputs)
    trial = copy.deepcopy(graph.model)
    ChannelGraph(trial, graph.example_inputs, ignore=graph.ignore).prune(keep)
    return count_params(trial) if kind == "params" else count_flops(trial, graph.example_inputs)


def _kept(utility: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-utility channels, in their original order (stable for ties)."""
    order = torch.sort(utility, descending=True, stable=True).indices
    return order[:count].sort().values


def _guarded(utility: torch.Tensor, count: int, min_channels: int, round_to: int, floor: float = 0.0) -> int:
    size = utility.numel()
    count = max(count, min(min_channels, size), min(size, math.ceil(floor * size - 1e-9)))
    if round_to > 1:
        count = min(size, int(math.ceil(count / round_to)) * round_to)
    return max(1, count)


def resolve_method(method: str | None, eta, ratio, budget, where: str = "select_channels") -> tuple:
    """`(method, eta)`: the selection method named, or the one whose knob was given (`budget` -> "budget",
    `ratio` -> "ratio", else "eta" with `eta` 0.1 by default). A knob of another method than the one named, two
    knobs at once, or a knob that is not a finite number is a `ValueError`/`TypeError` naming it."""
    for name, value in (("eta", eta), ("ratio", ratio), ("budget", budget)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value}")
    given = [n for n, v in (("eta", eta), ("ratio", ratio), ("budget", budget)) if v is not None]
    if method is None:
        if len(given) > 1:
            raise ValueError(f"{where}: give one of eta, ratio and budget (or method=...), got {', '.join(given)}")
        method = given[0] if given else "eta"
    if method not in ("eta", "ratio", "budget"):
        raise ValueError(f"{where}: method must be 'eta', 'ratio' or 'budget', got {method!r}")
    values = {"eta": eta, "ratio": ratio, "budget": budget}
    others = [f"{n}={values[n]}" for n in given if n != method]
    if others:
        raise ValueError(f"{where}: method={method!r} does not use {', '.join(others)}; leave method out (it "
                         f"follows the knob given) or give the knob of method {method!r}")
    return method, (0.1 if eta is None else eta)


def select_channels(graph: ChannelGraph, utilities: dict, method: str | None = None, eta: float | None = None,
                    ratio: float | None = None, budget: float | None = None, budget_kind: str = "params",
                    min_channels: int = 1, round_to: int = 1, search: str = "cost_model",
                    normalize: str = "mean", allocation: str = "global", floor: float = 0.0,
                    evaluate=None, seed: int = 0, progress: bool = False, latency=None) -> dict:
    """Indices to keep per group. See the module docstring for the methods.

    Args:
        graph: the model's `ChannelGraph` (its prunable groups are the candidates).
        utilities: `{group name: [size] scores}`; groups missing from it are kept whole.
        method: "eta", "ratio" or "budget"; by default the method whose knob is given (`eta` when none is).
        eta, ratio, budget: the knob of the chosen method (budget is a fraction of the original cost; eta
            defaults to 0.1). A knob of another method than `method` is an error, never silently ignored.
        budget_kind: "params", "flops" or "latency" (with `latency`, a `gpp_ext.latency.LatencyTable`: the
            per-layer table measured in the runtime you deploy with; `costs.LatencyModel`).
        min_channels, round_to: width guards (see above).
        search: how the budget search measures a candidate: "cost_model" (the `CostModel`, checked once by a
            real cut) or "cuts" (a pruned copy per candidate: the slow reference the cost model replaced).
        normalize: how the budget search compares groups: "mean" (each group's utilities divided by their mean,
            so one threshold treats every layer alike) or "none" (raw utilities, for criteria that are already
            comparable across layers).
        allocation: how the budget is shared between groups: "global" (one threshold on the utilities: layers
            lose channels where their utilities are low), "uniform" (every group keeps the same fraction of
            its channels, its lowest-utility ones going: the widths do not depend on the utilities) or "solver"
            (the cost-aware widths of `allocation.allocate`, on the width grid: `round_to` when above 1, else
            multiples of 4, 8 or 16 by group size), "genetic" (`genetic.genetic_widths`, on `evaluate` too), or
            "search" (the solver's per-group coefficients searched
            by `evaluate`, an `allocation.CandidateEvaluator`, with `seed`: `allocation.search_widths`).
        floor: every group keeps at least this fraction of its channels (budget method).
    """
    method, eta = resolve_method(method, eta, ratio, budget)
    if min_channels < 1 or round_to < 1:
        raise ValueError(f"select_channels: min_channels and round_to must be >= 1, got {min_channels}, {round_to}")
    from .allocation import check_scores

    check_scores(graph, utilities, "select_channels", "utilities")
    utilities = {n: u.detach().double().cpu() for n, u in utilities.items()}

    if method == "eta":
        if eta < 0:
            raise ValueError(f"select_channels: eta must be >= 0, got {eta}")
        keep = {}
        for name, u in utilities.items():
            nonzero = u[u > 0]
            threshold = eta * float(nonzero.std()) if nonzero.numel() > 1 else 0.0
            count = int((u > threshold).sum()) if threshold > 0 else int((u > 0).sum())
            keep[name] = _kept(u, _guarded(u, count, min_channels, round_to))
        return keep
    if method == "ratio":
        if ratio is None or not 0 <= ratio < 1:
            raise ValueError(f"select_channels: ratio must be in [0, 1) (the fraction to drop), got {ratio}")
        return {n: _kept(u, _guarded(u, round(u.numel() * (1 - ratio)), min_channels, round_to))
                for n, u in utilities.items()}

    if budget is None or not 0 < budget <= 1:
        raise ValueError(f"select_channels: budget must be in (0, 1] (the fraction of the cost to keep), got {budget}")
    if budget_kind not in KINDS:
        raise ValueError(f"select_channels: budget_kind must be one of {KINDS}, got {budget_kind!r}")
    if budget_kind == "latency" and latency is None:
        raise ValueError("select_channels: budget_kind='latency' needs latency=<gpp_ext.latency.LatencyTable> (the "
                         "per-layer table measured in the runtime you deploy with)")
    if search not in ("cost_model", "cuts") or (search == "cuts" and budget_kind == "latency"):
        raise ValueError(f"select_channels: search must be 'cost_model' or 'cuts' (not for a latency budget), got "
                         f"{search!r}")
    if normalize not in ("mean", "none"):
        raise ValueError(f"select_channels: normalize must be 'mean' or 'none', got {normalize!r}")
    from .allocation import ALLOCATIONS, ON_DATA

    if allocation not in ALLOCATIONS:
        raise ValueError(f"select_channels: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation in ON_DATA and evaluate is None:
        raise ValueError(f"select_channels: allocation={allocation!r} needs evaluate=<allocation.CandidateEvaluator> "
                         f"(prune and the loop build one from their data)")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise ValueError(f"select_channels: floor must be in [0, 1) (a share of each group's channels), got "
                         f"{floor!r}")
    if allocation in ("solver",) + ON_DATA:
        from .allocation import allocate, fisher_widths, keep_top, search_widths

        model = cost_model(graph, budget_kind, latency)
        grid = dict(normalize=normalize, floor=floor, min_channels=min_channels,
                    round_to=round_to if round_to > 1 else None)
        if allocation == "fisher":
            widths, _ = fisher_widths(graph, utilities, budget, evaluate, budget_kind, cost_model=model, **grid)
        elif allocation == "search":
            widths, _ = search_widths(graph, utilities, budget, evaluate, budget_kind, seed=seed, progress=progress,
                                      cost_model=model, **grid)
        elif allocation == "genetic":
            from .genetic import genetic_widths

            widths, _ = genetic_widths(graph, utilities, budget, evaluate, budget_kind, seed=seed, progress=progress,
                                       cost_model=model, **grid)
        else:
            widths = allocate(graph, utilities, budget, budget_kind, "solver", cost_model=model, **grid)
        keep = keep_top(utilities, widths)
        if budget_kind == "latency":  # a measured model: nothing exact to check it against
            return keep
        predicted, real = model.cost(widths), _real_cost(graph, keep, budget_kind)
        if predicted != real:  # a layer the cost model does not know: the solver's widths cannot be trusted
            warnings.warn(f"select_channels: the cost model predicted {predicted:,} {budget_kind} but the cut gives "
                          f"{real:,}; allocating by a global threshold measured on real cuts instead (slower)",
                          RuntimeWarning, stacklevel=2)
            return select_channels(graph, utilities, method="budget", budget=budget, budget_kind=budget_kind,
                                   min_channels=min_channels, round_to=round_to, search="cuts", normalize=normalize,
                                   allocation="global", floor=floor)
        return keep

    # Each group's utilities relative to their mean: a channel worth less than t times its layer's average
    # goes, whatever the scale of the layer's signal (max-normalising instead would let one dominant channel
    # empty the rest of its layer).
    normalised = {n: u / u.mean().clamp_min(1e-300) if normalize == "mean" else u for n, u in utilities.items()}

    if allocation == "global":  # t: the threshold on (normalised) utilities
        def widths_at(t):
            return {n: _guarded(u, int((u >= t).sum()), min_channels, round_to, floor)
                    for n, u in normalised.items()}

        lo = 0.0  # keeps every channel with a non-negative utility
        hi = max(float(u.max()) for u in normalised.values()) + 1e-9  # keeps only what the guards force
    else:  # t: the fraction of every group's channels that goes
        def widths_at(t):
            return {n: _guarded(u, int(round(u.numel() * (1 - t))), min_channels, round_to, floor)
                    for n, u in normalised.items()}

        lo, hi = 0.0, 1.0

    def keep_at(t):
        return {n: _kept(normalised[n], count) for n, count in widths_at(t).items()}

    if search == "cuts":
        full = _real_cost(graph, {}, budget_kind)
        chosen, met = _bisect(lambda t: _real_cost(graph, keep_at(t), budget_kind), budget * full, lo, hi)
    else:
        model = cost_model(graph, budget_kind, latency)
        chosen, met = _bisect(lambda t: model.cost(widths_at(t)), budget * model.cost({}), lo, hi)
    if not met:
        warnings.warn(f"select_channels: a {budget_kind} budget of {budget:.1%} cannot be met with min_channels="
                      f"{min_channels} and round_to={round_to}; returning the smallest model they allow",
                      RuntimeWarning, stacklevel=2)
    keep = keep_at(chosen)
    if search == "cost_model" and budget_kind != "latency":
        predicted, real = model.cost(widths_at(chosen)), _real_cost(graph, keep, budget_kind)
        if predicted != real:  # a layer the cost model does not know: measure every candidate instead
            warnings.warn(f"select_channels: the cost model predicted {predicted:,} {budget_kind} but the cut gives "
                          f"{real:,}; searching with real cuts instead (slower)", RuntimeWarning, stacklevel=2)
            return select_channels(graph, utilities, method="budget", budget=budget, budget_kind=budget_kind,
                                   min_channels=min_channels, round_to=round_to, search="cuts", normalize=normalize,
                                   allocation=allocation, floor=floor)
    return keep


def _bisect(cost_at, target: float, lo: float, hi: float):
    """`(threshold, met)`: the lowest threshold found whose cost is within `target` (cost falls as the
    threshold rises), by 30 halvings; `met` is False when even `hi` is over."""
    if cost_at(lo) <= target:
        return lo, True
    if cost_at(hi) > target:
        return hi, False
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if cost_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, True
