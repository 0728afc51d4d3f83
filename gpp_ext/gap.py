"""Scheduled grow-and-prune at channel level (docs/design.md §2.7; after Ma et al., "Effective Model
Sparsification by Scheduled Grow-and-Prune Methods", ICLR 2022, adapted from weights to channels): a network
trained from scratch ends at the budget without a dense model ever being trained first.

    model, history = scheduled_grow_and_prune(model, splits, target=0.25, epochs=6, partitions=2)

The prunable channel groups are split into `partitions` runs of consecutive layers (`GapSchedule`). One training
schedule (the loop's recipe) is cut into `partitions * cycles` phases. In each phase one partition is dense (all
its channels train) while every other group is pruned to its width: its removed channels are held at zero after
every optimiser step (producer rows, biases and norm parameters, through `ChannelGraph.scale_channels`). When a
phase ends, the dense partition is pruned to its widths by the L1 norm of its channels, and the next partition
grows back. The paper regrows weights from zero; a whole channel regrown from zero would stay dead (its norm's
weight and bias are zero too, so no gradient reaches it), so a regrown channel starts as `ChannelGraph.widen`'s
new channels do (`reset_channels`: producer rows drawn at the scale of the kept ones, norms the identity, the
outgoing columns zero, so the output does not jump) and trains from there. After the last phase every group is
pruned; the removed
channels, exactly zero, are cut away (which changes no output), and `scheduled_grow_and_prune` fine-tunes the
cut network for its closing share of the epochs (`finetune_share`; in the loop, push `gap`, the loop's own
fine-tuning). The widths are the budget's uniform fractions (every group keeps the same share of its channels:
from scratch no layer has earned more).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .checkpoints import Hooks
from .cost import count_flops, count_params
from .pruning import ChannelGraph
from .pruning.selection import select_channels
from .pruning.surgery import cross_channel_norm
from .training import evaluate, fit, recalibrate_batchnorm, training_batches

__all__ = ["scheduled_grow_and_prune", "GapSchedule", "channel_l1", "check_groups"]


def channel_l1(graph: ChannelGraph, name: str) -> torch.Tensor:
    """The L1 norm of each channel of group `name` over the tensors that produce it (producer rows and biases,
    depthwise filters, norm weights and biases)."""
    size = graph.group(name).size
    score = torch.zeros(size, dtype=torch.float64)
    for p in graph.channel_params(name):
        if p.role == "consumer" or p.attr.startswith("running_"):
            continue
        t = p.tensor.detach().abs().double().movedim(p.dim, 0).reshape(p.tensor.shape[p.dim], -1).sum(1).cpu()
        score += t[p.index].sum(1)
    return score


def check_groups(graph: ChannelGraph) -> None:
    """`ValueError` naming a group that grow-and-prune cannot hold at zero exactly: one normalised across
    channels (LayerNorm, GroupNorm with several channels per group), where silenced channels still change the
    other channels' outputs, so the cut at the end would not be exact."""
    for group in graph.groups:
        norm = cross_channel_norm(graph, group.name)
        if norm is not None:
            raise ValueError(f"grow-and-prune: group {group.name!r} is normalised across channels by {norm}, so "
                             f"its channels held at zero still change the others' outputs; it needs per-channel "
                             f"norms (BatchNorm, or GroupNorm with one channel per group), or the block in "
                             f"ignore=[...]")


def _partitions(names: list, k: int) -> list:
    """`names` cut into `k` runs of consecutive groups, as even as they can be."""
    k = min(k, len(names))
    bounds = [round(i * len(names) / k) for i in range(k + 1)]
    return [names[bounds[i]:bounds[i + 1]] for i in range(k)]


