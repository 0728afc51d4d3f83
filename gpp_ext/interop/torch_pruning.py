"""gpp_ext's criteria inside Torch-Pruning: an importance its pruners accept.

    import torch_pruning as tp
    from gpp_ext.interop.torch_pruning import DiscriminantImportance

    importance = DiscriminantImportance(model, loader, example_inputs)       # instead of tp.importance.*
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=importance, pruning_ratio=0.5,
                                  ignored_layers=[model.classifier])
    pruner.step()

Torch-Pruning asks the importance of one dependency group at a time (`importance(group) -> [channels]`). This
class scores every channel group of the model once with a registered gpp_ext criterion (default "lda": the
discriminant analysis of the pre-decision layer, traced down by deconvolution, docs/design.md §2.3-2.4), on
gpp_ext's own `ChannelGraph`, and answers each Torch-Pruning group from those scores: an output channel of a
convolution or linear layer gets the utility of the gpp_ext channel it is, averaged over the group's coupled
layers. The scores are computed again whenever the model's layer widths have changed since (Torch-Pruning's
iterative steps prune between calls). A group none of whose layers gpp_ext scores (the classifier's outputs,
layers gpp_ext freezes) gets `None`, which Torch-Pruning's pruners skip.

Torch-Pruning is an optional dependency (`pip install torch-pruning`); importing this module without it raises
an `ImportError` that says so.
"""

from __future__ import annotations

import torch
import torch.nn as nn

try:
    import torch_pruning as tp
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("gpp_ext.interop.torch_pruning needs Torch-Pruning: pip install torch-pruning") from error

from ..pruning import ChannelGraph, criteria
from ..pruning.criteria import CriterionContext

__all__ = ["DiscriminantImportance"]

_OUT = (tp.pruner.function.prune_conv_out_channels, tp.pruner.function.prune_linear_out_channels)


class DiscriminantImportance(tp.importance.Importance):
    """A Torch-Pruning importance scoring channels with a gpp_ext criterion.

    Args:
        model: the model Torch-Pruning prunes (the same object).
        loader: yields `(inputs, labels)` batches of the task's training data (re-iterable, e.g. a DataLoader).
        example_inputs: a batch the model accepts (as given to Torch-Pruning).
        criterion: a registered gpp_ext criterion name (`gpp_ext.pruning.criteria.names()`) or a callable
            `(graph, context) -> {group: scores}`; default "lda".
        num_classes: default: the classifier's outputs.
        neurons: pre-decision neurons traced (count or fraction), as in `gpp_ext.prune`.
        normalizer: None (the traced utilities as they are: comparable across layers, for Torch-Pruning's global
            pruning) or "mean" (each group's scores divided by their mean, like Torch-Pruning's default).
        max_batches, tracing_per_class, ignore, seed: as in `gpp_ext.prune`.
    """

    def __init__(self, model: nn.Module, loader, example_inputs, criterion="lda", num_classes: int | None = None,
                 neurons=0.5, normalizer: str | None = None, max_batches: int | None = None,
                 tracing_per_class: int = 4, ignore=(), seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"DiscriminantImportance: model must be an nn.Module, got {type(model).__name__}")
        if normalizer not in (None, "mean"):
            raise ValueError(f"DiscriminantImportance: normalizer must be None or 'mean', got {normalizer!r}")
        if loader is None or iter(loader) is loader:
            raise TypeError("DiscriminantImportance: loader must be re-iterable (a DataLoader or a list of (inputs, "
                            "labels) batches): it is read again after every pruning step")
        criteria.check_neurons(neurons, "DiscriminantImportance")
        self.name, self.score = criteria.resolve(criterion)
        self.model, self.loader, self.normalizer = model, loader, normalizer
        self.example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.options = dict(num_classes=num_classes, neurons=neurons, max_batches=max_batches,
                            tracing_per_class=tracing_per_class, seed=seed)
        self.ignore = tuple(ignore)
        self._widths = None
        self._by_position = {}  # (module, output position) -> score

    def _signature(self) -> tuple:
        return tuple((n, tuple(m.weight.shape)) for n, m in self.model.named_modules()
                     if isinstance(getattr(m, "weight", None), torch.Tensor))

    def refresh(self) -> None:
        """Scores every channel of the model now (done by itself when the model's widths change)."""
        graph = ChannelGraph(self.model, self.example_inputs, ignore=self.ignore)
        device = next(self.model.parameters()).device
        context = CriterionContext(loader=self.loader, device=device, progress=False, **self.options)
        was_training = self.model.training
        try:
            scores = self.score(graph, context)
        finally:
            self.model.train(was_training)
        by_position = {}
        for group in graph.groups:
            s = scores.get(group.name)
            if s is None:
                continue
            s = s.detach().double().cpu()
            if self.normalizer == "mean":
                s = s / s.mean().clamp_min(1e-300)
            for p in graph.channel_params(group.name):
                if p.role == "producer" and p.attr == "weight" and p.dim == 0:
                    for channel, positions in enumerate(p.index.tolist()):
                        for position in positions:
                            by_position[(p.module, position)] = float(s[channel])
        self._by_position = by_position
        self._widths = self._signature()

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if self._widths != self._signature():
            self.refresh()
        names = {id(m): n for n, m in self.model.named_modules()}
        size = len(group[0].idxs)
        total = torch.zeros(size, dtype=torch.float64)
        count = torch.zeros(size, dtype=torch.float64)
        for k, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _OUT:
                continue
            name = names.get(id(dep.layer))
            root = group[k].root_idxs  # where each of this layer's channels sits in the group's root layer
            for i, position in zip(root, idxs):
                value = self._by_position.get((name, int(position)))
                if value is not None and i < size:
                    total[i] += value
                    count[i] += 1
        if not bool((count > 0).any()):
            return None  # nothing gpp_ext scores here (e.g. the classifier's outputs): the pruner skips it
        return (total / count.clamp_min(1)).float()
