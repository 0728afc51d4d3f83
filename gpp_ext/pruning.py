"""`gpp_ext.prune`: analysis -> trace -> select -> prune in one call, with a report a person can read.

    compact, report = gpp_ext.prune(model, loader, example_inputs, num_classes=10, eta=0.3)
    print(report)

The discriminant criteria ("lda", "fisher") follow DESIGN.md 2.3-2.5: `DiscriminantAnalyzer` streams the
loader through the model and scores the pre-decision neurons; the top `neurons` of them are kept and their
response is traced down the network (`importance.trace_utility`) to score every channel group; a selection
rule turns scores into kept channels; `ChannelGraph.prune` removes the rest; BatchNorm statistics are
recalibrated on training data (the single most effective step after a cut, DESIGN.md 2.8). The baselines
("l1", "bn_scale", "taylor", "random") replace the first two steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed as gdist
from . import importance
from .analysis import DiscriminantAnalyzer, find_classifier
from .cost import count_flops, count_params
from .graph import ChannelGraph
from .selection import select_channels

__all__ = ["prune", "PruneReport", "recalibrate_batchnorm"]

CRITERIA = ("lda", "fisher", "l1", "bn_scale", "taylor", "random")


@dataclass
class PruneReport:
    """What a prune did: per-group widths before and after, parameters and FLOPs before and after."""

    criterion: str
    widths: dict = field(default_factory=dict)  # group name -> (before, after)
    params: tuple = (0, 0)
    flops: tuple = (0, 0)
    neurons: int | None = None  # pre-decision neurons kept (discriminant criteria)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "widths": {k: list(v) for k, v in self.widths.items()},
                "params": list(self.params), "flops": list(self.flops), "neurons": self.neurons}

    def __str__(self) -> str:
        rows = [f"{'group':<32} {'before':>7} {'after':>7}"]
        rows += [f"{name:<32} {b:>7} {a:>7}" for name, (b, a) in self.widths.items()]
        p0, p1 = self.params
        f0, f1 = self.flops
        rows.append(f"params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.1%}); FLOPs {f0:,} -> {f1:,} ({f1 / max(f0, 1):.1%})"
                    f"; criterion {self.criterion}")
        return "\n".join(rows)


def _batches(loader, device, limit=None):
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("prune: loader must yield (inputs, labels) pairs")
        yield batch[0].to(device), batch[1].to(device)


def _tracing_images(loader, device, num_classes, per_class):
    """`per_class` images of every class present in the first batches of the loader."""
    picked = {}
    for x, y in _batches(loader, device):
        for c in range(num_classes):
            have = picked.setdefault(c, [])
            if len(have) < per_class:
                have.extend(x[y == c][: per_class - len(have)])
        if all(len(v) >= per_class for v in picked.values()) and len(picked) == num_classes:
            break
    images = [img for imgs in picked.values() for img in imgs]
    if not images:
        raise ValueError("prune: the loader yielded no images to trace")
    return torch.stack(images)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, num_batches: int = 50, device=None,
                          progress: bool = False) -> nn.Module:
    """Re-estimates every BatchNorm's running statistics on training data (after a structural change).

    Resets the running mean/variance, runs `num_batches` batches forward in train mode without gradients with
    a cumulative average (momentum None), then restores the model's modes. Under `torch.distributed` (a process
    group of more than one process) every process recalibrates on its own batches and the estimates are then
    averaged, so the model stays identical on every process.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    device = device or next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x, _ in tqdm(_batches(loader, device, num_batches), total=num_batches, desc="recalibrating BN",
                         disable=None if progress else True, leave=False):
            model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if gdist.is_distributed():
        world = gdist.world_size()
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                if buffer is not None:
                    buffer.copy_(gdist.all_reduce_sum(buffer) / world)
    return model


