"""Choosing the channels to keep from their utilities (DESIGN.md 2.5).

Three ways, one result (`{group name: kept indices}` ready for `ChannelGraph.prune`):
- `method="eta"`: per group, drop the channels whose utility is below `eta * std(non-zero utilities)`;
- `method="ratio"`: per group, drop the fraction `ratio` of channels with the lowest utility;
- `method="budget"`: one global threshold on utilities normalised per group (divided by the group's mean),
  found by bisection so the pruned model keeps at most `budget` of the original parameters (or FLOPs).
Guards for every method: at least `min_channels` per group, widths rounded up to a multiple of `round_to`
(hardware-friendly; a group narrower than that stays whole), and coupled channels are decided together because
a group is scored as one. A utility of exactly zero means "carries nothing": with `eta=0` such channels still
go (and only they do).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from .cost import count_flops, count_params
from .graph import ChannelGraph

__all__ = ["select_channels"]


def _kept(utility: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-utility channels, in their original order (stable for ties)."""
    order = torch.sort(utility, descending=True, stable=True).indices
    return order[:count].sort().values


def _guarded(utility: torch.Tensor, count: int, min_channels: int, round_to: int) -> int:
    size = utility.numel()
    count = max(count, min(min_channels, size))
    if round_to > 1:
        count = min(size, int(math.ceil(count / round_to)) * round_to)
    return max(1, count)


def select_channels(graph: ChannelGraph, utilities: dict, method: str = "eta", eta: float = 0.1,
                    ratio: float | None = None, budget: float | None = None, budget_kind: str = "params",
                    min_channels: int = 1, round_to: int = 1) -> dict:
    """Indices to keep per group. See the module docstring for the methods.

    Args:
        graph: the model's `ChannelGraph` (its prunable groups are the candidates).
        utilities: `{group name: [size] scores}`; groups missing from it are kept whole.
        eta, ratio, budget: the knob of the chosen method (budget is a fraction of the original cost).
        budget_kind: "params" or "flops".
        min_channels, round_to: width guards (see above).
    """
    if method not in ("eta", "ratio", "budget"):
        raise ValueError(f"select_channels: method must be 'eta', 'ratio' or 'budget', got {method!r}")
    if min_channels < 1 or round_to < 1:
        raise ValueError(f"select_channels: min_channels and round_to must be >= 1, got {min_channels}, {round_to}")
    groups = {g.name: g for g in graph.groups}
    unknown = set(utilities) - set(groups)
    if unknown:
        raise ValueError(f"select_channels: utilities name groups that are not prunable: {sorted(unknown)}")
    for name, u in utilities.items():
        if not isinstance(u, torch.Tensor) or u.shape != (groups[name].size,):
            raise ValueError(f"select_channels: utilities[{name!r}] must be a tensor of shape "
                             f"[{groups[name].size}], got {getattr(u, 'shape', type(u).__name__)}")
        if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
            raise ValueError(f"select_channels: utilities[{name!r}] must be finite and >= 0")
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
    if budget_kind not in ("params", "flops"):
        raise ValueError(f"select_channels: budget_kind must be 'params' or 'flops', got {budget_kind!r}")

    def cost(model):
        return count_params(model) if budget_kind == "params" else count_flops(model, graph.example_inputs)

    # Each group's utilities relative to their mean: a channel worth less than t times its layer's average
    # goes, whatever the scale of the layer's signal (max-normalising instead would let one dominant channel
    # empty the rest of its layer).
    normalised = {n: u / u.mean().clamp_min(1e-300) for n, u in utilities.items()}

    def keep_at(t):
        return {n: _kept(u, _guarded(u, int((u >= t).sum()), min_channels, round_to))
                for n, u in normalised.items()}

    def cost_at(t):
        trial = copy.deepcopy(graph.model)
        ChannelGraph(trial, graph.example_inputs, ignore=graph.ignore).prune(keep_at(t))
        return cost(trial)

    target = budget * cost(graph.model)
    lo = 0.0  # keeps every channel with a non-negative utility
    hi = max(float(u.max()) for u in normalised.values()) + 1e-9  # keeps only what the guards force
    if cost_at(lo) <= target:
        return keep_at(lo)
    if cost_at(hi) > target:
        warnings.warn(f"select_channels: a {budget_kind} budget of {budget:.1%} cannot be met with min_channels="
                      f"{min_channels} and round_to={round_to}; returning the smallest model they allow",
                      RuntimeWarning, stacklevel=2)
        return keep_at(hi)
    for _ in range(30):  # bisection on the threshold: cost falls as the threshold rises
        mid = 0.5 * (lo + hi)
        if cost_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return keep_at(hi)
