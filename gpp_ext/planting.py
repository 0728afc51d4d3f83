"""Channel planting: growing a trained network by new channels in its existing layers, trained while every
earlier weight stays as it was (docs/design.md §2.7; after Mitsuno, Nomura & Kurita, "Channel Planting for Deep
Neural Networks using Knowledge Distillation", 2020: channels added to the layers of an initial network whose
trained parameters stay fixed, trained by distillation from a larger network).

    model, planted = plant(model, example, {"features.4": 8})      # widened; computes what it did before
    with PlantedOnly(model, example, planted) as frozen:            # only the new channels' entries train
        fit(model, train, 1, after_step=frozen.after_step, teacher=big, distill=0.5)

`plant` widens groups through `ChannelGraph.widen` (new producer rows drawn at the scale of the existing ones,
norms the identity, the consumers' new input columns zero, so the function is kept exactly). `PlantedOnly`
keeps everything else fixed: tensors with no planted entry stop requiring gradients, and after every optimiser
step the other entries of the mixed tensors (and every buffer but the planted channels' norm statistics) are put
back, which also undoes weight decay on them.

`grow_by_planting` decides where to plant by validation gain per added parameter: each round plants a share of
the width of every plantable group at once, trains the planted channels, measures each group's own gain as the
validation accuracy lost when its planted channels are silenced (an exact removal), keeps the groups in order of
gain per parameter while the gain is positive (within `max_params`), cuts the rest of the planted channels away
exactly, trains the kept ones again without them, and keeps the round only if validation accuracy rose by more
than `threshold`. After every training, and before every measurement, the BatchNorm statistics are re-estimated
(`recalibrate`): the old channels' norms now also read the planted channels, so the statistics `PlantedOnly` kept
are stale (on a starved VGG on the digits, 3 seeds, re-estimating raised the grown nets' test accuracy by 2.0
to 3.6 points, partly by keeping other rounds and sites).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .cost import count_params
from .layers import BATCH_NORMS
from .pruning import ChannelGraph
from .pruning.surgery import validate_add

__all__ = ["plant", "PlantedOnly", "grow_by_planting", "PlantingStep", "plantable_groups"]


def plantable_groups(model: nn.Module, example: torch.Tensor, ignore=()) -> list:
    """The names of the groups `plant` can widen (prunable, not normalised across channels); `ignore` as
    `ChannelGraph`'s (submodules traced as opaque)."""
    graph = ChannelGraph(model, example, ignore=tuple(ignore))
    names = []
    for group in graph.groups:
        try:
            validate_add(graph, {group.name: 1})
        except ValueError:
            continue
        names.append(group.name)
    return names


def plant(model: nn.Module, example: torch.Tensor, add: dict, generator: torch.Generator | None = None,
          ignore=()):
    """Widens each group `name` of `model` by `add[name]` channels, in place; returns `(model, planted)` with
    `planted = {name: indices of the new channels}`. The widened model computes what `model` computed."""
    graph = ChannelGraph(model, example, ignore=tuple(ignore))
    sizes = {g.name: g.size for g in graph.groups}
    graph.widen(add, generator)
    return model, {name: torch.arange(sizes[name], sizes[name] + int(n)) for name, n in add.items()}


class PlantedOnly:
    """While active (a context manager), only the entries of the planted channels train.

    `planted`: `{group: channel indices}` of `model`'s groups (as `plant` returns; `ignore` as given to it). On
    entry, parameters holding no planted entry stop requiring gradients; `after_step` (pass it to `fit`) restores,
    after every optimiser step, the other entries of the parameters that hold planted ones, and every floating
    buffer outside the planted channels (BatchNorm running statistics of the old channels), on whatever device
    the model has moved to; on exit gradients are required again.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, planted: dict, ignore=()):
        graph = ChannelGraph(model, example, ignore=tuple(ignore))
        masks = {}
        for name, channels in planted.items():
            channels = torch.as_tensor(channels, dtype=torch.long)
            for p in graph.channel_params(name):
                *_, mask = masks.setdefault(id(p.tensor), (graph.modules[p.module], p.attr, p.tensor,
                                                           torch.zeros_like(p.tensor, dtype=torch.bool)))
                mask.index_fill_(p.dim, p.index[channels].reshape(-1).to(mask.device), True)
        # by owner and name: moving the model (`fit(device=...)`) replaces buffer tensors (parameters keep theirs)
        self.mixed = [[owner, attr, m, t.detach().clone()] for owner, attr, t, m in masks.values()]
        self.frozen = [p for p in model.parameters() if id(p) not in masks and p.requires_grad]
        self.buffers = [(owner, name, b.detach().clone()) for owner in model.modules()
                        for name, b in owner.named_buffers(recurse=False)
                        if b is not None and id(b) not in masks and b.is_floating_point()]

    def __enter__(self):
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p in self.frozen:
            p.requires_grad_(True)
        return False

    @torch.no_grad()
    def after_step(self, step: int = 0, total: int = 0) -> None:
        for entry in self.mixed:
            owner, attr, mask, saved = entry
            tensor = getattr(owner, attr)
            if mask.device != tensor.device:  # the model moved since (fit's device): follow it
                entry[2], entry[3] = mask.to(tensor.device), saved.to(tensor.device)
            tensor.copy_(torch.where(entry[2], tensor, entry[3]))
        for owner, name, saved in self.buffers:
            buffer = getattr(owner, name)
            buffer.copy_(saved.to(buffer.device))


@dataclass
class PlantingStep:
    """One planting round: the channels kept per group, the validation accuracy and size reached, whether the
    round was kept, and each group's measured gain (validation accuracy lost without its planted channels)."""

    round: int
    added: dict
    accuracy: float
    params: int
    kept: bool
    gains: dict

    def to_dict(self) -> dict:
        return asdict(self)


