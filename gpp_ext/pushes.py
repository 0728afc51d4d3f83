"""The push methods: how the loop trains before each cut, by name (`LoopConfig.push`, `gpp compress --push`).

    @pushes.register("mine", "what it does, in one line")
    def mine(ctx: PushContext):          # trains ctx.model for ctx.epochs; returns (model, keep or None)
        return fit(ctx.model, ctx.splits.train, ctx.epochs, **ctx.fit_kwargs), None

A handler gets a `PushContext` (the model, the data, the loop's config, the iteration's seed, its budget
goal and the `fit` arguments every phase shares: learning rate, schedule, optimiser, distillation) and
returns the trained model and, when it prepared the coming cut itself, the keep-set `{group: kept indices}` the
cut must take (else None: the prune stage selects). Registered here:

- `fade` (the default): the removal set of the coming cut, chosen by the criterion at the allocation's widths,
  fades to exactly zero while the rest trains, so the cut is lossless (`RemovalFade`); needs `schedule="budget"`;
- `none`: plain cross-entropy (with distillation when the config asks);
- `loss`: the push terms on the pre-decision features (`PushLoss`: alpha, beta, gamma);
- the peers' `group_fisher`, `hgs`, `sss`, `sss_blocks`, and `gap` (scheduled grow-and-prune, `gpp_ext.gap`).

A handler that reads any of `PUSH_SETTINGS` (the push terms, the fade's knobs, `sparsity`) names them in
`register(reads=...)`; the others do not shape its run (`loop.run_settings`).

The CLI's choices, `LoopConfig.validate` and the benchmark read this registry, so a new push method is one
function in one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._registry import Registry

__all__ = ["PushContext", "register", "names", "describe", "get", "check", "PUSH_SETTINGS", "SELECTION_SETTINGS",
           "reads", "selects"]

_REGISTRY = Registry("push", "pushes")
# The `LoopConfig` settings only some push methods read: each method names those it reads (`register(reads=)`),
# so a configuration's unread ones can be told apart from the ones that shape its run (`loop.run_settings`).
PUSH_SETTINGS = ("alpha", "beta", "gamma", "separation", "fade_reselect", "fade_schedule", "fade_end",
                 "fade_fixed_widths", "fade_gradual", "sparsity", "gap_partitions", "gap_cycles", "push_optimizer",
                 "push_lr")
_PUSH_TERMS = ("alpha", "beta", "gamma", "separation")
# The settings of the prune stage's selection (which channels, how many per group): a push that prepares the
# keep-set itself (`register(selects=True)`, e.g. Group Fisher's removal while training) never reads them.
SELECTION_SETTINGS = ("criterion", "neurons", "allocation", "normalize", "round_to")


@dataclass
class PushContext:
    """What a push handler gets (see the module's doc)."""

    model: nn.Module
    splits: object
    config: object                      # the loop's LoopConfig
    seed: int
    device: object
    epochs: float                       # this push's epochs
    goal: float                         # the share of the base cost the coming cut keeps (schedule "budget")
    base_cost: int | None               # the base model's cost in config.budget_kind units
    fit_kwargs: dict = field(default_factory=dict)   # lr, schedule, optimiser, batch, seed, teacher, device, ...

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(2, *self.splits.input_shape, device=self.device)

    def relative_goal(self, model: nn.Module) -> float:
        """The share of `model`'s present cost the coming cut keeps (`goal` is a share of the base's cost);
        1 or more when the model already meets it."""
        return self.goal * (self.base_cost or self.cost(model)) / self.cost(model)

    def cost(self, model: nn.Module) -> float:
        from .latency import model_cost, table_for

        return model_cost(model, self.config.budget_kind, self.example, table_for(self.config))


def stage_epochs(config) -> tuple:
    """`(push epochs, fine-tuning epochs)` of one iteration: from `epoch_budget` when it is set (split evenly
    over `max_iterations`, `push_share` of each to the push), else `push_epochs` and `finetune_epochs`."""
    if config.epoch_budget is None:
        return config.push_epochs, config.finetune_epochs
    per = config.epoch_budget / config.max_iterations
    return per * config.push_share, per * (1 - config.push_share)


def register(name: str, summary: str, check=None, reads: tuple = (), selects: bool = False, check_model=None,
             removes_blocks: bool = False):
    """Registers a push handler under `name`; `check(config)` (optional) raises `ValueError` for settings it
    cannot run with, `check_model(config, model, example)` (optional) for a model it cannot run on (the loop
    calls it before training anything); `reads` names the `PUSH_SETTINGS` the handler reads; `selects=True` says
    the handler decides the keep-set itself (it returns one whenever the model is above the iteration's goal), so
    the prune stage's `SELECTION_SETTINGS` do not shape its run; `removes_blocks=True` says it may remove whole
    blocks (depth), so the model can end smaller than every channel group at one channel. Returns the
    decorator."""
    unknown = sorted(set(reads) - set(PUSH_SETTINGS))
    if unknown:
        raise ValueError(f"pushes.register({name!r}): reads names settings outside PUSH_SETTINGS: {unknown}")
    return _REGISTRY.register(name, summary, check=check, reads=tuple(reads), selects=bool(selects),
                              check_model=check_model, removes_blocks=bool(removes_blocks))


names, describe, get = _REGISTRY.names, _REGISTRY.describe, _REGISTRY.get


def reads(name: str) -> tuple:
    """The `PUSH_SETTINGS` push method `name` reads."""
    return _REGISTRY.extra(name, "reads")


def selects(name: str) -> bool:
    """Whether push method `name` decides the keep-set itself (`register(selects=True)`)."""
    return bool(_REGISTRY.extra(name, "selects"))


def removes_blocks(name: str) -> bool:
    """Whether push method `name` may remove whole blocks (`register(removes_blocks=True)`)."""
    return bool(_REGISTRY.extra(name, "removes_blocks"))


def check(config) -> None:
    """`ValueError` when `config.push` is not registered or its handler cannot run with `config`."""
    extra = _REGISTRY.extra(config.push, "check")
    if extra is not None:
        extra(config)


def check_model(config, model, example) -> None:
    """`ValueError` when `config.push`'s handler cannot run on `model` (say, SSS on a model with nothing to
    select; `example`: inputs of the data's shape); called by the loop with its other model checks, before the
    base model trains."""
    extra = _REGISTRY.extra(config.push, "check_model")
    if extra is not None:
        extra(config, model, example)


def _push_loss(ctx: PushContext):
    from .push import PushLoss

    c = ctx.config
    return PushLoss(ctx.splits.num_classes, c.alpha, c.beta, c.gamma, separation=c.separation)


@register("none", "plain cross-entropy (with distillation when --distill is set)")
def _none(ctx: PushContext):
    from .training import fit

    return fit(ctx.model, ctx.splits.train, ctx.epochs, **ctx.fit_kwargs), None


def _loss_check(config) -> None:
    if max(config.alpha, config.beta, config.gamma) <= 0:
        raise ValueError("LoopConfig: push='loss' trains with the push terms, but alpha, beta and gamma are all 0 "
                         "(plain training: push='none'); set them (recipe v1: alpha=0.3, beta=0.3, gamma=0.05)")


@register("loss", "the push terms (alpha, beta, gamma) on the pre-decision features, then the prune stage selects",
          check=_loss_check, reads=_PUSH_TERMS)
def _loss(ctx: PushContext):
    from .training import fit

    return fit(ctx.model, ctx.splits.train, ctx.epochs, push=_push_loss(ctx), **ctx.fit_kwargs), None


def _fade_check(config) -> None:
    if config.schedule != "budget" or config.cuts != 1:
        raise ValueError("LoopConfig: push='fade' fades the removal set of the iteration's cut, so it needs "
                         "schedule='budget' and cuts=1")


@register("fade", "the coming cut's removal set fades to exactly zero while the rest trains: a lossless cut",
          check=_fade_check, reads=_PUSH_TERMS + ("fade_reselect", "fade_schedule", "fade_end", "fade_fixed_widths",
                                                   "fade_gradual"))
def _fade(ctx: PushContext):
    from .fade import RemovalFade
    from .latency import table_for as latency_table
    from .training import fit, recalibrate_batchnorm, training_batches

    c, model = ctx.config, ctx.model
    model.to(ctx.device)
    push = _push_loss(ctx)
    relative = ctx.relative_goal(model)
    if relative >= 1:  # the model already meets this iteration's goal: a plain push
        return fit(model, ctx.splits.train, ctx.epochs, push=push, **ctx.fit_kwargs), None
    fade = RemovalFade(model, ctx.example, training_batches(ctx.splits.train, c.batch_size, ctx.seed), relative,
                       budget_kind=c.budget_kind, criterion=c.criterion, reselect=c.fade_reselect,
                       schedule=c.fade_schedule, fade_end=c.fade_end, neurons=c.neurons,
                       num_classes=ctx.splits.num_classes, seed=ctx.seed, allocation=c.allocation,
                       normalize=c.normalize, floor=c.floor, ignore=tuple(c.ignore), round_to=c.round_to,
                       fixed_widths=c.fade_fixed_widths, latency=latency_table(c), gradual=c.fade_gradual)
    fade.attach(push)
    model = fit(model, ctx.splits.train, ctx.epochs, push=push, after_step=fade.step, **ctx.fit_kwargs)
    keep = fade.finish()
    # The set reached zero in the last steps, faster than BatchNorm's running averages follow: re-estimate them
    # so the model at the end of the push is measured as it computes (the cut changes nothing after this).
    recalibrate_batchnorm(model, training_batches(ctx.splits.train, c.batch_size, ctx.seed + 1), device=ctx.device)
    return model, keep


def _needs_training(name: str):
    def check(config) -> None:
        if config.schedule != "budget" or config.cuts != 1:
            raise ValueError(f"LoopConfig: push={name!r} prepares the iteration's cut, so it needs schedule='budget' "
                             f"and cuts=1")
        if stage_epochs(config)[0] <= 0:
            raise ValueError(f"LoopConfig: push={name!r} removes channels while the model trains, so it needs push "
                             f"epochs (push_epochs > 0, or push_share > 0 with epoch_budget)")
    return check


@register("group_fisher", "Group Fisher's schedule: the channels of least mask Fisher information per cost saved "
          "removed a few at a time while training goes on, until the iteration's budget; a lossless cut",
          check=_needs_training("group_fisher"), selects=True)
def _group_fisher(ctx: PushContext):
    from .latency import table_for
    from .pruning.group_fisher import FisherRemoval
    from .training import fit, recalibrate_batchnorm, training_batches

    c, model = ctx.config, ctx.model
    model.to(ctx.device)
    relative = ctx.relative_goal(model)
    if relative >= 1:  # the model already meets this iteration's goal: plain training
        return fit(model, ctx.splits.train, ctx.epochs, **ctx.fit_kwargs), None
    removal = FisherRemoval(model, ctx.example, relative, budget_kind=c.budget_kind, floor=c.floor,
                            ignore=tuple(c.ignore), latency=table_for(c)).attach()
    try:
        model = fit(model, ctx.splits.train, ctx.epochs, after_step=removal.step, **ctx.fit_kwargs)
    finally:
        keep = removal.finish()
    recalibrate_batchnorm(model, training_batches(ctx.splits.train, c.batch_size, ctx.seed + 1), device=ctx.device)
    return model, keep


@register("hgs", "hierarchical group-sparse training: a group lasso over each channel's neuron, its filters and "
          "the columns that read it (weight --sparsity; --push-optimizer sgd trains it as the paper does); the prune "
          "stage then selects with the criterion", reads=("sparsity", "push_optimizer", "push_lr"))
def _hgs(ctx: PushContext):
    from .pruning import ChannelGraph
    from .pruning.hgs import hierarchical_penalty
    from .training import fit

    c = ctx.config
    graph = ChannelGraph(ctx.model, ctx.example, ignore=tuple(c.ignore))
    # under AdamW a group-lasso gradient is rescaled per coordinate; its paper trains it with SGD
    own = {k: v for k, v in (("optimizer", c.push_optimizer), ("lr", c.push_lr)) if v is not None}
    return fit(ctx.model, ctx.splits.train, ctx.epochs, penalty=hierarchical_penalty(graph, c.sparsity),
               **{**ctx.fit_kwargs, **own}), None


def _sss_selectable(channels: bool):
    def check(config, model, example) -> None:
        from .pruning.sss import NothingToSelect, check_selectable

        try:
            check_selectable(model, blocks=True, channels=channels, example=example, ignore=tuple(config.ignore))
        except NothingToSelect as error:  # said in the words a user chose the method by: the push and its recipe
            if channels:
                raise ValueError(f"push {config.push!r} (recipe sss) scales residual blocks and channels, and "
                                 f"{type(model).__name__} has neither; push 'hgs' or 'group_fisher' (recipes hgs, "
                                 f"group-fisher) prune its channels") from error
            raise ValueError(f"push {config.push!r} (recipe sss-blocks) removes whole residual blocks, and "
                             f"{type(model).__name__} has none; push 'sss' (recipe sss) selects its channels "
                             f"instead") from error
    return check


def _sss_push(ctx: PushContext, channels: bool):
    from .models.sources import spec_of
    from .pruning.sss import SparseStructureSelection
    from .training import fit

    c = ctx.config
    sss = SparseStructureSelection(ctx.model, c.sparsity, c.lr_schedule, c.warmup, channels=channels,
                                   example=ctx.example, ignore=tuple(c.ignore))
    try:
        model = fit(ctx.model, ctx.splits.train, ctx.epochs, after_backward=sss.after_backward,
                    after_step=sss.after_step, **ctx.fit_kwargs)
    finally:
        # a model rebuilt by a factory of its unpruned architecture could not load without its blocks: there the
        # zero blocks stay (computing the identity); a built-in model's spec describes the shallower network
        sss.finish(delete=bool(spec_of(ctx.model)))
    return model, None


@register("sss", "sparse structure selection: scales on residual blocks and channels (BatchNorm weights, or a "
          "factor on each layer no norm follows) trained to exact zeros by the modified accelerated proximal "
          "gradient (--sparsity); zero blocks are removed",
          check=_needs_training("sss"), reads=("sparsity",), check_model=_sss_selectable(channels=True),
          removes_blocks=True)
def _sss(ctx: PushContext):
    return _sss_push(ctx, channels=True)


@register("sss_blocks", "sparse structure selection of whole residual blocks only (--sparsity): zero blocks are "
          "removed, the prune stage then selects channels with the criterion", check=_needs_training("sss_blocks"),
          reads=("sparsity",), check_model=_sss_selectable(channels=False), removes_blocks=True)
def _sss_blocks(ctx: PushContext):
    return _sss_push(ctx, channels=False)


def _gap_check(config) -> None:
    _needs_training("gap")(config)
    if config.budget_kind not in ("params", "flops"):
        raise ValueError(f"LoopConfig: push='gap' holds groups at uniform widths of a params or FLOPs budget, got "
                         f"budget_kind={config.budget_kind!r}")


def _gap_model_check(config, model, example) -> None:
    from .gap import check_groups
    from .pruning import ChannelGraph

    check_groups(ChannelGraph(model, example, ignore=tuple(config.ignore)))


@register("gap", "scheduled grow-and-prune: runs of layers take turns being dense while the others are held at "
          "the budget's uniform widths (their removed channels at zero), each pruned by L1 when its turn ends; the "
          "cut removes only zeros (--epochs 0: from scratch, recipe gap)", check=_gap_check,
          check_model=_gap_model_check,
          reads=("gap_partitions", "gap_cycles"), selects=True)
def _gap(ctx: PushContext):
    from .gap import GapSchedule
    from .training import fit, recalibrate_batchnorm, training_batches

    c, model = ctx.config, ctx.model
    model.to(ctx.device)
    relative = ctx.relative_goal(model)
    if relative >= 1:  # the model already meets this iteration's goal: plain training
        return fit(model, ctx.splits.train, ctx.epochs, **ctx.fit_kwargs), None
    schedule = GapSchedule(model, ctx.example, relative, c.budget_kind, c.gap_partitions, c.gap_cycles,
                           ignore=tuple(c.ignore), seed=ctx.seed)
    model = fit(model, ctx.splits.train, ctx.epochs, after_step=schedule.after_step, **ctx.fit_kwargs)
    keep = schedule.finish()
    # the last dense partition was silenced after the last step: the running statistics after it are stale
    recalibrate_batchnorm(model, training_batches(ctx.splits.train, c.batch_size, ctx.seed + 1), device=ctx.device)
    return model, keep