def prune(model: nn.Module, loader, example_inputs, num_classes: int | None = None, criterion: str = "lda",
          neurons=0.5, method: str = "eta", eta: float = 0.1, ratio: float | None = None,
          budget: float | None = None, budget_kind: str = "params", min_channels: int = 1, round_to: int = 1,
          tracing_per_class: int = 4, max_batches: int | None = None, recalibrate: bool = True,
          ignore=(), inplace: bool = False, progress: bool = True, seed: int = 0):
    """Prunes `model` for the task in `loader` and returns `(compact_model, PruneReport)`.

    Args:
        model: a trained classifier ending in a linear layer (any torch.fx-traceable `nn.Module`).
        loader: yields `(inputs, labels)` batches of the task's training data.
        example_inputs: a batch (or tuple) the model accepts, for tracing shapes and counting FLOPs.
        num_classes: number of classes (default: the classifier's `out_features`).
        criterion: "lda" or "fisher" (discriminant utility traced by deconvolution), or a baseline: "l1",
            "bn_scale", "taylor", "random".
        neurons: pre-decision neurons kept for tracing: a count (int) or a fraction (float in (0, 1]).
        method, eta, ratio, budget, budget_kind, min_channels, round_to: see `selection.select_channels`.
        tracing_per_class: tracing images per class.
        max_batches: limit the analysis pass (default: the whole loader).
        recalibrate: re-estimate BatchNorm statistics on `loader` after pruning.
        ignore: module names the graph should treat as opaque (see `ChannelGraph`).
        inplace: prune `model` itself instead of a copy.
        progress: progress bars on the long passes.
        seed: seed of the "random" criterion.

    Under `torch.distributed` (e.g. `torchrun`), call it on every process with the same model: the analysis
    splits `loader` over the processes and combines their statistics exactly, rank 0's selection is applied
    everywhere, and BatchNorm recalibration is averaged, so every process ends with the same compact model.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"prune: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    device = next(model.parameters()).device
    graph = ChannelGraph(model, example_inputs, ignore=ignore)
    # One classifier for every step: model.classifier, else the last linear layer.
    classifier = find_classifier(model)
    num_classes = num_classes or dict(model.named_modules())[classifier].out_features
    params0, flops0 = count_params(model), count_flops(model, example_inputs)
    before = {g.name: g.size for g in graph.groups}
    kept_neurons = None

    if criterion in ("lda", "fisher"):
        with DiscriminantAnalyzer(model, num_classes, layers=[classifier + ":input"]) as analyzer:
            analyzer.run(loader, max_batches=max_batches, progress=progress, device=device)
            utility = analyzer.utility(kind=criterion)
        width = utility.numel()
        count = neurons if isinstance(neurons, int) else int(round(float(neurons) * width))
        if not 1 <= count <= width:
            raise ValueError(f"prune: neurons must keep between 1 and {width} pre-decision neurons, got {neurons}")
        kept_neurons = count
        selected = torch.sort(utility, descending=True, stable=True).indices[:count]
        weights = torch.zeros(width, dtype=torch.float64)
        weights[selected] = 1.0
        images = _tracing_images(loader, device, num_classes, tracing_per_class)
        scores = importance.trace_utility(graph, images, weights.float().to(device), classifier=classifier)
    elif criterion == "l1":
        scores = importance.l1_importance(graph)
    elif criterion == "bn_scale":
        scores = importance.bn_scale_importance(graph)
    elif criterion == "taylor":
        x, y = next(iter(_batches(loader, device)))
        scores = importance.taylor_importance(graph, x, y)
    else:
        scores = importance.random_importance(graph, torch.Generator().manual_seed(seed))

    keep = select_channels(graph, scores, method=method, eta=eta, ratio=ratio, budget=budget,
                           budget_kind=budget_kind, min_channels=min_channels, round_to=round_to)
    # Under torch.distributed the statistics are already identical everywhere, but tracing images, Taylor's
    # batch and random scores are each process's own: rank 0 decides, and every process cuts the same channels.
    keep = gdist.broadcast_object(keep)
    graph.prune(keep)
    if recalibrate:
        recalibrate_batchnorm(model, loader, device=device, progress=progress)
    after = {g.name: g.size for g in graph.groups}
    report = PruneReport(criterion, {n: (before[n], after.get(n, before[n])) for n in before},
                         (params0, count_params(model)), (flops0, count_flops(model, example_inputs)), kept_neurons)
    return model, report
