"""Push v2 (docs/design.md §2.6): fade the discriminant removal set to exactly zero, so the cut is lossless.

    fade = RemovalFade(model, example_inputs, loader, budget=0.3)      # chooses the first removal set
    push = PushLoss(num_classes, 0.3, 0.3, 0.05)
    fade.attach(push)                        # the push terms act on the kept pre-decision features only
    fit(model, data, 1, push=push, after_step=fade.step)                # the set fades while the rest trains
    keep = fade.finish()                     # the set is exactly zero now
    compact, report = prune(model, loader, example_inputs, keep=keep)    # the cut removes only zeros

The removal set is what the coming cut will take away: the channels a criterion (by default the traced
discriminant utility, `lda`) ranks lowest, chosen globally for a parameter (or FLOP) budget with a floor per
group (`select_channels(method="budget")`). It is chosen again `reselect` times during the first `fade_end`
share of the phase, so channels can swap in and out while the fade is partial; the widths (how many channels
each group keeps) are those of the first selection, fixed for the rest of the push.

Every tensor that produces a removed channel (producer weight rows and bias, norm weight **and bias**, since a
surviving bias leaks a constant through the ReLU, depthwise filters and bias: the graph's `scale_channels`
set) is held at `anchor * f(u) / f(u_entry)`, where the anchor is its value when the channel entered the set,
`u` the share of the fade done and `f` the schedule ("cosine": `(1 + cos(pi u)) / 2`, or "linear": `1 - u`),
so it reaches exactly zero at `u = 1`. The task's gradients into those positions are zeroed (so the optimiser's
moments do not build up there) and any optimiser change is overwritten after each step; the kept channels get
no penalty at all. Consumers' columns and running statistics are left alone: once the producers are zero the
consumers read zeros, and the cut changes no output.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import distributed as gdist
from .classifier import find_classifier
from .pruning import ChannelGraph, CriterionContext, criteria, select_channels
from .pruning.allocation import ON_DATA, evaluator_from, held_out_batches

__all__ = ["RemovalFade", "FADE_SCHEDULES"]

FADE_SCHEDULES = ("cosine", "linear")


def _schedule(kind: str, u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * u)) if kind == "cosine" else 1.0 - u


class RemovalFade:
    """Chooses a removal set for the coming cut and fades it to exactly zero during training.

    Args:
        model: the network being pushed (its parameters are changed in place; it must not be pruned while the
            fade runs).
        example_inputs: a batch the model accepts (for the graph and the cost model).
        loader: `(inputs, labels)` batches of training data for the criterion (the analysis and tracing).
        budget: the fraction of the model's current cost the cut will keep, in (0, 1].
        budget_kind: "params", "flops" or "latency" (with `latency`, a `gpp_ext.latency.LatencyTable`).
        criterion: a registered criterion's name or a callable `(graph, context) -> scores` that ranks
            channels; default the traced discriminant utility "lda".
        reselect: how many times the removal set is chosen (the first at construction), spread over the first
            `fade_end` share of the phase.
        schedule: the fade's shape, "cosine" or "linear".
        fade_end: the share of the phase (of the steps of the `fit` call) at which the set reaches zero; the
            rest trains the kept network with the set at zero.
        min_channels, round_to: width guards of the selection.
        neurons: pre-decision neurons the discriminant criteria trace.
        max_batches: batches of `loader` each selection analyses (None: all).
        num_classes: classes (default: the classifier's outputs).
        seed: seed of randomised criteria.
        ignore: modules the graph treats as opaque.
        normalize, allocation, floor: how the first selection compares and shares out the budget between groups
            (`select_channels`; "search" scores its candidates on `loader`). The widths it decides are fixed:
            later selections change only which channels each group loses, and a channel more than half faded
            comes back only when it now ranks in the top half of its group's kept width. `fixed_widths=False`
            lets every selection decide the widths afresh (what the fade did first; with raw utilities compared
            across layers the first selection can starve a layer that later ones would refill).
        gradual: the removal set grows over the selections instead of being whole from the first: selection
            `j` of `reselect` removes `j / reselect` of what each group will lose, its channels chosen by the
            criterion at that moment, each fading from its entry to zero at the end of the fade (so the network
            adapts between removals, as gradual pruners do). Needs `fixed_widths`.
    """

    def __init__(self, model: nn.Module, example_inputs, loader, budget: float, budget_kind: str = "params",
                 criterion="lda", reselect: int = 4, schedule: str = "cosine", fade_end: float = 1.0,
                 min_channels: int = 1, round_to: int = 1, neurons=0.75, max_batches: int | None = 20,
                 num_classes: int | None = None, seed: int = 0, ignore=(), normalize: str = "mean",
                 allocation: str = "global", floor: float = 0.0, fixed_widths: bool = True, latency=None,
                 gradual: bool = False):
        if not 0 < budget <= 1:
            raise ValueError(f"RemovalFade: budget must be in (0, 1] (the fraction of the cost the cut keeps), got "
                             f"{budget}")
        if schedule not in FADE_SCHEDULES:
            raise ValueError(f"RemovalFade: schedule must be one of {FADE_SCHEDULES}, got {schedule!r}")
        if not isinstance(reselect, int) or reselect < 1:
            raise ValueError(f"RemovalFade: reselect must be an int >= 1, got {reselect!r}")
        if not 0 < fade_end <= 1:
            raise ValueError(f"RemovalFade: fade_end must be in (0, 1], got {fade_end}")
        if gradual and not fixed_widths:
            raise ValueError("RemovalFade: gradual=True needs fixed_widths=True (the set grows towards fixed widths)")
        self.name, self._criterion = criteria.resolve(criterion)
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self.model, self.loader, self.budget, self.budget_kind = model, loader, budget, budget_kind
        self.reselect, self.schedule, self.fade_end = reselect, schedule, fade_end
        self.min_channels, self.round_to, self.neurons, self.max_batches = min_channels, round_to, neurons, max_batches
        self.seed, self.normalize, self.allocation, self.floor = seed, normalize, allocation, floor
        self.latency = latency
        self.widths = None  # {group: width}, decided by the first selection and fixed after it
        self.fixed_widths, self.gradual = fixed_widths, gradual
        self.graph = ChannelGraph(model, example_inputs, ignore=ignore)
        self.classifier = find_classifier(model)
        self.num_classes = num_classes or dict(model.named_modules())[self.classifier].out_features
        self._push = None
        self._hooks = []
        self._selections = 0
        self._finished = False
        self._u = 0.0
        # per group: channels in the set [R], each one's f(u) when it entered [R]; per carrier tensor, the
        # anchor values (a copy of the tensor; only the removal positions are read)
        self._removed: dict[str, torch.Tensor] = {}
        self._entry: dict[str, torch.Tensor] = {}
        self._anchor: dict[tuple, torch.Tensor] = {}
        self._carriers = {g.name: [p for p in self.graph.channel_params(g.name)
                                   if p.role != "consumer" and not p.attr.startswith("running_")]
                          for g in self.graph.groups}
        self.history: list[dict] = []  # per selection: step share, removed count, channels swapped
        self._select()
        self._install_gradient_masks()

    # ------------------------------------------------------------------------------------------ selection
    def _select(self) -> None:
        context = CriterionContext(loader=self.loader, device=next(self.model.parameters()).device,
                                   classifier=self.classifier, num_classes=self.num_classes, seed=self.seed,
                                   neurons=self.neurons, max_batches=self.max_batches,
                                   cost_kind=self.budget_kind if self.budget_kind in ("params", "flops") else "flops")
        was_training = self.model.training
        try:
            scores = self._criterion(self.graph, context)
        finally:
            self.model.train(was_training)
        factor = _schedule(self.schedule, self._u)
        # Under torch.distributed each process scores on its own batches (tracing images, the Fisher weights of
        # the widths): rank 0 decides, so every process fades, and then cuts, the same channels
        decided = self.widths is None or not self.fixed_widths
        if decided:  # the first selection decides the widths (unless fixed_widths=False: every selection decides
            # them afresh, as before the widths were an allocation's)
            evaluate = None
            if self.allocation in ON_DATA:
                evaluate = evaluator_from(self.model, self.graph.example_inputs, scores, self.loader,
                                          ignore=tuple(self.graph.ignore), device=context.device,
                                          max_batches=self.max_batches,
                                          held_out=held_out_batches(self.allocation))
            keep = gdist.broadcast_object(select_channels(
                self.graph, scores, method="budget", budget=self.budget, budget_kind=self.budget_kind,
                min_channels=self.min_channels, round_to=self.round_to, normalize=self.normalize,
                allocation=self.allocation, floor=self.floor, evaluate=evaluate, seed=self.seed,
                latency=self.latency))
            self.widths = {name: int(k.numel()) for name, k in keep.items()}
        if not decided or self.gradual:
            keep = gdist.broadcast_object(self._keep_at_widths(scores, factor, self._stage_widths()))
        swapped = 0
        for group in self.graph.groups:
            removed = torch.ones(group.size, dtype=torch.bool)
            if group.name in keep:
                removed[keep[group.name]] = False
            else:
                removed[:] = False
            old = torch.zeros(group.size, dtype=torch.bool)
            if group.name in self._removed:
                old[self._removed[group.name]] = True
            entering = removed & ~old
            swapped += int((removed ^ old).sum())
            entry = torch.ones(group.size, dtype=torch.float64)
            if group.name in self._entry:
                entry[old] = self._entry[group.name]
            entry[entering] = factor
            with torch.no_grad():
                for p in self._carriers[group.name]:
                    key = (p.module, p.attr)
                    if key not in self._anchor:
                        self._anchor[key] = p.tensor.detach().clone()
                    positions = p.index[entering].reshape(-1).to(p.tensor.device)
                    if positions.numel():
                        kept = p.tensor.detach().index_select(p.dim, positions)
                        self._anchor[key].index_copy_(p.dim, positions, kept)
            index = removed.nonzero().squeeze(1)
            self._removed[group.name] = index
            self._entry[group.name] = entry[index]
        self._selections += 1
        self.history.append({"at": self._u, "removed": sum(int(r.numel()) for r in self._removed.values()),
                             "swapped": swapped if self._selections > 1 else 0})
        self._update_kept_features()
        self._update_masks()

    def _stage_widths(self) -> dict:
        """The widths the coming selection keeps: the fixed widths, or with `gradual` the share of the way
        towards them that selection reaches (selection `j` of `reselect`: `j / reselect` of each group's loss)."""
        if not self.gradual:
            return self.widths
        share = (self._selections + 1) / self.reselect
        sizes = {g.name: g.size for g in self.graph.groups}
        return {name: sizes[name] - int(round((sizes[name] - width) * share)) for name, width in self.widths.items()}

    def _keep_at_widths(self, scores: dict, factor: float, widths: dict) -> dict:
        """The best channels at `widths` by the new scores, with hysteresis: a channel more than half faded
        stays in the removal set unless it now ranks in the top half of its group's kept width."""
        keep = {}
        for name, width in widths.items():
            order = torch.sort(scores[name].detach().double().cpu(), descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            blocked = torch.zeros(order.numel(), dtype=torch.bool)
            removed = self._removed.get(name)
            if removed is not None and removed.numel():
                remaining = factor / self._entry[name].clamp_min(1e-12)  # share of its anchor each one keeps
                blocked[removed[remaining < 0.5]] = True
            blocked &= rank >= width // 2
            allowed = order[~blocked[order]]
            keep[name] = allowed[:width].sort().values
        return keep

    def _update_kept_features(self) -> None:
        width = dict(self.model.named_modules())[self.classifier].in_features
        kept = torch.ones(width, dtype=torch.bool)
        for group in self.graph.groups:
            for p in self.graph.channel_params(group.name):
                if p.module == self.classifier and p.role == "consumer":
                    kept[p.index[self._removed[group.name]].reshape(-1)] = False
        self.kept_features = kept.nonzero().squeeze(1)
        if self._push is not None:
            self._push.restrict(self.kept_features)

    # ------------------------------------------------------------------------------------------ gradients
    def _install_gradient_masks(self) -> None:
        self._masks: dict[tuple, torch.Tensor] = {}
        tensors = {}
        for params in self._carriers.values():
            for p in params:
                tensors[(p.module, p.attr)] = p.tensor
        for key, tensor in tensors.items():
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                self._masks[key] = torch.ones_like(tensor)
                self._hooks.append(tensor.register_hook(lambda grad, key=key: grad * self._masks[key]))
        self._update_masks()

    def _update_masks(self) -> None:
        masks = getattr(self, "_masks", None)
        if masks is None:
            return
        for mask in masks.values():
            mask.fill_(1.0)
        for name, params in self._carriers.items():
            for p in params:
                mask = masks.get((p.module, p.attr))
                if mask is not None:
                    positions = p.index[self._removed[name]].reshape(-1).to(mask.device)
                    mask.index_fill_(p.dim, positions, 0.0)

    # ------------------------------------------------------------------------------------------ the fade
    def attach(self, push) -> "RemovalFade":
        """Makes `push` (a `PushLoss`) act on the kept pre-decision features only, now and after every
        re-selection. Returns self."""
        self._push = push
        push.restrict(self.kept_features)
        return self

    @torch.no_grad()
    def _apply(self) -> None:
        factor = _schedule(self.schedule, self._u)
        for name, params in self._carriers.items():
            removed = self._removed[name]
            if not removed.numel():
                continue
            ratio = factor / self._entry[name].clamp_min(1e-12) if factor > 0 else torch.zeros(removed.numel(),
                                                                                            dtype=torch.float64)
            for p in params:
                per = p.index.shape[1]
                positions = p.index[removed].reshape(-1).to(p.tensor.device)
                shape = [1] * p.tensor.dim()
                shape[p.dim] = positions.numel()
                scale = ratio.repeat_interleave(per).to(p.tensor.device, p.tensor.dtype).view(shape)
                anchor = self._anchor[(p.module, p.attr)].index_select(p.dim, positions)
                p.tensor.index_copy_(p.dim, positions, anchor * scale)

    def step(self, step: int, total: int) -> None:
        """Call after every optimiser step (`fit(after_step=fade.step)`): re-selects the removal set when one is
        due and holds the set at its scheduled fraction of its anchor."""
        if self._finished:
            raise RuntimeError("RemovalFade.step: the fade is finished; make a new RemovalFade")
        self._u = min(1.0, step / (self.fade_end * max(total, 1)))
        due = min(self.reselect - 1, int(self._u * self.reselect)) + 1  # selections that should have happened
        if self._selections < due and self._u < 1.0:
            if self.gradual:  # a step that passed several stages goes to the last of them
                self._selections = due - 1
            self._select()
        self._apply()

    def finish(self) -> dict:
        """Sets the removal set to exactly zero, removes the gradient masks and returns the keep-set
        (`{group: kept indices}`) that `prune(keep=...)` or `ChannelGraph.prune` cuts losslessly."""
        if not self._finished:
            self._u = 1.0
            if self.gradual and self._selections < self.reselect:
                # a push too short for every stage (or none): the set reaches the full widths now, so the cut
                # meets the budget; the channels entering here are cut without having faded
                self._selections = self.reselect - 1
                self._select()
            self._apply()
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            self._finished = True
            if self._push is not None:
                self._push.restrict(self.kept_features)
        return self.keep

    @property
    def keep(self) -> dict:
        """`{group: kept indices (ascending)}` for every group the removal set touches."""
        out = {}
        for group in self.graph.groups:
            removed = self._removed.get(group.name)
            if removed is not None and removed.numel():
                mask = torch.ones(group.size, dtype=torch.bool)
                mask[removed] = False
                out[group.name] = mask.nonzero().squeeze(1)
        return out

    @property
    def removed(self) -> dict:
        """`{group: removed indices}` of the current removal set."""
        return {n: r.clone() for n, r in self._removed.items() if r.numel()}
