"""Structured pruning, in pipeline order (docs/design.md §2.3-2.5 and §3):

- `graph`      `ChannelGraph`: the model traced with torch.fx into groups of coupled channels; the
               group-parameter API (`channel_params`, `scale_channels`) says which tensors carry a group's
               channels, along which dimension;
- `trace`      `trace_utility`: the pre-decision response traced down the network by deconvolution;
- `criteria`   the criterion registry (`lda`, `fisher`, `l1`, `bn_scale`, `taylor`, `random`, and yours) and the
               `CriterionContext` a criterion reads its data from;
- `allocation` how many channels each group keeps (`allocate`: uniform, global, the cost-aware solver on a
               width grid; `search_widths`: the solver calibrated on data by `CandidateEvaluator`);
- `costs`      what widths would cost: the exact `CostModel` (parameters, FLOPs) and the measured
               `LatencyModel` (a per-layer latency table, `gpp_ext.latency`);
- `selection`  `select_channels` (per-layer threshold, ratio, or a global parameter/FLOP/latency budget through
               an allocation);
- `surgery`    the physical cut behind `ChannelGraph.prune`: checked first, sliced, undone on failure;
- `pipeline`   `prune`: all of it in one call, with BatchNorm recalibration and a `PruneReport`.
"""

from __future__ import annotations

from ..training import recalibrate_batchnorm
from . import criteria
from .criteria import CriterionContext
from .graph import ChannelGraph, ChannelParam, Group
from .pipeline import PruneReport, prune
from .allocation import CandidateEvaluator, allocate, keep_top, search_widths
from .costs import CostModel, LatencyModel, cost_model
from .selection import select_channels
from .trace import trace_utility

__all__ = ["ALGORITHM_VERSION", "ChannelGraph", "ChannelParam", "Group", "CriterionContext", "criteria", "prune",
           "PruneReport",
           "select_channels", "CostModel", "LatencyModel", "cost_model", "trace_utility", "recalibrate_batchnorm",
           "allocate", "keep_top",
           "search_widths", "CandidateEvaluator"]

# Bumped when a change makes the same settings prune differently (a criterion's, an allocation's or a push's
# formula), so results recorded with an earlier version can be told apart and redone (the benchmarks do):
# 2: Group Fisher's estimate squares each sample's mask gradient before summing over the samples.
ALGORITHM_VERSION = 2