class GapSchedule:
    """The grow-and-prune schedule over one training run (pass `after_step` to `fit`, then `finish()`).

    `model`'s prunable groups are split into `partitions` runs of consecutive layers, each kept at the budget's
    uniform widths (`budget` of its cost, `budget_kind` "params" or "flops") except the dense partition of the
    current phase; `partitions * cycles` phases share the steps evenly. `finish()` prunes what is still dense
    and returns the keep-set `{group: kept indices}` (the removed channels are exactly zero, so cutting them
    changes no output). `history` lists each phase's end: the step and the groups pruned then. The regrown
    channels' fresh weights come from `seed` and the phase, so a resumed run regrows what an uninterrupted one
    would.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, budget: float, budget_kind: str = "params",
                 partitions: int = 2, cycles: int = 1, ignore=(), seed: int = 0):
        if not 0 < budget <= 1 or partitions < 1 or cycles < 1 or budget_kind not in ("params", "flops"):
            raise ValueError(f"GapSchedule: budget must be in (0, 1], partitions and cycles >= 1 and budget_kind "
                             f"'params' or 'flops', got {budget}, {partitions}, {cycles}, {budget_kind!r}")
        self.graph = ChannelGraph(model, example, ignore=tuple(ignore))
        names = [g.name for g in self.graph.groups]
        if not names:
            raise ValueError(f"GapSchedule: {type(model).__name__} has no prunable channel groups")
        check_groups(self.graph)
        keep = select_channels(self.graph, {n: channel_l1(self.graph, n) for n in names}, method="budget",
                               budget=budget, budget_kind=budget_kind, allocation="uniform")
        self.widths = {n: int(keep[n].numel()) for n in names}
        self.parts = _partitions(names, partitions)
        self.phases = len(self.parts) * cycles
        self.phase, self.removed, self.history, self.seed = 0, {}, [], int(seed)
        with torch.no_grad():
            for name in names:  # from the start, every group outside the first dense partition is pruned
                if name not in self.parts[0]:
                    self._prune(name)

    def _prune(self, name: str) -> None:
        order = torch.sort(channel_l1(self.graph, name), descending=True, stable=True).indices
        self.removed[name] = order[self.widths[name]:]
        self.graph.scale_channels(name, self.removed[name], 0.0)

    def _end_phase(self, step: int) -> None:
        dense = self.parts[self.phase % len(self.parts)]
        for name in dense:
            self._prune(name)
        self.phase += 1
        self.history.append({"phase": self.phase, "step": step, "pruned": list(dense)})
        if self.phase < self.phases:  # the next partition grows: its removed channels start afresh and train
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.phase)
            for name in self.parts[self.phase % len(self.parts)]:
                gone = self.removed.pop(name, None)
                if gone is not None and gone.numel():
                    self.graph.reset_channels(name, gone, generator)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        while self.phase < min(self.phases - 1, step * self.phases // max(total, 1)):
            self._end_phase(step)
        for name, gone in self.removed.items():  # the pruned channels stay at zero
            if gone.numel():
                self.graph.scale_channels(name, gone, 0.0)

    def state_dict(self) -> dict:
        """The schedule's progress (phase, removed channels, history), for `fit(checkpoint=...)`; the weights,
        zeros included, are the model's."""
        return {"phase": self.phase, "removed": {n: t.clone() for n, t in self.removed.items()},
                "history": [dict(h) for h in self.history], "schedule": self._plan()}

    def _plan(self) -> dict:
        return {"partitions": self.parts, "phases": self.phases, "widths": dict(self.widths)}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`'s progress; a state of another schedule (other partitions, cycles or widths)
        is refused (`ValueError`; a state saved before schedules were named is taken as it is)."""
        if "schedule" in state and state["schedule"] != self._plan():
            raise ValueError(f"GapSchedule: the saved progress belongs to another schedule ({state.get('schedule')}, "
                             f"this one is {self._plan()}); remove the checkpoint or run the same schedule")
        self.phase = int(state["phase"])
        self.removed = {n: torch.as_tensor(t, dtype=torch.long) for n, t in state["removed"].items()}
        self.history = [dict(h) for h in state["history"]]

    @torch.no_grad()
    def finish(self) -> dict:
        while self.phase < self.phases:
            self._end_phase(-1)
        keep = {}
        for name, gone in self.removed.items():
            mask = torch.ones(self.graph.group(name).size, dtype=torch.bool)
            mask[gone] = False
            keep[name] = mask.nonzero().squeeze(1)
        return keep


def scheduled_grow_and_prune(model: nn.Module, splits, target: float, epochs: float, partitions: int = 2,
                             cycles: int = 1, finetune_share: float = 0.2, budget_kind: str = "params",
                             seed: int = 0, device="cpu", progress: bool = False, checkpoint=None, after_step=None,
                             **fit_kwargs):
    """Trains `model` from its current weights to `target` of its cost; returns `(compact model, history)`.

    Args:
        model: the network (untrained, or not: it is trained in place and then cut).
        splits: a `gpp_ext.data.DataSplits`.
        target: the fraction of the cost (`budget_kind`: "params" or "flops") the compact model keeps.
        epochs: all training: the phases, then `finetune_share` of it on the cut network.
        partitions, cycles: see `GapSchedule`.
        checkpoint: a file path: both trainings checkpoint after every epoch (`fit(checkpoint=...)`, in
            `<path stem>-phases.pt` and `<path stem>-finetune.pt`), so an interrupted call made again goes on
            where it stopped and ends as an uninterrupted one would; the files are removed when it returns.
        after_step: `after_step(step, total)`, called after every optimiser step of both trainings (after the
            schedule's own); one with `state_dict()` / `load_state_dict()` is checkpointed with them.
        fit_kwargs: the training recipe (`fit`'s lr, lr_schedule, optimizer, batch_size, weight_decay, warmup).
    """
    if epochs <= 0 or not 0 <= finetune_share < 1:
        raise ValueError(f"scheduled_grow_and_prune: epochs must be > 0 and finetune_share in [0, 1), got {epochs}, "
                         f"{finetune_share}")
    model.to(device)
    example = torch.zeros(2, *splits.input_shape, device=device)
    schedule = GapSchedule(model, example, target, budget_kind, partitions, cycles, seed=seed)
    points = [None, None]
    if checkpoint is not None:
        stem, ext = os.path.splitext(os.fspath(checkpoint))
        points = [f"{stem}-{part}{ext or '.pt'}" for part in ("phases", "finetune")]
    model = fit(model, splits.train, epochs * (1 - finetune_share), seed=seed, device=device, progress=progress,
                after_step=Hooks(schedule.after_step, after_step), desc="grow-and-prune", checkpoint=points[0],
                **fit_kwargs)
    schedule.graph.prune(schedule.finish())
    # the last dense partition was silenced after the last step: the running statistics after it are stale
    recalibrate_batchnorm(model, training_batches(splits.train, fit_kwargs.get("batch_size", 128), seed + 1),
                          device=device)
    model = fit(model, splits.train, epochs * finetune_share, seed=seed + 1, device=device, progress=progress,
                after_step=Hooks(after_step), desc="fine-tuning", checkpoint=points[1], **fit_kwargs)
    for point in points:
        if point is not None and os.path.exists(point):
            os.remove(point)
    history = schedule.history + [{"phase": "final", "val_accuracy": evaluate(model, splits.val, device=device),
                                   "params": count_params(model), "flops": count_flops(model, example)}]
    return model, history