def grow_by_planting(model: nn.Module, example: torch.Tensor, train, evaluate, threshold: float = 0.005,
                     rounds: int = 2, share: float = 0.25, max_params: float = 2.0, seed: int = 0,
                     progress: bool = True, ignore=(), recalibrate=None):
    """Grows `model` by planting while validation accuracy improves; returns `(model, history)`.

    Args:
        model: a trained network (any the channel graph handles).
        example: an input batch for tracing.
        train: `train(model, after_step) -> model` trains `model` (in place) passing `after_step` to `fit`; it is
            called inside `PlantedOnly`, so only the planted channels change (distil from a teacher there).
        evaluate: `evaluate(model) -> float`, validation accuracy in [0, 1].
        threshold: the gain in accuracy a round must bring to be kept.
        rounds: planting rounds at most.
        share: each round plants this share of every plantable group's width (at least one channel).
        max_params: the grown model keeps at most this multiple of `model`'s parameters.
        seed: seeds the new channels' weights.
        ignore: names of submodules the channel graph traces as opaque (`ChannelGraph`'s `ignore`).
        recalibrate: `recalibrate(model)` re-estimates its BatchNorm statistics in place (e.g.
            `training.recalibrate_batchnorm` on training batches). The old channels' norms read the planted
            channels through their new input columns, so the statistics `PlantedOnly` keeps are stale once those
            train; every model is therefore measured, and the grown one returned, with re-estimated statistics
            (the starting model is measured on a re-estimated copy, so a round's gain is the planting's alone).
            Needed for models with BatchNorm (a warning says so when it is missing).
    """
    if not threshold >= 0 or rounds < 1 or not 0 < share <= 4 or not max_params > 1:
        raise ValueError(f"grow_by_planting: threshold must be >= 0, rounds >= 1, share in (0, 4] and max_params "
                         f"> 1, got {threshold}, {rounds}, {share}, {max_params}")
    if recalibrate is None:
        if any(isinstance(m, BATCH_NORMS) for m in model.modules()):
            warnings.warn("grow_by_planting: the model has BatchNorm but no recalibrate= was given, so planted "
                          "models are measured with the old channels' stale statistics", RuntimeWarning,
                          stacklevel=2)

        def recalibrate(m):
            return m
    ignore = tuple(ignore)
    limit = max_params * count_params(model)
    start = copy.deepcopy(model)
    recalibrate(start)
    best = float(evaluate(start))
    history = [PlantingStep(0, {}, best, count_params(model), True, {})]
    generator = torch.Generator().manual_seed(seed)
    for r in tqdm(range(1, rounds + 1), desc="planting", leave=False, disable=None if progress else True):
        groups = plantable_groups(model, example, ignore)
        if not groups:
            break
        sizes = {g.name: g.size for g in ChannelGraph(model, example, ignore=ignore).groups}
        trial, planted = plant(copy.deepcopy(model), example, {g: max(1, round(share * sizes[g])) for g in groups},
                               generator, ignore)
        with PlantedOnly(trial, example, planted, ignore) as frozen:
            trial = train(trial, frozen.after_step) or trial
        recalibrate(trial)
        everything = float(evaluate(trial))
        gains, cost = {}, {}
        for name, channels in planted.items():
            silenced = copy.deepcopy(trial)
            ChannelGraph(silenced, example, ignore=ignore).scale_channels(name, channels, 0.0)
            recalibrate(silenced)
            gains[name] = everything - float(evaluate(silenced))
            cost[name] = count_params(trial) - count_params(_without(trial, example, planted, (name,), ignore))
        order = sorted((n for n in gains if gains[n] > 0), key=lambda n: gains[n] / max(cost[n], 1), reverse=True)
        chosen, params = [], count_params(model)
        for name in order:
            if params + cost[name] <= limit:
                chosen.append(name)
                params += cost[name]
        grown = _without(trial, example, planted, [n for n in planted if n not in chosen], ignore)
        if chosen:  # the kept channels were trained beside the ones cut away: they train again, alone
            kept_planted = {n: planted[n] for n in chosen}
            with PlantedOnly(grown, example, kept_planted, ignore) as frozen:
                grown = train(grown, frozen.after_step) or grown
            recalibrate(grown)
        accuracy = float(evaluate(grown)) if chosen else best
        kept = bool(chosen) and accuracy > best + threshold
        history.append(PlantingStep(r, {n: int(planted[n].numel()) for n in chosen}, accuracy, count_params(grown),
                                    kept, {n: round(g, 6) for n, g in gains.items()}))
        if not kept:
            break
        model, best = grown, accuracy
    return model, history


def _without(model: nn.Module, example: torch.Tensor, planted: dict, names, ignore=()) -> nn.Module:
    """A copy of `model` with the planted channels of groups `names` cut away (exactly what it was before they
    were planted there)."""
    out = copy.deepcopy(model)
    graph = ChannelGraph(out, example, ignore=tuple(ignore))
    keep = {}
    for name in names:
        size = graph.group(name).size
        gone = set(planted[name].tolist())
        keep[name] = torch.tensor([c for c in range(size) if c not in gone])
    if keep:
        graph.prune(keep)
    return out
