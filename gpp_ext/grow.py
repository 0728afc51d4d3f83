"""Growing (docs/design.md §2.7): add Inception modules to the stages of a network while it still pays.

`grow` takes a model with growable stages (`InceptionNet.add_module_to_stage`), a training routine and a
validation measure. Stage by stage, it appends a module (by default with the widths of the stage's last
module, so every existing weight is kept: a warm start), trains the grown model, and keeps it only if
validation accuracy rose by more than `threshold`; otherwise it moves on to the next stage. The history says
what was tried and why it was kept or not.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .cost import count_params

__all__ = ["grow", "GrowthStep"]


@dataclass
class GrowthStep:
    """One attempt: the stage grown, its module count after the attempt, the accuracy and size reached."""

    stage: int
    modules: int
    accuracy: float
    params: int
    kept: bool

    def to_dict(self) -> dict:
        return asdict(self)


def grow(model: nn.Module, train, evaluate, threshold: float = 0.005, max_modules_per_stage: int = 3,
         progress: bool = True, order=None, history=None, after_step=None, seed: int | None = None):
    """Grows `model` while validation accuracy improves; returns `(model, history)`.

    Args:
        model: a trained network with `stages` (a list of `nn.Sequential`) and `add_module_to_stage(i)`.
        train: `train(model) -> model`, fine-tunes a grown candidate (it may train in place).
        evaluate: `evaluate(model) -> float`, validation accuracy in [0, 1].
        threshold: the gain in accuracy a new module must bring to be kept.
        max_modules_per_stage: no stage grows beyond this many modules.
        order: the stages in the order they are grown (default first to last; e.g. `triage.stage_order`).
        history: resume an interrupted growth: the history `after_step` was given last (`GrowthStep`s or their
            dicts), with `model` the net it held then. The net is not evaluated again; growing goes on where the
            history ends (a stage whose last attempt was refused, or that is full, is done).
        after_step: `after_step(model, history)` after every attempt, with the net kept so far and the history
            up to it: save both there and a long growth can resume (`history=`) after an interruption.
        seed: the new module of attempt `k` is initialised from `seed + k` (in a forked random state, the
            caller's left as it was), so a growth is reproducible and a resumed one ends where an uninterrupted
            one does; None draws from the global random state.
    """
    if not hasattr(model, "add_module_to_stage") or not hasattr(model, "stages"):
        raise TypeError(f"grow: {type(model).__name__} has no growable stages (use models.InceptionNet)")
    if threshold < 0 or max_modules_per_stage < 1:
        raise ValueError(f"grow: threshold must be >= 0 and max_modules_per_stage >= 1, got {threshold}, "
                         f"{max_modules_per_stage}")
    order = list(range(len(model.stages))) if order is None else [int(s) for s in order]
    if sorted(order) != list(range(len(model.stages))):
        raise ValueError(f"grow: order must list each of the {len(model.stages)} stages once, got {order}")
    if history:
        history = [h if isinstance(h, GrowthStep) else GrowthStep(**h) for h in history]
        kept = [h for h in history if h.kept]
        if history[0].stage != -1 or not history[0].kept or kept[-1].params != count_params(model):
            raise ValueError(f"grow: history must start with the trained net's step (stage -1, kept) and end at the "
                             f"net given ({count_params(model):,} parameters), got one starting at stage "
                             f"{history[0].stage} whose last kept net has "
                             f"{kept[-1].params if kept else 0:,} parameters")
        best = kept[-1].accuracy
        refused = {h.stage for h in history if not h.kept}
    else:
        best = float(evaluate(model))
        history, refused = [GrowthStep(-1, 0, best, count_params(model), True)], set()
        if after_step is not None:
            after_step(model, list(history))
    bar = tqdm(total=len(model.stages) * max_modules_per_stage, desc="growing", leave=False,
               disable=None if progress else True)  # None: bars on terminals only
    bar.update(len(history) - 1)
    try:
        for stage in order:
            while stage not in refused and len(model.stages[stage]) < max_modules_per_stage:
                candidate = copy.deepcopy(model)
                if seed is None:
                    candidate.add_module_to_stage(stage)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed + len(history))
                        candidate.add_module_to_stage(stage)
                candidate = train(candidate) or candidate
                accuracy = float(evaluate(candidate))
                kept = accuracy > best + threshold
                history.append(GrowthStep(stage, len(candidate.stages[stage]), accuracy, count_params(candidate),
                                          kept))
                bar.update(1)
                if kept:
                    model, best = candidate, accuracy
                else:
                    refused.add(stage)
                if after_step is not None:
                    after_step(model, list(history))
    finally:
        bar.close()
    return model, history
