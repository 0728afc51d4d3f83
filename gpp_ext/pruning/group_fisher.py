"""Group Fisher (Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021): the Fisher
information of a mask on every channel of a coupled group, per unit of cost its removal saves.

A channel group shares one mask `m` (all its coupled channels go together), applied at the output of each of
the group's layers (after the normalisation that follows a convolution: removing the channel removes the
norm's output): sample `n`'s part of the gradient of the loss with respect to `m_c` is `g_nc = sum over those
outputs and the positions of out * dL/dout` at channel `c` for that sample (`ChannelGraph.channel_params` says
which layers and where). The importance is the empirical Fisher `sum over samples of g_nc^2`, each sample's
gradient squared before the samples are summed, as the paper's estimate has it; squaring
the batch's summed gradient instead would measure the square of the mean gradient, mostly noise while training.
It is divided by what removing one channel of the group saves in the budget's unit (`CostModel`: FLOPs, or
parameters when the budget counts them), so a cheap channel must carry less information to stay.

Registered as the criterion `group_fisher`; with `allocation="global"` and `normalize="none"` its scores are
ranked across groups as the paper ranks them (one threshold), and the loop's default solver uses them as it
uses any criterion's.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ..training import labelled_batches
from .costs import CostModel
from .graph import ChannelGraph
from .taps import check_unchanged, inplace_after, per_sample, tap

__all__ = ["mask_gradients", "mask_fisher", "group_fisher", "FisherRemoval", "DEFAULT_BATCHES"]

DEFAULT_BATCHES = 16   # batches of the loader the Fisher estimate accumulates over, unless the context limits them


def _masked_outputs(graph: ChannelGraph) -> dict:
    """`{module name: [(group name, positions [size, k])]}`: the modules at whose outputs a group's mask sits,
    each normalisation layer of the group and each producer whose output no normalisation of the group takes
    (a producer followed by its BatchNorm is masked after it: removing the channel removes the norm's output)."""
    out = {}
    for group in graph.groups:
        params = graph.channel_params(group.name)
        norms = {p.module: p for p in params if p.role == "norm" and p.attr == "weight"}
        producers = {p.module: p for p in params if p.role == "producer" and p.attr == "weight"}
        normalised = set()
        for node in graph.gm.graph.nodes:
            if node.op == "call_module" and node.target in norms and node.args:
                normalised.update(_producers_into(node.args[0], producers))
        for name, p in list(norms.items()) + [(n, p) for n, p in producers.items() if n not in normalised]:
            out.setdefault(name, []).append((group.name, p.index))
    return out


def _producers_into(node, producers) -> set:
    """The producers among `producers` whose outputs reach `node` directly or through concatenations (a norm
    over `cat([a(x), b(x)])` normalises the channels of both `a` and `b`)."""
    if getattr(node, "op", None) == "call_module" and node.target in producers:
        return {node.target}
    if getattr(node, "op", None) == "call_function" and node.target in (torch.cat, torch.concat) and node.args:
        found = set()
        for part in node.args[0]:
            found |= _producers_into(part, producers)
        return found
    return set()


def mask_gradients(graph: ChannelGraph, batches, loss_fn=None):
    """Per batch of `batches` (`(inputs, labels)` on the model's device), `{group: [N, size] float64}`: each
    sample's part of the gradient of the batch loss with respect to each channel's mask (their sum over the
    samples is that gradient), one mask shared by the group's coupled layers and applied at each of their
    outputs (`_masked_outputs`), so a sample's part is the sum over those outputs and the positions of
    `output x dL/doutput` (a generator). The model runs in eval mode;
    its gradients are cleared after each batch, and its mode and hooks restored at the end."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = graph.model
    masked = _masked_outputs(graph)
    copies = {name: inplace_after(graph, name) for name in masked}
    outputs: dict[str, list] = {}
    handles = []
    for name in masked:
        def hook(module, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                entry, output = tap(out, copies[name])
                outputs.setdefault(name, []).append(entry)
                return output
        handles.append(graph.modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            outputs.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(model(x), y).backward()
            grads = {g.name: torch.zeros(len(y), g.size, dtype=torch.float64) for g in graph.groups}
            for name, entries in masked.items():
                for value, version, grad in outputs.get(name, ()):
                    if grad is None:
                        continue
                    check_unchanged("group_fisher", name, value, version)
                    parts = per_sample(graph.modules[name], (value * grad).double())
                    for group, index in entries:
                        grads[group] += parts[:, index.cpu()].sum(2)
            model.zero_grad(set_to_none=True)
            yield grads
    finally:
        outputs.clear()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()


def mask_fisher(graph: ChannelGraph, batches, loss_fn=None) -> dict:
    """`{group: [size] float64}`: the empirical Fisher of the masks, each sample's mask gradient
    (`mask_gradients`) squared, summed over the samples of `batches`."""
    fisher = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.groups}
    seen = 0
    for grads in mask_gradients(graph, batches, loss_fn):
        for name in fisher:
            fisher[name] += grads[name].square().sum(0)
        seen += 1
    if seen == 0:
        raise ValueError("group_fisher: the loader yielded no batches")
    return fisher


def group_fisher(graph: ChannelGraph, context) -> dict:
    """Group Fisher importance per channel: the mask Fisher information (`mask_fisher`, over the context's
    first `max_batches` batches, `DEFAULT_BATCHES` when unset) divided by the cost one channel of the group
    saves (`context.cost_kind`: "flops" or "params")."""
    limit = context.max_batches or DEFAULT_BATCHES
    batches = list(labelled_batches(context._need_loader("group_fisher"), context.device, limit=limit))
    fisher = mask_fisher(graph, batches)
    kind = context.cost_kind if context.cost_kind in ("params", "flops") else "flops"
    costs = CostModel(graph, kind)
    full = costs.cost({})
    scores = {}
    for group in graph.groups:
        saved = full - costs.cost({group.name: group.size - 1}) if group.size > 1 else 0
        scores[group.name] = fisher[group.name] / max(float(saved), 1.0)
    return scores


class FisherRemoval:
    """Group Fisher's schedule: channels removed a few at a time while training goes on, until the budget.

        removal = FisherRemoval(model, example, budget=0.3, budget_kind="flops")
        fit(model, data, epochs, after_step=removal.step)     # removal.attach() first: it hooks the model
        keep = removal.finish()                               # then a cut of exactly `keep` changes nothing

    During training, every step's per-sample mask gradients (`out x dL/dout` summed over the positions at each
    masked output, as `mask_gradients`) are squared and summed into the Fisher estimate. Every `interval` steps
    within the first `share` of the training (the paper removes one channel every few iterations), the channels
    with the lowest accumulated Fisher per unit of cost saved are removed one at a time (the cost saved
    recomputed at the current widths) until the model meets that removal's goal (the cost falls geometrically
    from the full model to `budget` over the removals); the accumulators then restart. A short training removes
    several channels at each of its removals; `removals` fixes their number instead. A removed channel is
    silenced (`ChannelGraph.scale_channels(..., 0)`) after every optimiser step, so training cannot revive it,
    and the final cut removes only zeros. Every group keeps at least `max(min_channels, ceil(floor * size))`
    channels.
    """

    def __init__(self, model: nn.Module, example_inputs, budget: float, budget_kind: str = "flops",
                 removals: int | None = None, share: float = 0.5, floor: float = 0.0, min_channels: int = 1,
                 ignore=(), latency=None, interval: int = 10):
        from .costs import cost_model

        if not 0 < budget <= 1:
            raise ValueError(f"FisherRemoval: budget must be in (0, 1], got {budget!r}")
        if removals is not None and (isinstance(removals, bool) or not isinstance(removals, int) or removals < 1) \
                or isinstance(interval, bool) or not isinstance(interval, int) or interval < 1 or not 0 < share <= 1:
            raise ValueError(f"FisherRemoval: removals must be None or an int >= 1, interval an int >= 1 and share in "
                             f"(0, 1], got {removals!r}, {interval!r}, {share!r}")
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1 \
                or not 0 <= floor < 1:
            raise ValueError(f"FisherRemoval: min_channels must be an int >= 1 and floor in [0, 1), got "
                             f"{min_channels!r}, {floor!r}")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self.model, self.budget, self.removals, self.share, self.interval = model, budget, removals, share, interval
        self.graph = ChannelGraph(model, example_inputs, ignore=ignore)
        self.costs = cost_model(self.graph, budget_kind, latency)
        self.full = self.costs.cost({})
        self.sizes = {g.name: g.size for g in self.graph.groups}
        self.minimum = {n: min(s, max(min_channels, int(math.ceil(floor * s - 1e-9)))) for n, s in self.sizes.items()}
        self.removed = {n: torch.zeros(s, dtype=torch.bool) for n, s in self.sizes.items()}
        self.fisher = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.sizes.items()}
        self._grads: dict = {}   # this step's per-sample mask gradients, [N, size] per group
        self._masked = _masked_outputs(self.graph)
        self._handles = []
        self._done = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------- hooks
    def attach(self) -> "FisherRemoval":
        """Hooks the masked outputs so every training step's mask gradients are accumulated."""
        for name, entries in self._masked.items():
            module, copy = self.graph.modules[name], inplace_after(self.graph, name)

            def hook(mod, args, out, entries=entries, module=module, name=name, copy=copy):
                if not (isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled()):
                    return

                # the gradient hook holds a detached view, never `out` itself: `out` holds its hooks, so a closure
                # over it is a reference cycle through autograd that Python's collector cannot see, and every
                # step's activations (and their graphs) would stay alive (a VGG-BN epoch reached 23 GB)
                def on_grad(value, version, grad):
                    check_unchanged("group_fisher", name, value, version)
                    parts = per_sample(module, (value * grad).double())
                    for group, index in entries:
                        part = parts[:, index.cpu()].sum(2)
                        self._grads[group] = self._grads[group] + part if group in self._grads else part
                return tap(out, copy, on_grad)[1]
            self._handles.append(module.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -------------------------------------------------------------------------------------------- steps
    def widths(self) -> dict:
        return {n: int((~r).sum()) for n, r in self.removed.items()}

    def step(self, step: int, total: int) -> None:
        """After optimiser step `step` of `total` (`fit`'s `after_step`): accumulate, remove when due, silence."""
        for n, g in self._grads.items():
            self.fisher[n] += g.square().sum(0)
        self._grads = {}
        if self.removals is None:  # one removal every `interval` steps of the removal window, at least one
            self.removals = max(1, int(self.share * total) // self.interval)
        due = min(self.removals, int(step * self.removals / max(1.0, self.share * total)))
        self._catch_up(due)
        self._silence()

    def _catch_up(self, due: int) -> None:
        """Makes the removals up to number `due`: several due at once (a step that passes more than one goal)
        are one removal to the last goal, on the Fisher gathered since the last removal (which each removal
        restarts: a second removal in a row would rank channels by zeros)."""
        if self._done < due:
            self._done = due
            self._remove(self.budget ** (due / self.removals))

    def _remove(self, goal: float) -> None:
        target = goal * self.full
        widths = self.widths()
        cost = self.costs.cost(widths)
        removed = 0
        while cost > target:
            best, best_score = None, math.inf
            for name, width in widths.items():
                if width <= self.minimum[name]:
                    continue
                saved = cost - self.costs.cost({**widths, name: width - 1})
                alive = (~self.removed[name]).nonzero().squeeze(1)
                lowest = alive[int(torch.argmin(self.fisher[name][alive]))]
                score = float(self.fisher[name][lowest]) / max(float(saved), 1e-12)
                if score < best_score:
                    best, best_score = (name, int(lowest)), score
            if best is None:
                break
            name, channel = best
            self.removed[name][channel] = True
            widths[name] -= 1
            cost = self.costs.cost(widths)
            removed += 1
        self.history.append({"goal": goal, "removed": removed, "cost_share": cost / self.full})
        for n in self.fisher:
            self.fisher[n].zero_()

    @torch.no_grad()
    def _silence(self) -> None:
        for name, mask in self.removed.items():
            if mask.any():
                self.graph.scale_channels(name, mask, 0.0)

    def finish(self) -> dict:
        """Completes the removals not yet made (a shorter training than planned), silences, unhooks, and returns
        the keep-set `{group: kept indices}` for the cut."""
        self.removals = self.removals or 1   # no step was taken: one removal to the budget
        if self._done < self.removals and not any(bool(f.any()) for f in self.fisher.values()):
            warnings.warn("FisherRemoval.finish: no Fisher information was gathered since the last removal (no "
                          "training step with the hooks attached), so the last channels are removed in index "
                          "order; attach() before training", RuntimeWarning, stacklevel=2)
        self._catch_up(self.removals)
        share = self.costs.cost(self.widths()) / self.full
        if share > self.budget + 1e-9:
            warnings.warn(f"FisherRemoval.finish: the minimum widths (min_channels, floor) keep {share:.4f} of the "
                          f"cost, above the budget {self.budget}", RuntimeWarning, stacklevel=2)
        self._silence()
        self.detach()
        return {n: (~r).nonzero().squeeze(1) for n, r in self.removed.items() if r.any()}
