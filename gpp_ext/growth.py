"""The growth methods: how the loop grows a model before pushing and pruning, by name (`LoopConfig.growth`,
`gpp compress --grow METHOD`).

    @growth.register("mine", "what it does, in one line")
    def mine(model, ctx: GrowthContext):     # returns (grown model, history: a list of dicts)
        ...

A handler gets the trained model and a `GrowthContext` (the data, the loop's config, an example batch, and the
loop's `train` and `evaluate`, so a growth trains with the loop's recipe) and returns the grown model and its
history (every net met on the way: what was tried, its validation accuracy and size, whether it was kept).
Registered here:

- `inception`: Inception modules appended stage by stage while validation accuracy improves (`grow.grow`), the
  stages first to last or, with `grow_order="triage"`, most critical first (`triage`); needs a model with
  growable stages (`models.InceptionNet`);
- `planting`: new channels planted in the existing layers of any model the channel graph handles, trained while
  every earlier weight stays fixed, where validation gain per added parameter is highest
  (`planting.grow_by_planting`).

The CLI's choices, `LoopConfig.validate` and the loop read this registry, so a new growth method is one function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._registry import Registry

__all__ = ["GrowthContext", "register", "names", "describe", "get", "check_model", "summary"]

_REGISTRY = Registry("growth", "growth")


@dataclass
class GrowthContext:
    """What a growth handler gets (see the module's doc)."""

    splits: object
    config: object                      # the loop's LoopConfig
    example: torch.Tensor               # an input batch on the model's device
    train: object                       # train(model, after_step=None) -> model: `grow_epochs` with the recipe
    evaluate: object                    # evaluate(model) -> validation accuracy
    progress: bool = False
    device: object = "cpu"
    fit_kwargs: dict = field(default_factory=dict)   # the loop's training recipe (`loop.train_kwargs`)
    # a growth that can resume inside itself calls `checkpoint(model, progress)` after every attempt (the net kept
    # so far, and a JSON-able dict of how far it got); the loop saves both, and after an interruption hands the
    # dict back in `resume` with the model it saved
    checkpoint: object = None
    resume: dict | None = None


def register(name: str, summary: str, check_model=None):
    """Registers a growth handler under `name`; `check_model(model, example, ignore)` (optional) raises
    `ValueError` for a model it cannot grow (`example`: an input batch; `ignore`: the modules the channel graph
    treats as opaque), before any training. Returns the decorator."""
    return _REGISTRY.register(name, summary, check_model=check_model)


names, describe, get = _REGISTRY.names, _REGISTRY.describe, _REGISTRY.get


def check_model(name: str, model: nn.Module, example: torch.Tensor, ignore=()) -> None:
    """`ValueError` when growth method `name` is unknown or cannot grow `model` (fed `example`)."""
    check = _REGISTRY.extra(name, "check_model")
    if check is not None:
        check(model, example, tuple(ignore))


def summary(history: list, config) -> str:
    """What a growth did, in words, from its history (a handler's second return value): how many candidates it
    tried and kept, why it tried none, and the triage's order where one chose it."""
    tried = history[1:]   # the first entry is the trained model itself
    kept = sum(1 for h in tried if h.get("kept"))
    if not tried:
        why = (f"every stage already holds {config.max_modules_per_stage} module"
               f"{'s' * (config.max_modules_per_stage != 1)} (--max-modules-per-stage)"
               if config.growth == "inception" else "nothing could be planted")
        out = f"nothing tried: {why}"
    else:
        out = f"{len(tried)} candidate{'s' * (len(tried) != 1)} tried, {kept} kept"
    first = history[0] if history else {}
    if first.get("triage"):
        drops = ", ".join(f"{r['name']} {r['drop']:+.3f}" for r in sorted(first["triage"], key=lambda r: -r["drop"]))
        out += f"; stages grown in triage order {first['order']} (validation drop when collapsed: {drops})"
    return out


def _inception_check(model: nn.Module, example: torch.Tensor, ignore: tuple) -> None:
    if not hasattr(model, "add_module_to_stage") or not hasattr(model, "stages"):
        raise ValueError(f"growth 'inception' appends Inception modules to growable stages, which "
                         f"{type(model).__name__} does not have (models.InceptionNet has); growth 'planting' grows "
                         f"any model by channels")


@register("inception", "Inception modules appended stage by stage while validation accuracy improves (a model with "
          "growable stages: --model inception)", check_model=_inception_check)
def _inception(model: nn.Module, ctx: GrowthContext):
    from .grow import grow

    c = ctx.config
    done = dict(ctx.resume or {})   # where an interrupted growth got to: its triage, order and history
    if c.grow_order == "triage" and "triage" not in done:  # the stages a single layer replaces worst grow first
        from .triage import stage_order, triage

        triaged = triage(model, ctx.splits, epochs=c.grow_epochs, distill=0.5, seed=c.seed, device=ctx.device,
                         progress=ctx.progress, **ctx.fit_kwargs)
        done.update(triage=[r.to_dict() for r in triaged], order=stage_order(triaged, len(model.stages)))
        if ctx.checkpoint is not None:
            ctx.checkpoint(model, dict(done))

    def after_step(m, history):
        if ctx.checkpoint is not None:
            ctx.checkpoint(m, dict(done, history=[h.to_dict() for h in history]))

    model, history = grow(model, lambda m: ctx.train(m), ctx.evaluate, c.grow_threshold, c.max_modules_per_stage,
                          progress=ctx.progress, order=done.get("order"), history=done.get("history"),
                          after_step=after_step, seed=c.seed)
    out = [dict(h.to_dict(), method="inception") for h in history]
    if "triage" in done:
        out[0]["triage"] = done["triage"]
        out[0]["order"] = done["order"]
    return model, out


def _planting_check(model: nn.Module, example: torch.Tensor, ignore: tuple) -> None:
    from .planting import plantable_groups

    if not plantable_groups(model, example, ignore):
        raise ValueError(f"growth 'planting' widens the prunable layers of a model, and {type(model).__name__} has "
                         f"none it can widen (a layer whose output is the model's output is not widened); grow a "
                         f"model with hidden layers, or run without growth")


@register("planting", "new channels planted in the existing layers where validation gain per added parameter is "
          "highest, trained while every earlier weight stays fixed (any model)", check_model=_planting_check)
def _planting(model: nn.Module, ctx: GrowthContext):
    from .planting import grow_by_planting

    from .training import recalibrate_batchnorm, training_batches

    c = ctx.config

    def recalibrate(m):
        recalibrate_batchnorm(m, training_batches(ctx.splits.train, c.batch_size, c.seed + 1), device=ctx.device)

    model, history = grow_by_planting(model, ctx.example, ctx.train, ctx.evaluate, threshold=c.grow_threshold,
                                      rounds=c.plant_rounds, share=c.plant_share, max_params=c.plant_max_params,
                                      seed=c.seed, progress=ctx.progress, ignore=tuple(c.ignore),
                                      recalibrate=recalibrate)
    return model, [dict(h.to_dict(), method="planting") for h in history]
