"""`gpp_ext.prune`: score -> select -> cut -> recalibrate in one call, with a report a person can read.

    compact, report = gpp_ext.prune(model, loader, example_inputs, num_classes=10, eta=0.3)
    print(report)

The pipeline of docs/design.md §2.3-2.5: the model is traced into a `ChannelGraph`; a criterion from the
registry (`gpp_ext.pruning.criteria`; by default "lda": the discriminant analysis of the pre-decision layer,
the top `neurons` kept and their response traced down by deconvolution) scores every channel group; a
selection rule (`select_channels`) turns scores into kept channels; `ChannelGraph.prune` removes the rest;
BatchNorm statistics are recalibrated on training data (the single most effective step after a cut,
docs/design.md §2.8).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import distributed as gdist
from ..classifier import find_classifier
from ..cost import count_flops, count_params
from ..training import recalibrate_batchnorm
from . import criteria
from .allocation import ON_DATA, evaluator_from, held_out_batches
from .graph import ChannelGraph
from .selection import resolve_method, select_channels

__all__ = ["prune", "PruneReport"]


@dataclass
class PruneReport:
    """What a prune did: per-group widths before and after, parameters and FLOPs before and after."""

    criterion: str
    widths: dict = field(default_factory=dict)  # group name -> (before, after)
    params: tuple = (0, 0)
    flops: tuple = (0, 0)
    neurons: int | None = None  # pre-decision neurons kept (discriminant criteria)
    seconds: dict = field(default_factory=dict)  # wall time per phase: graph, analysis, solve, trace, scores,
    #                                              selection, cut, recalibration, counting

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "widths": {k: list(v) for k, v in self.widths.items()},
                "params": list(self.params), "flops": list(self.flops), "neurons": self.neurons,
                "seconds": dict(self.seconds)}

    def __str__(self) -> str:
        rows = [f"{'group':<32} {'before':>7} {'after':>7}"]
        rows += [f"{name:<32} {b:>7} {a:>7}" for name, (b, a) in self.widths.items()]
        p0, p1 = self.params
        f0, f1 = self.flops
        rows.append(f"params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.1%}); FLOPs {f0:,} -> {f1:,} ({f1 / max(f0, 1):.1%})"
                    f"; criterion {self.criterion}")
        if self.seconds:
            rows.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(rows)


def prune(model: nn.Module, loader, example_inputs, num_classes: int | None = None, criterion="lda",
          neurons=0.5, method: str | None = None, eta: float | None = None, ratio: float | None = None,
          budget: float | None = None, budget_kind: str = "params", min_channels: int = 1, round_to: int = 1,
          tracing_per_class: int = 4, max_batches: int | None = None, recalibrate: bool = True,
          ignore=(), inplace: bool = False, progress: bool = True, seed: int = 0, keep: dict | None = None,
          allocation: str = "global", normalize: str = "mean", floor: float = 0.0, latency=None):
    """Prunes `model` for the task in `loader` and returns `(compact_model, PruneReport)`.

    Args:
        model: a trained classifier ending in a linear layer (any torch.fx-traceable `nn.Module`).
        loader: yields `(inputs, labels)` batches of the task's training data.
        example_inputs: a batch (or tuple) the model accepts, for tracing shapes and counting FLOPs.
        num_classes: number of classes (default: the classifier's `out_features`).
        criterion: a registered criterion's name (`gpp_ext.pruning.criteria.names()`: "lda" and "fisher",
            the discriminant utility traced by deconvolution, and the baselines "l1", "bn_scale", "taylor",
            "random"), or any callable `(graph, context) -> {group name: [size] scores}`.
        neurons: pre-decision neurons kept for tracing: a count (int) or a fraction (float in (0, 1]).
        method, eta, ratio, budget, budget_kind, min_channels, round_to, allocation, normalize, floor: see
            `select_channels` (the method follows the knob given: `budget=0.3` prunes to 30% of the
            parameters; `eta=0.1` when none is given). `allocation="search"` scores its candidates on the
            first batches of `loader` (`allocation.evaluator_from`). `budget_kind="latency"` needs `latency`, a
            `gpp_ext.latency.LatencyTable` (the per-layer table of the runtime you deploy with).
        tracing_per_class: tracing images per class.
        max_batches: limit the analysis pass (default: the whole loader).
        recalibrate: re-estimate BatchNorm statistics on `loader` after pruning.
        ignore: module names the graph should treat as opaque (see `ChannelGraph`).
        inplace: prune `model` itself instead of a copy.
        progress: progress bars on the long passes.
        seed: seed of randomised criteria ("random").
        keep: cut exactly these channels (`{group: kept indices}`, e.g. `RemovalFade.finish()`), skipping the
            criterion and the selection; the report's criterion is then "keep".

    Under `torch.distributed` (e.g. `torchrun`), call it on every process with the same model: the analysis
    splits `loader` over the processes and combines their statistics exactly, rank 0's selection is applied
    everywhere, and BatchNorm recalibration is averaged, so every process ends with the same compact model.
    """
    # Every argument is checked before the model is copied, traced or shown any data.
    name, score = ("keep", None) if keep is not None else criteria.resolve(criterion)
    if keep is not None and not isinstance(keep, dict):
        raise TypeError(f"prune: keep must be a dict of group name -> kept indices, got {type(keep).__name__}")
    if keep is None:
        method, eta = resolve_method(method, eta, ratio, budget, where="prune")
    criteria.check_neurons(neurons, "prune")
    if budget_kind == "latency" and latency is None and keep is None:
        raise ValueError("prune: budget_kind='latency' needs latency=<gpp_ext.latency.LatencyTable> (the per-layer "
                         "table measured in the runtime you deploy with)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"prune: max_batches must be a positive int or None, got {max_batches!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"prune: num_classes must be an int >= 2 (or None: the classifier's outputs), got "
                         f"{num_classes!r}")
    if loader is None and (keep is None or recalibrate):
        raise ValueError("prune: loader must yield (inputs, labels) batches of the task's training data, got None")
    if loader is not None and iter(loader) is loader:
        raise TypeError(f"prune: loader is a one-pass iterator ({type(loader).__name__}), but prune reads the data "
                        f"more than once (analysis, tracing, BatchNorm recalibration); pass a DataLoader, a list "
                        f"of (inputs, labels) batches or another re-iterable")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    device = next(model.parameters()).device
    seconds = {}
    start = time.perf_counter()
    graph = ChannelGraph(model, example_inputs, ignore=ignore)
    seconds["graph"] = time.perf_counter() - start
    classifier = find_classifier(model)  # one classifier for every step (gpp_ext.classifier)
    head = dict(model.named_modules())[classifier].out_features
    if num_classes is not None and num_classes != head:
        raise ValueError(f"prune: num_classes={num_classes} but the classifier {classifier!r} has {head} outputs; "
                         f"pass the classifier's class count (or leave num_classes out)")
    num_classes = head
    start = time.perf_counter()
    params0, flops0 = count_params(model), count_flops(model, example_inputs)
    counting = time.perf_counter() - start
    before = {g.name: g.size for g in graph.groups}

    context = criteria.CriterionContext(loader=loader, device=device, classifier=classifier,
                                        num_classes=num_classes, seed=seed, neurons=neurons,
                                        tracing_per_class=tracing_per_class, max_batches=max_batches,
                                        progress=progress,
                                        cost_kind=budget_kind if budget_kind in ("params", "flops") else "flops")
    if keep is None:
        start = time.perf_counter()
        scores = score(graph, context)
        seconds.update(context.seconds)  # the criterion's own phases (analysis, solve, trace)
        seconds["scores"] = time.perf_counter() - start - sum(context.seconds.values())  # the rest of it
        if not isinstance(scores, dict):
            raise TypeError(f"prune: criterion {name!r} must return a dict of group name -> [size] scores, got "
                            f"{type(scores).__name__}")
        evaluate = None
        if allocation in ON_DATA and method == "budget":
            evaluate = evaluator_from(model, example_inputs, scores, loader, ignore=ignore, device=device,
                                      max_batches=max_batches, held_out=held_out_batches(allocation))
        start = time.perf_counter()
        keep = select_channels(graph, scores, method=method, eta=eta if method == "eta" else None, ratio=ratio,
                               budget=budget, budget_kind=budget_kind, min_channels=min_channels,
                               round_to=round_to, allocation=allocation, normalize=normalize, floor=floor,
                               evaluate=evaluate, seed=seed, progress=progress, latency=latency)
        seconds["selection"] = time.perf_counter() - start
    # Under torch.distributed the statistics are already identical everywhere, but tracing images, Taylor's
    # batch and random scores are each process's own: rank 0 decides, and every process cuts the same channels.
    keep = gdist.broadcast_object(keep)
    start = time.perf_counter()
    graph.prune(keep)
    seconds["cut"] = time.perf_counter() - start
    if recalibrate:
        start = time.perf_counter()
        recalibrate_batchnorm(model, loader, device=device, progress=progress)
        seconds["recalibration"] = time.perf_counter() - start
    after = {g.name: g.size for g in graph.groups}
    start = time.perf_counter()
    sizes = (params0, count_params(model)), (flops0, count_flops(model, example_inputs))
    seconds["counting"] = counting + time.perf_counter() - start
    report = PruneReport(name, {n: (before[n], after.get(n, before[n])) for n in before}, *sizes,
                         context.notes.get("neurons"), seconds)
    return model, report
