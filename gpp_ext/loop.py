"""`GrowPushPrune`: the whole method as one resumable loop (docs/design.md §2.8).

    [grow while accuracy improves] -> train -> repeat { push -> prune -> recalibrate BN -> fine-tune }
    until the size target is reached or validation accuracy falls below the floor.

An iteration is built from two functions that the benchmarks call too, so that what is benchmarked is what
users run: `push_stage` and `prune_stage`. The push is a registered method (`gpp_ext.pushes`): the default
`push="fade"` (v2, docs/design.md §2.6: the removal set of the coming cut, chosen by the criterion, fades to
exactly zero while any push terms act on the kept features and, optionally, the model distils from itself as it
was before the push; the cut then removes only zeros), `push="loss"` (v1: the `PushLoss` terms on the
pre-decision features), `push="none"` (plain cross-entropy) or a peer's. The prune stage cuts by a threshold
`eta` raised every iteration, or with `schedule="budget"`
toward `target ** (i / max_iterations)` of the base cost (parameters or FLOPs) at iteration `i`. With
`epoch_budget` the user sets the training after the base once: it is split evenly over the iterations,
`push_share` of each for the push and the rest for fine-tuning.

Every stage ends with a checkpoint written atomically to `out_dir/checkpoint.pt` (architecture as data plus
weights, metrics so far, the stage reached; loadable with `weights_only=True`). `run(resume=True)` continues
after the last completed stage. Every stage draws its randomness from generators seeded by `(seed, stage)`,
so a resumed run gives the same results as one that was never interrupted. The accuracy-first model (best
validation accuracy among the pruned ones) and the size-first model (smallest one above the floor) are kept;
the final model is the size-first one when any iteration stayed above the floor.

Under `torch.distributed` (e.g. `torchrun --nproc-per-node 2 -m gpp_ext.cli compress ...`), every process runs
the loop on the same model: training stages run under DistributedDataParallel, each process taking its slice of
the same global batches (`RankSlicedBatchSampler`, so the global batch is `config.batch_size` whatever the
number of processes), and the model is wrapped afresh after every structural change; the analysis is split
over the processes and combined exactly, rank 0's pruning decision is applied everywhere, metrics are measured
on rank 0 and shared, and only rank 0 writes checkpoints (resume reads them on rank 0 and shares them).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import distributed as gdist
from . import io
from .cost import count_flops, count_params
from . import growth, pushes
from .pushes import stage_epochs
from .fade import FADE_SCHEDULES
from .latency import RUNTIMES, model_cost, table_for as latency_table
from .pruning import criteria, prune
from .pruning.allocation import ALLOCATIONS
from .classifier import find_classifier
from .training import (LR_SCHEDULES, OPTIMIZERS, compare_latency, evaluate, fit, latency_ms, recalibrate_batchnorm,
                       training_batches)
from .models.sources import build_source, is_code_source, spec_of
from .run_folder import RunFolder, run_identity

__all__ = ["LoopConfig", "GrowPushPrune", "push_stage", "prune_stage", "stage_seed", "stage_epochs", "stage_goal",
           "train_kwargs", "run_settings", "same_run"]

SCHEDULES = ("eta", "budget")
FINAL_FINETUNE = ("train", "train+val")
GROW_ORDERS = ("stages", "triage")
# What a run leaves in its output folder (the loop writes the checkpoint; `report.write_reports` the rest).


# Settings added after checkpoints were first written, with the value the runs that wrote them used: a resume
# compares an older checkpoint's configuration with these, not with today's defaults.
_ADDED_SINCE = dict(lr_schedule="constant", optimizer="adamw", warmup=0.1, floor=0.0, fade_fixed_widths=False,
                    target_latency=None, latency_runtime="eager", latency_batch=1, final_finetune="train",
                    finetune_distill=0.0, sparsity=1e-4, growth="inception", plant_rounds=2, plant_share=0.25,
                    plant_max_params=2.0, grow_order="stages", grow_distill=0.0, gap_partitions=2, gap_cycles=1,
                    fade_gradual=False, push_optimizer=None, push_lr=None)


@dataclass
class LoopConfig:
    """Knobs of the loop. Budgets are fractions of the base model; accuracies are fractions in [0, 1]."""

    epochs: int = 5                  # initial training
    push_epochs: float = 0.45        # per iteration (fractions allowed): 15% of the default 3
    finetune_epochs: float = 2.55    # per iteration
    epoch_budget: float | None = None  # if set: all training after the base, split over the iterations
    push_share: float = 0.15         # with epoch_budget: the push's share of each iteration
    batch_size: int = 128
    lr: float = 4e-3                 # the peak of every phase's schedule
    weight_decay: float = 1e-4
    lr_schedule: str = "onecycle"    # every phase's schedule (training.LR_SCHEDULES), each phase one whole cycle
    optimizer: str = "adamw"         # "adamw" or "sgd" (momentum 0.9, Nesterov)
    warmup: float = 0.1              # warm-up share of each phase ("warmup-cosine", "onecycle")
    target_params: float = 0.1       # stop once params <= target_params * base params
    target_flops: float | None = None
    target_latency: float | None = None  # budget_kind "latency": this fraction of the base model's latency
    latency_runtime: str = "eager"   # where latency is measured (per-layer tables): "eager" or "onnxruntime"
    latency_batch: int = 1           # the batch size the latency is for
    accuracy_floor: float = 0.02     # stop once validation accuracy < base accuracy - accuracy_floor
    schedule: str = "budget"         # "budget": iteration i of n keeps target_params ** (i / n) of the base;
                                     # "eta": prune below eta * std per layer, eta raised every iteration
    eta_start: float = 0.1           # pruning threshold eta * std, raised every iteration
    eta_step: float = 0.1
    max_iterations: int = 1
    cuts: int = 1                    # cuts per prune stage, each analysed afresh (schedule "budget")
    budget_kind: str = "params"      # what schedule "budget" counts: "params" (target_params), "flops"
                                     # (target_flops) or "latency" (target_latency)
    allocation: str = "fisher"       # schedule "budget": "fisher" (the cost-aware solver on a width grid, each
                                     # layer weighted by the loss's mask Fisher information), "solver" (the same,
                                     # every layer weighted alike), "genetic" (a genetic search on data), "search"
                                     # (the solver calibrated on data), "global" threshold, "uniform" fraction
    floor: float = 0.05              # schedule "budget": every group keeps at least this share of its channels
    normalize: str = "mean"          # utilities divided by their layer's mean ("mean") or as they are ("none")
    push: str = "fade"               # a registered push method (gpp_ext.pushes): "fade", "none", "loss", ...
    fade_reselect: int = 4           # push "fade": selections of the removal set during the push
    fade_schedule: str = "linear"    # push "fade": "linear" or "cosine"
    fade_end: float = 0.5            # push "fade": share of the push at which the set reaches zero
    fade_fixed_widths: bool = True   # push "fade": the first selection's widths stay (later ones pick channels)
    fade_gradual: bool = False       # push "fade": the removal set grows over the selections (needs fixed widths)
    distill: float = 0.0             # weight of distillation from the model as it was before the push
    finetune_distill: float = 0.0    # weight of distillation from the base model in every fine-tuning
    sparsity: float = 1e-4           # weight of a push method's sparsity penalty (pushes "hgs", "sss")
    push_optimizer: str | None = None   # push "hgs": the optimiser of its sparse training (None: `optimizer`)
    push_lr: float | None = None     # push "hgs": that training's peak learning rate (None: `lr`)
    gap_partitions: int = 2          # push "gap": runs of layers that take turns being dense
    gap_cycles: int = 1              # push "gap": how many times each run is dense
    temperature: float = 4.0
    alpha: float = 0.0               # push-term weights (pushes "loss", "fade"; docs/design.md §2.8): off by
    beta: float = 0.0                # default (the validated recipe); recipe v1 uses 0.3, 0.3, 0.05
    gamma: float = 0.0
    separation: str = "fisher"
    criterion: str = "taylor"        # which channels go: ahead of "lda" on the benchmark's validation by 0.0003
    neurons: float = 0.75            # pre-decision neurons kept for tracing
    grow: bool = False
    growth: str = "inception"        # with grow: a growth method (gpp_ext.growth): "inception", "planting"
    grow_threshold: float = 0.005
    max_modules_per_stage: int = 2
    grow_epochs: int = 1
    grow_order: str = "stages"       # growth "inception": stages first to last, or most critical first ("triage")
    grow_distill: float = 0.0        # weight of distillation from the loop's `teacher` while growing (0: off)
    plant_rounds: int = 2            # growth "planting": rounds at most
    plant_share: float = 0.25        # growth "planting": share of each group's width planted per round
    plant_max_params: float = 2.0    # growth "planting": the grown model's parameters at most this x the model's
    seed: int = 0
    ignore: tuple = ()               # modules the channel graph treats as opaque (their channels are kept)
    round_to: int = 1                # every pruned width a multiple of this (8 or 16 suit CPU/ONNX kernels)
    final_finetune: str = "train"    # the last fine-tuning's data: "train", or "train+val" (the validation
                                     # split joins it; the final validation figures are then seen data)
    amp: bool = False                # mixed-precision training (bfloat16 autocast on CUDA)

    def validate(self) -> None:
        numbers = ("epochs", "push_epochs", "finetune_epochs", "epoch_budget", "push_share", "batch_size", "lr",
                   "weight_decay", "target_params", "target_flops", "accuracy_floor", "eta_start", "eta_step",
                   "max_iterations", "cuts", "fade_reselect", "fade_end", "distill", "temperature", "alpha", "beta",
                   "gamma", "neurons", "grow_threshold", "max_modules_per_stage", "grow_epochs", "seed", "floor",
                   "warmup", "target_latency", "latency_batch", "finetune_distill", "sparsity", "plant_rounds",
                   "plant_share", "plant_max_params", "grow_distill", "gap_partitions", "gap_cycles")
        for name in numbers:  # NaN passes every comparison below, so finiteness comes first
            value = getattr(self, name)
            if value is None and name in ("epoch_budget", "target_flops", "target_latency"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LoopConfig: {name} must be a finite number, got {value!r}")
        for name in ("batch_size", "max_iterations", "cuts", "fade_reselect", "max_modules_per_stage", "seed",
                     "latency_batch", "plant_rounds", "gap_partitions", "gap_cycles"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"LoopConfig: {name} must be an int, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.weight_decay < 0 or min(self.alpha, self.beta, self.gamma) < 0 or self.seed < 0:
            raise ValueError(f"LoopConfig: lr must be > 0 and weight_decay, alpha, beta, gamma and seed >= 0, got "
                             f"lr={self.lr!r}, weight_decay={self.weight_decay!r}, alpha={self.alpha!r}, "
                             f"beta={self.beta!r}, gamma={self.gamma!r}, seed={self.seed!r}")
        if self.neurons <= 0 or isinstance(self.neurons, float) and self.neurons > 1:
            raise ValueError(f"LoopConfig: neurons must be a count (int >= 1) or a fraction in (0, 1], got "
                             f"{self.neurons!r}")
        if self.epochs < 0 or self.push_epochs < 0 or self.finetune_epochs < 0 or self.batch_size < 1:
            raise ValueError("LoopConfig: epochs must be >= 0 and batch_size >= 1")
        if not 0 < self.target_params <= 1 or (self.target_flops is not None and not 0 < self.target_flops <= 1):
            raise ValueError(f"LoopConfig: target_params/target_flops must be in (0, 1], got {self.target_params}, "
                             f"{self.target_flops}")
        if not 0 <= self.accuracy_floor < 1 or self.max_iterations < 1 or self.eta_start < 0:
            raise ValueError("LoopConfig: accuracy_floor must be in [0, 1), max_iterations >= 1, eta_start >= 0")
        if self.separation not in ("fisher", "lda"):
            raise ValueError(f"LoopConfig: separation must be 'fisher' or 'lda', got {self.separation!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LoopConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cuts < 1 or (self.cuts > 1 and self.schedule != "budget"):
            raise ValueError(f"LoopConfig: cuts must be >= 1, and more than one cut per stage needs "
                             f"schedule='budget' (got cuts={self.cuts}, schedule={self.schedule!r})")
        if not isinstance(self.criterion, str) or self.criterion not in criteria.names():
            raise ValueError(f"LoopConfig: criterion must be one of {tuple(criteria.names())}, got "
                             f"{self.criterion!r}")
        if self.push not in pushes.names():
            raise ValueError(f"LoopConfig: push must be one of {pushes.names()}, got {self.push!r}")
        pushes.check(self)
        if self.push_optimizer not in (None, *OPTIMIZERS) or not (self.push_lr is None or self.push_lr > 0):
            raise ValueError(f"LoopConfig: push_optimizer must be None or one of {OPTIMIZERS} and push_lr None or > 0, "
                             f"got {self.push_optimizer!r}, {self.push_lr!r}")
        if self.lr_schedule not in LR_SCHEDULES or self.optimizer not in OPTIMIZERS or not 0 <= self.warmup < 1:
            raise ValueError(f"LoopConfig: lr_schedule must be one of {LR_SCHEDULES}, optimizer one of {OPTIMIZERS} "
                             f"and warmup in [0, 1), got {self.lr_schedule!r}, {self.optimizer!r}, {self.warmup!r}")
        if self.budget_kind not in ("params", "flops", "latency") or \
                (self.budget_kind == "flops" and self.target_flops is None) or \
                (self.budget_kind == "latency" and self.target_latency is None):
            raise ValueError(f"LoopConfig: budget_kind must be 'params', 'flops' (which needs target_flops) or "
                             f"'latency' (which needs target_latency), got {self.budget_kind!r}")
        if self.target_latency is not None and (self.budget_kind != "latency" or not 0 < self.target_latency <= 1):
            raise ValueError(f"LoopConfig: target_latency (a fraction in (0, 1] of the base model's latency, got "
                             f"{self.target_latency!r}) needs budget_kind='latency' (got {self.budget_kind!r})")
        if self.budget_kind == "latency" and self.schedule != "budget":
            raise ValueError("LoopConfig: a latency budget needs schedule='budget'")
        if self.latency_runtime not in RUNTIMES or self.latency_batch < 1:
            raise ValueError(f"LoopConfig: latency_runtime must be one of {RUNTIMES} and latency_batch >= 1, got "
                             f"{self.latency_runtime!r}, {self.latency_batch!r}")
        if self.fade_gradual and not self.fade_fixed_widths:
            raise ValueError("LoopConfig: fade_gradual=True needs fade_fixed_widths=True (the removal set grows "
                             "towards the widths of the first selection)")
        if self.fade_schedule not in FADE_SCHEDULES or not 0 < self.fade_end <= 1 or self.fade_reselect < 1:
            raise ValueError(f"LoopConfig: fade_schedule must be one of {FADE_SCHEDULES}, fade_end in (0, 1] and "
                             f"fade_reselect >= 1, got fade_schedule={self.fade_schedule!r}, "
                             f"fade_end={self.fade_end!r}, fade_reselect={self.fade_reselect!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"LoopConfig: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"LoopConfig: floor must be in [0, 1), got {self.floor!r}")
        if self.final_finetune not in FINAL_FINETUNE:
            raise ValueError(f"LoopConfig: final_finetune must be one of {FINAL_FINETUNE}, got {self.final_finetune!r}")
        if self.normalize not in ("mean", "none"):
            raise ValueError(f"LoopConfig: normalize must be 'mean' or 'none', got {self.normalize!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"LoopConfig: round_to must be an int >= 1, got {self.round_to!r}")
        if self.sparsity < 0:
            raise ValueError(f"LoopConfig: sparsity must be >= 0, got {self.sparsity!r}")
        if self.distill < 0 or self.finetune_distill < 0 or self.grow_distill < 0 or self.temperature <= 0:
            raise ValueError(f"LoopConfig: distill, finetune_distill and grow_distill must be >= 0 and temperature > "
                             f"0, got {self.distill!r}, {self.finetune_distill!r}, {self.grow_distill!r}, "
                             f"{self.temperature!r}")
        if (self.epoch_budget is not None and self.epoch_budget < 0) or not 0 <= self.push_share <= 1:
            raise ValueError("LoopConfig: epoch_budget must be >= 0 and push_share in [0, 1]")
        if self.growth not in growth.names() or self.grow_order not in GROW_ORDERS:
            raise ValueError(f"LoopConfig: growth must be one of {growth.names()} and grow_order one of "
                             f"{GROW_ORDERS}, got {self.growth!r}, {self.grow_order!r}")
        if self.grow_epochs < 0 or (self.grow and not self.grow_epochs > 0):
            raise ValueError(f"LoopConfig: grow_epochs must be >= 0, and > 0 with grow=True (a grown candidate must "
                             f"train before it is judged), got {self.grow_epochs!r}")
        if self.gap_partitions < 1 or self.gap_cycles < 1:
            raise ValueError(f"LoopConfig: gap_partitions and gap_cycles must be >= 1, got {self.gap_partitions!r}, "
                             f"{self.gap_cycles!r}")
        if self.plant_rounds < 1 or not 0 < self.plant_share <= 4 or not self.plant_max_params > 1:
            raise ValueError(f"LoopConfig: plant_rounds must be >= 1, plant_share in (0, 4] and plant_max_params "
                             f"> 1, got {self.plant_rounds!r}, {self.plant_share!r}, {self.plant_max_params!r}")


def run_settings(settings) -> dict:
    """The settings a run of `settings` (a `LoopConfig`, or one as a dict, e.g. a recorded one) reads: all but
    the push settings its push method never reads (`pushes.reads`), the selection settings of a push that decides
    the keep-set itself (`pushes.selects`), the per-iteration epochs `epoch_budget`
    replaces (or `push_share` without it) and `ignore`. Two configurations with equal run settings run the same
    loop."""
    d = asdict(settings) if isinstance(settings, LoopConfig) else dict(settings)
    push = d.get("push", "none")
    read = pushes.reads(push) if push in pushes.names() else pushes.PUSH_SETTINGS  # unknown: assume all count
    unread = set(pushes.PUSH_SETTINGS) - set(read)
    if push in pushes.names() and pushes.selects(push):  # the push decides the keep-set: no selection runs
        unread |= set(pushes.SELECTION_SETTINGS)
    unread |= {"push_epochs", "finetune_epochs"} if d.get("epoch_budget") is not None else {"push_share"}
    return {k: v for k, v in d.items() if k not in unread and k != "ignore"}


def same_run(stored, current) -> bool:
    """Whether two configurations (`LoopConfig`s or dicts, e.g. one recorded before a field existed) run the same
    loop: they agree on every setting the run reads (`run_settings`), a field one of them lacks counting as the
    value runs used before it was added (`_ADDED_SINCE`)."""
    stored, current = run_settings(stored), run_settings(current)
    missing = object()
    return all(stored.get(k, _ADDED_SINCE.get(k, missing)) == current.get(k, _ADDED_SINCE.get(k, missing))
               for k in set(stored) | set(current))


def stage_goal(config: LoopConfig, iteration: float) -> float:
    """With `schedule="budget"`: the fraction of the base cost (`budget_kind`) the model keeps after iteration
    `iteration` (fractions name the cuts within an iteration)."""
    target = {"flops": config.target_flops, "latency": config.target_latency}.get(config.budget_kind,
                                                                                  config.target_params)
    return target ** (iteration / config.max_iterations)


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` of a run seeded `seed`: every stage draws from its own stream, so a resumed
    run gives what an uninterrupted one would."""
    return seed * 1_000_003 + stage


def train_kwargs(config: LoopConfig) -> dict:
    """The `fit` arguments every phase of the loop shares (base training, growing, push, fine-tuning): one
    recipe, so each phase warms up and anneals the same way."""
    return dict(lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
                lr_schedule=config.lr_schedule, optimizer=config.optimizer, warmup=config.warmup, amp=config.amp)


def push_stage(model: nn.Module, splits, config: LoopConfig, seed: int, device="cpu", progress: bool = False,
               desc: str = "push", iteration: int = 1, base_cost: int | None = None):
    """The push stage of iteration `iteration`: returns `(model, keep)`.

    Trains for the iteration's push epochs (`stage_epochs`) with the loop's recipe (`train_kwargs`) and the
    config's push method (`gpp_ext.pushes`: "none", "loss", "fade", or one you registered), distilling from the
    model as it was before the push when `config.distill > 0`. `keep` is the keep-set the push prepared for the
    coming cut (the fade's), else None.
    """
    from . import pushes

    epochs, _ = stage_epochs(config)
    teacher = copy.deepcopy(model).eval() if config.distill > 0 and epochs > 0 else None
    common = dict(train_kwargs(config), seed=seed, teacher=teacher,
                  distill=config.distill if teacher is not None else 0.0, temperature=config.temperature,
                  device=device, progress=progress, desc=desc)
    context = pushes.PushContext(model, splits, config, seed, device, epochs, stage_goal(config, iteration),
                                 base_cost, common)
    # What a push method prepares before it trains (the fade's first selection: a criterion's or a width search's
    # draws, dropout in their passes) starts from the stage's seed, so a resumed run prepares as an uninterrupted one.
    torch.manual_seed(seed)
    return pushes.get(config.push)(context)


def prune_stage(model: nn.Module, splits, config: LoopConfig, iteration: int, base_params: int, seed: int,
                device="cpu", progress: bool = False, keep: dict | None = None, recalibrate: bool = True):
    """The prune stage of iteration `iteration` (from 1): returns `(model, [PruneReport, ...])`.

    With `keep` (from a fading `push_stage`) one cut of exactly those channels. Otherwise, with
    `schedule="eta"` one prune below `eta = eta_start + (iteration - 1) * eta_step`; with `schedule="budget"`
    the model is cut toward `stage_goal(iteration)` of the base cost (`base_params` is the base model's cost
    in `budget_kind` units) in `config.cuts` steps (geometric, each analysed afresh; a step the model already
    meets is skipped). Each prune recalibrates BatchNorm on training batches drawn with `seed` unless
    `recalibrate=False`.
    """
    torch.manual_seed(seed)
    loader = training_batches(splits.train, config.batch_size, seed)
    example = torch.zeros(2, *splits.input_shape, device=device)
    kwargs = dict(criterion=config.criterion, neurons=config.neurons, progress=progress, recalibrate=recalibrate,
                  ignore=tuple(config.ignore), round_to=config.round_to, seed=seed)
    table = latency_table(config)
    if keep is not None:
        model, report = prune(model, loader, example, splits.num_classes, keep=keep, **kwargs)
        return model, [report]
    if config.schedule == "eta":
        eta = config.eta_start + (iteration - 1) * config.eta_step
        model, report = prune(model, loader, example, splits.num_classes, eta=eta, **kwargs)
        return model, [report]
    reports = []
    for cut in range(1, config.cuts + 1):
        goal = stage_goal(config, iteration - 1 + cut / config.cuts)
        relative = goal * base_params / model_cost(model, config.budget_kind, example, table)
        if relative < 1:
            model, report = prune(model, loader, example, splits.num_classes, method="budget", budget=relative,
                                  budget_kind=config.budget_kind, allocation=config.allocation,
                                  normalize=config.normalize, floor=config.floor, latency=table, **kwargs)
            reports.append(report)
    return model, reports


@dataclass
class _State:
    stage: int = 0                   # stages completed
    base: dict = field(default_factory=dict)
    before_growth: dict | None = None   # with growth: the trained model's metrics (`base` is the grown model's)
    settled: bool = False               # the base was measured after BatchNorm's re-estimate (`_train(settle=)`;
                                        # False in checkpoints written before the loop did it)
    iterations: list = field(default_factory=list)
    growth: list = field(default_factory=list)
    best_accuracy: dict | None = None   # {"metrics": ..., "model": state}
    best_size: dict | None = None
    stopped: str = ""
    pending_keep: dict | None = None    # the faded set's keep-set between a fading push and its cut
    end_of_push: float | None = None    # validation accuracy at the end of the last push
    run_id: str = ""                    # names this run in its reports (`gpp report` matches them up)
    base_model: dict | None = None      # the base model (payload), timed beside the compact one at the end
    growing: dict | None = None         # a growth in progress: how far it got (the checkpoint's model is its net)


class GrowPushPrune:
    """Runs the grow-push-prune loop on `model` for the task in `splits` (a `gpp_ext.data.DataSplits`).

    Args:
        model: the base network (a built-in model, or any traceable classifier with `factory` given).
        splits: train / val / test data sets and their shapes.
        config: a `LoopConfig`.
        out_dir: where checkpoints go (and the caller's reports).
        factory: rebuilds a user model's unpruned architecture (built-in models need none).
        progress: tqdm bars on every long step (on a terminal; redirected output stays clean).
        device: where training, analysis and pruning run (latency is measured on the CPU).
        onnx_latency: at the end, export base and compact model and time them in ONNX Runtime (a few seconds);
            None reads `$GPP_EXT_ONNX_LATENCY` ("0" turns it off; the test suite does), default on.
        teacher: a trained model (a larger one) to distil from while growing, with weight `config.grow_distill`
            (planting's teacher). It is not saved with the checkpoints: pass it again to resume.
        log: called with one line of text as each stage ends (the base's and each iteration's size and
            accuracy, where a resumed run goes on from, why the run stopped), on rank 0 only; `gpp compress`
            prints these lines, so a run whose output goes to a file shows how far it got. None: silent.
    """

    def __init__(self, model: nn.Module, splits, config: LoopConfig | None = None, out_dir: str = "runs/gpp",
                 factory=None, progress: bool = True, device="cpu", onnx_latency: bool | None = None,
                 teacher: nn.Module | None = None, log=None):
        self.config = config or LoopConfig()
        self.config.validate()
        # Everything that would otherwise fail after the compute is spent is checked here, before any training.
        if not isinstance(model, nn.Module):
            raise TypeError(f"GrowPushPrune: model must be an nn.Module, got {type(model).__name__}")
        if factory is not None and not callable(factory):
            raise TypeError(f"GrowPushPrune: factory must be a callable returning the unpruned architecture, got "
                            f"{type(factory).__name__}")
        if factory is None and not spec_of(model):
            raise TypeError(f"GrowPushPrune: {type(model).__name__} is not a built-in model nor built from a source "
                            f"(gpp_ext.models.build_source) and has no spec(), so "
                            f"its checkpoints and compact model cannot be rebuilt from data alone; pass factory=<a "
                            f"callable returning the unpruned architecture>, e.g. factory=lambda: MyNet()")
        spec = spec_of(model)
        if factory is None and isinstance(spec, dict) and is_code_source(spec.get("name")):
            # The model was built from code the caller named (`build_source`, `--model file.py:factory`): its
            # checkpoints are rebuilt by that same code, never by whatever a checkpoint's spec names.
            factory = functools.partial(build_source, spec["name"], kwargs=dict(spec.get("kwargs") or {}))
        self.model, self.splits, self.out_dir, self.factory = model, splits, os.fspath(out_dir), factory
        self.device = torch.device(device)
        self.onnx_latency = onnx_latency if onnx_latency is not None else \
            os.environ.get("GPP_EXT_ONNX_LATENCY", "1") != "0"
        self.progress = progress and gdist.rank() == 0  # one set of bars per job
        if log is not None and not callable(log):
            raise TypeError(f"GrowPushPrune: log must be a callable taking a line of text, got {type(log).__name__}")
        self.log = log if gdist.rank() == 0 else None
        self.state = _State()
        self.example = torch.zeros(2, *splits.input_shape, device=self.device)
        if self.config.amp and self.device.type != "cuda":
            raise ValueError(f"GrowPushPrune: amp (mixed precision, --amp) needs a CUDA device, got {self.device}")
        self._check_model()
        self.teacher = self._check_teacher(teacher)
        self.folder = RunFolder(self.out_dir, run_identity(model, splits))

    def _check_teacher(self, teacher):
        """The growth teacher, checked before any training: given exactly when `grow_distill` asks for one, and
        a classifier of the data's inputs and classes."""
        cfg = self.config
        if (cfg.grow and cfg.grow_distill > 0) != (teacher is not None):
            raise ValueError("GrowPushPrune: a teacher is distilled from while growing, so grow=True with "
                             "grow_distill > 0 needs teacher=<a trained model> and a teacher needs them (gpp: "
                             f"--grow METHOD --grow-distill W --teacher FILE); got grow={cfg.grow}, grow_distill="
                             f"{cfg.grow_distill}, teacher={'given' if teacher is not None else 'none'}")
        if teacher is None:
            return None
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"GrowPushPrune: teacher must be an nn.Module, got {type(teacher).__name__}")
        teacher = teacher.to(self.device).eval()
        try:
            with torch.no_grad():
                out = teacher(self.example)
        except Exception as error:
            raise ValueError(f"GrowPushPrune: the teacher does not accept the data's inputs of shape "
                             f"{list(self.splits.input_shape)} ({type(error).__name__}: {error})") from error
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, self.splits.num_classes):
            raise ValueError(f"GrowPushPrune: the teacher must return logits [batch, {self.splits.num_classes}]")
        return teacher

    def _check_model(self) -> None:
        """The model's head has one output per class of the data, and it accepts the data's inputs."""
        classifier = find_classifier(self.model)
        head = dict(self.model.named_modules())[classifier].out_features
        if head != self.splits.num_classes:
            raise ValueError(f"GrowPushPrune: the model's classifier {classifier!r} has {head} outputs but the data "
                             f"({self.splits.name}) has {self.splits.num_classes} classes; build the model with "
                             f"num_classes={self.splits.num_classes}")
        width, neurons = dict(self.model.named_modules())[classifier].in_features, self.config.neurons
        count = neurons if isinstance(neurons, int) else int(round(float(neurons) * width))
        if self.config.criterion in ("lda", "fisher") and not 1 <= count <= width:
            raise ValueError(f"GrowPushPrune: neurons={neurons!r} keeps {count} of the {width} pre-decision neurons "
                             f"(the inputs of the classifier {classifier!r}) that criterion "
                             f"{self.config.criterion!r} traces; give a count in 1..{width} or a fraction")
        was_training = self.model.training
        self.model.to(self.device).eval()
        try:
            with torch.no_grad():
                out = self.model(self.example)
        except Exception as error:
            spec = spec_of(self.model) or {}
            hint = ""
            if "input_size" in spec.get("kwargs", {}) and len(self.splits.input_shape) == 3:  # a built-in's size
                hint = (f"; build it for these inputs: models.build({spec.get('name', '...')!r}, in_channels="
                        f"{self.splits.input_shape[0]}, input_size={self.splits.input_shape[-1]})")
            raise ValueError(f"GrowPushPrune: the model does not accept the data's inputs of shape "
                             f"{list(self.splits.input_shape)} ({type(error).__name__}: {error}){hint}") from error
        finally:
            self.model.train(was_training)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, self.splits.num_classes):
            raise ValueError(f"GrowPushPrune: the model must return logits [batch, {self.splits.num_classes}], got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        # The channel graph every prune stage builds: a model it cannot handle (torch.roll, einsum, an `if` on
        # the data) is refused now, not after the base model has been trained; first, since the growth's and the
        # push's checks trace it too, and only this message says what to do (--ignore).
        from .pruning import ChannelGraph

        try:
            graph = ChannelGraph(self.model, self.example, ignore=tuple(self.config.ignore))
        except ValueError as error:
            raise ValueError(f"GrowPushPrune: the model cannot be pruned as it is: {error} (gpp: --ignore "
                             f"NAME[,NAME])") from error
        if self.config.grow:
            growth.check_model(self.config.growth, self.model, self.example, self.config.ignore)
        pushes.check_model(self.config, self.model, self.example)
        if not self.config.grow:  # a grown model is another model: its smallest cut is known after the growth
            self._check_reachable(graph)

    def _check_reachable(self, graph) -> None:
        """Refuses, before any training, a size target below the smallest model pruning can reach
        (`unreachable`), rather than cutting the model to nothing and blaming the accuracy floor."""
        problem = unreachable(graph, self.config, self.progress)
        if problem:
            raise ValueError(f"GrowPushPrune: {problem}")

    # -------------------------------------------------------------------------------------------- helpers
    def _train(self, model: nn.Module, epochs: int, stage: int, desc: str, dataset=None, settle: bool = False,
               **extra) -> nn.Module:
        """`fit` with the loop's recipe. With `settle`, BatchNorm's statistics are then re-estimated for the
        final weights (`recalibrate_batchnorm`): the running averages of a short training (tens of steps on a
        small data set) still carry their initial values and the early weights' statistics, and a model measured
        with them can score at chance although it has learnt (the base model, whose accuracy sets the floor;
        each grown candidate, compared with it). The fine-tunings need not: each follows a cut that
        recalibrated."""
        cfg = self.config
        model = fit(model, self.splits.train if dataset is None else dataset, epochs,
                    seed=stage_seed(cfg.seed, stage), device=self.device,
                    progress=self.progress, desc=desc, **train_kwargs(cfg), **extra)
        if settle and epochs > 0:
            self._re_estimate(model, stage)
        return model

    def _re_estimate(self, model: nn.Module, stage: int) -> None:
        """BatchNorm's statistics of `model` re-estimated on training batches drawn from stage `stage`'s seed."""
        recalibrate_batchnorm(model, training_batches(self.splits.train, self.config.batch_size,
                                                      stage_seed(self.config.seed, stage) + 1), device=self.device)

    def _teacher(self) -> dict:
        """`fit` arguments for distillation from the base model in fine-tuning (`finetune_distill`), or none."""
        cfg = self.config
        if cfg.finetune_distill <= 0 or self.state.base_model is None:
            return {}
        if getattr(self, "_base_teacher", None) is None:
            self._base_teacher = io.from_payload(self.state.base_model, self.factory).to(self.device).eval()
        return {"teacher": self._base_teacher, "distill": cfg.finetune_distill, "temperature": cfg.temperature}

    def _metrics(self, model: nn.Module, **extra) -> dict:
        """Size, accuracy and latency, measured on rank 0 (latency would suffer from processes running beside
        it) and shared with every process."""
        metrics = self._measure(model, **extra) if gdist.rank() == 0 else None
        return gdist.broadcast_object(metrics)

    def _measure(self, model: nn.Module, **extra) -> dict:
        shape = self.splits.input_shape
        if self.config.budget_kind == "latency":  # the latency the budget counts: the table's, on the CPU
            extra = {"latency": model_cost(copy.deepcopy(model).cpu(), "latency", self.example.cpu(),
                                           latency_table(self.config, self.progress)), **extra}
        return {"params": count_params(model), "flops": count_flops(model, self.example),
                "val_accuracy": evaluate(model, self.splits.val, device=self.device),
                "test_accuracy": evaluate(model, self.splits.test, device=self.device),
                "latency_ms_b1": latency_ms(model, shape, 1), "latency_ms_b64": latency_ms(model, shape, 64, 5),
                **extra}

    def _save(self) -> None:
        self.folder.save(asdict(self.config), asdict(self.state), io.payload(self.model))

    def _resume(self) -> bool:
        data = self.folder.resume(asdict(self.config), {**asdict(LoopConfig()), **_ADDED_SINCE})
        if data is None:
            return False
        self.state = _State(**data["state"])
        self.model = io.from_payload(data["model"], self.factory).to(self.device)
        if self.state.stage == 1 and self.state.growing is None and not self.state.settled and self.config.epochs > 0:
            self._settle_base()   # (inside a growth, the checkpointed model is the net kept so far, not the base)
        return True

    def _settle_base(self) -> None:
        """A checkpoint whose base was trained before the loop re-estimated BatchNorm after training, resumed
        before anything was measured against it: the base is re-estimated and measured again, so the floor and
        the growth compare with what the model does. (Later stages keep the reference they started with.)"""
        self._re_estimate(self.model, 1)   # as the base's training (stage 1) now ends
        self.state.base = self._metrics(self.model)
        self.state.base_model = io.payload(self.model)
        self.state.settled = True
        self._save()
        self._say(f"the base's BatchNorm statistics re-estimated for its trained weights: validation accuracy "
                  f"{self.state.base['val_accuracy']:.4f}")

    def _start_fresh(self, overwrite: bool) -> None:
        self.folder.start_fresh(overwrite)
        self.state = _State(run_id=uuid.uuid4().hex[:12])

    # ------------------------------------------------------------------------------------------------ run
    def run(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Runs (or, with `resume=True`, continues) the loop and returns the report dictionary.

        A folder that holds a run is never overwritten silently: `resume=True` continues it (refused, before any
        training, when its checkpoint belongs to another model, data set or configuration), `overwrite=True`
        deletes it and starts again; otherwise `ValueError`. The folder is locked while the run goes on
        (`run_folder.folder_lock`): a second run on it, from this machine or another sharing the disk, is
        refused with `ValueError` naming the holder's pid and host."""
        if resume and overwrite:
            raise ValueError("GrowPushPrune.run: resume=True continues the folder's run and overwrite=True replaces "
                             "it; give one of them")
        with self.folder.lock():  # one run per folder: a second one is refused, naming this one's pid
            return self._run(resume, overwrite)

    def _run(self, resume: bool, overwrite: bool) -> dict:
        cfg = self.config
        self.folder.check_writable()
        resumed = resume and self._resume()
        if not resumed:
            self._start_fresh(overwrite)
        self._say_where(resume, resumed)
        started = clock = time.perf_counter()
        stage = 0

        def took() -> str:  # the time since the last stage line
            nonlocal clock
            now = time.perf_counter()
            seconds, clock = now - clock, now
            return f"{seconds:.0f} s"

        def step(name: str):  # each completed stage is checkpointed; a resumed run skips those already done
            nonlocal stage
            stage += 1
            done = stage <= self.state.stage
            return done

        if not step("train"):
            self.model = self._train(self.model, cfg.epochs, stage, "training", settle=True)
            self.state.base = self._metrics(self.model)
            self.state.base_model = io.payload(self.model)
            self.state.settled = True
            self.state.stage = stage
            self._save()
            self._say(f"base model: {self._size(self.state.base)}, validation accuracy "
                      f"{self.state.base['val_accuracy']:.4f} after {cfg.epochs:g} epoch{'s' * (cfg.epochs != 1)} "
                      f"({took()})")
        if cfg.grow and not step("grow"):
            teach = {"teacher": self.teacher, "distill": cfg.grow_distill, "temperature": cfg.temperature} \
                if self.teacher is not None else {}

            def train(m, after_step=None):
                return self._train(m, cfg.grow_epochs, stage, "growing", settle=cfg.growth != "planting",
                                   after_step=after_step, **teach)   # (planting re-estimates in its own way)

            def checkpoint(m, progress):  # after every attempt: the net kept so far and how far the growth got
                self.model, self.state.growing = m, progress
                self._save()

            context = growth.GrowthContext(self.splits, cfg, self.example, train,
                                           lambda m: evaluate(m, self.splits.val, device=self.device), self.progress,
                                           self.device, train_kwargs(cfg), checkpoint=checkpoint,
                                           resume=self.state.growing)
            self.model, self.state.growth = growth.get(cfg.growth)(self.model, context)
            self.state.growing = None
            if any(h.get("kept") for h in self.state.growth[1:]):  # the model grew: the base is now another
                self.state.before_growth = self.state.base
                self.state.base = self._metrics(self.model, grown=True)
                self.state.base_model = io.payload(self.model)
            self.state.stage = stage
            self._save()
            self._say(f"grown ({cfg.growth}; {growth.summary(self.state.growth, cfg)}): "
                      f"{self._size(self.state.base)}, validation accuracy {self.state.base['val_accuracy']:.4f}; "
                      + ("the targets are fractions of this grown model" if self.state.before_growth else
                         "the model is unchanged") + f" ({took()})")
            from .pruning import ChannelGraph

            problem = unreachable(ChannelGraph(self.model, self.example, ignore=tuple(cfg.ignore)), cfg)
            if problem:  # the run goes on (its growth is kept); it will stop short and say so (exit 3)
                problem = f"{'on the grown model' if self.state.before_growth else 'after the growth'}, {problem}"
                if self.log is None:
                    warnings.warn(f"GrowPushPrune: {problem}", RuntimeWarning, stacklevel=2)
                self._say(f"warning: {problem}")
        base = self.state.base
        chance = _at_chance(base["val_accuracy"], self.splits.val)
        floor = None if chance else base["val_accuracy"] - cfg.accuracy_floor
        if chance and not self.state.iterations:
            self._say(f"no accuracy floor: {chance}")
        for i in range(1, cfg.max_iterations + 1):
            if self.state.stopped:
                break
            eta = cfg.eta_start + (i - 1) * cfg.eta_step
            if not step(f"push {i}"):
                self.model, keep = push_stage(self.model, self.splits, cfg, stage_seed(cfg.seed, stage), self.device,
                                              self.progress, desc=f"push {i}", iteration=i,
                                              base_cost=base[cfg.budget_kind])
                self.state.pending_keep = {n: k.tolist() for n, k in keep.items()} if keep is not None else None
                self.state.end_of_push = evaluate(self.model, self.splits.val, device=self.device)
                self.state.stage = stage
                self._save()
                self._say(f"iteration {i}: push ({cfg.push}) done, validation accuracy {self.state.end_of_push:.4f} "
                          f"({took()})")
            if not step(f"prune {i}"):
                params_before = count_params(self.model)
                pending = self.state.pending_keep
                keep = {n: torch.tensor(k, dtype=torch.long) for n, k in pending.items()} if pending else None
                self.model, reports = prune_stage(self.model, self.splits, cfg, i, base[cfg.budget_kind],
                                                  stage_seed(cfg.seed, stage), self.device, self.progress, keep=keep)
                widths = _widths(reports)
                entry = {"iteration": i, "eta": eta if cfg.schedule == "eta" else None, "widths": widths,
                         "val_accuracy_end_of_push": self.state.end_of_push,
                         "val_accuracy_after_prune": evaluate(self.model, self.splits.val, device=self.device)}
                if cfg.schedule == "budget":
                    entry[f"goal_{cfg.budget_kind}"] = stage_goal(cfg, i)
                self.state.pending_keep = None
                self.state.iterations.append(entry)
                if count_params(self.model) >= params_before:
                    self.state.iterations[-1]["note"] = "nothing pruned at this eta" if cfg.schedule == "eta" \
                        else "the model already meets this iteration's budget"
                self.state.stage = stage
                self._save()
                if self.log is not None:
                    self._say(f"iteration {i}: pruned to {self._size(None)}, validation accuracy "
                              f"{entry['val_accuracy_after_prune']:.4f} ({took()})")
            if not step(f"finetune {i}"):
                dataset = None
                if cfg.final_finetune == "train+val" and self._last(i):
                    dataset = torch.utils.data.ConcatDataset([self.splits.train, self.splits.val])
                    self.state.iterations[-1]["val_seen_in_training"] = True
                self.model = self._train(self.model, stage_epochs(cfg)[1], stage, f"fine-tune {i}", dataset,
                                         **self._teacher())
                metrics = self._metrics(self.model)
                self.state.iterations[-1].update(metrics)
                snapshot = {"metrics": self.state.iterations[-1], "model": io.payload(self.model)}
                best = self.state.best_accuracy
                if best is None or metrics["val_accuracy"] > best["metrics"]["val_accuracy"]:
                    self.state.best_accuracy = snapshot
                if floor is None or metrics["val_accuracy"] >= floor:
                    size = self.state.best_size
                    if size is None or metrics["params"] < size["metrics"]["params"]:
                        self.state.best_size = snapshot
                if floor is not None and metrics["val_accuracy"] < floor:
                    self.state.stopped = f"validation accuracy {metrics['val_accuracy']:.4f} fell below the floor " \
                                         f"{floor:.4f}"
                elif _reached(cfg, metrics, base):
                    self.state.stopped = "size target reached"
                self.state.stage = stage
                self._save()
                self._say(f"iteration {i}: fine-tuned, validation accuracy {metrics['val_accuracy']:.4f} ("
                          + ("no floor" if floor is None else f"floor {floor:.4f}")
                          + f"), test {metrics['test_accuracy']:.4f} ({took()})"
                          + (f"; stopping: {self.state.stopped}" if self.state.stopped else ""))
        if not self.state.stopped:
            self.state.stopped = f"{cfg.max_iterations} iteration{'s' * (cfg.max_iterations != 1)} done"
        chosen = self.state.best_size or self.state.best_accuracy
        final_model = io.from_payload(chosen["model"], self.factory) if chosen else self.model
        final = chosen["metrics"] if chosen else base
        self.final_model = final_model
        latency = onnx_latency = None
        if gdist.rank() == 0 and self.state.base_model is not None:
            base_model = io.from_payload(self.state.base_model, self.factory)
            latency = self.compare_latency(base_model, final_model)
            onnx_latency = self.compare_onnx_latency(base_model, final_model) if self.onnx_latency else None
        latency, onnx_latency = gdist.broadcast_object((latency, onnx_latency))
        # the floor is met when some iteration's model stayed above it (or no iteration ran): a run whose every
        # compact model fell below it ships the most accurate one, and says so (`gpp compress` exits 3)
        # (None: no floor applied, the base being at chance)
        floor_met = None if floor is None else self.state.best_size is not None or self.state.best_accuracy is None
        return {"run_id": self.state.run_id, "target_reached": bool(chosen) and _reached(cfg, final, base),
                "accuracy_floor_met": floor_met, "accuracy_floor": floor, **({"no_floor": chance} if chance else {}),
                "input_shape": list(self.splits.input_shape), "dataset": self.splits.name,
                "num_classes": self.splits.num_classes, "config": asdict(cfg), "base": base, "final": final,
                "growth": self.state.growth, "iterations": self.state.iterations, "stopped": self.state.stopped,
                **({"before_growth": self.state.before_growth} if self.state.before_growth else {}),
                "accuracy_first": self.state.best_accuracy["metrics"] if self.state.best_accuracy else None,
                "size_first": self.state.best_size["metrics"] if self.state.best_size else None,
                "latency": latency, "onnx_latency": onnx_latency, "preprocessing": self.splits.preprocessing,
                "seconds": time.perf_counter() - started}

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def _size(self, metrics: dict | None) -> str:
        """`12,345 params (10.0% of the base), 1,234,567 FLOPs`: of `metrics`, or measured on the current
        model (None); the share once the base is known."""
        params, flops = (metrics["params"], metrics["flops"]) if metrics else \
            (count_params(self.model), count_flops(self.model, self.example))
        base = self.state.base
        of = "the grown model" if self.state.before_growth else "the base"
        share = f" ({params / base['params']:.1%} of {of})" if metrics is None and base else ""
        return f"{params:,} params{share}, {flops:,} FLOPs"

    def _say_where(self, resume: bool, resumed: bool) -> None:
        """Where the run starts: afresh (saying so when `resume` found nothing to continue), after its last
        completed stage, or finished already (its report is made again)."""
        if not resumed:
            if resume:
                self._say(f"nothing to resume in {self.out_dir}: starting a new run there")
            return
        cfg = self.config
        names = ["training the base model"] + (["growing"] if cfg.grow else []) + \
            [f"{what} {i}" for i in range(1, cfg.max_iterations + 1) for what in ("push", "prune", "fine-tune")]
        done = self.state.stage
        if self.state.stopped or done >= len(names):
            self._say(f"the run in {self.out_dir} is finished ({self.state.stopped or 'every iteration done'}); "
                      f"reporting it again (--overwrite starts it over)")
        elif self.state.growing:
            self._say(f"resuming {self.out_dir} inside the growth, from its last checkpoint")
        else:
            self._say(f"resuming {self.out_dir} after {names[done - 1] if 0 < done <= len(names) else 'no stage'}"
                      + (f"; next: {names[done]}" if done < len(names) else ""))

    def _last(self, iteration: int) -> bool:
        """Whether iteration `iteration`'s fine-tuning is the run's last: the last iteration, or the model
        already meets the size target (fine-tuning does not change its size)."""
        if iteration == self.config.max_iterations:
            return True
        size = {"params": count_params(self.model), "flops": count_flops(self.model, self.example)}
        if self.config.budget_kind == "latency":
            size["latency"] = model_cost(copy.deepcopy(self.model).cpu(), "latency", self.example.cpu(),
                                         latency_table(self.config))
        return _reached(self.config, size, self.state.base)

    def compare_latency(self, base: nn.Module, compact: nn.Module) -> dict:
        """Base and compact model timed interleaved in one window (`training.compare_latency`), at batch 1 and
        64: `{"b1": {...}, "b64": {...}}` with each model's median and range and the speed-up's."""
        shape = self.splits.input_shape
        return {f"b{batch}": compare_latency({"base": base, "compact": compact}, shape, batch, repeats=repeats)
                for batch, repeats in ((1, 20), (64, 3))}


    def compare_onnx_latency(self, base: nn.Module, compact: nn.Module) -> dict:
        """Base and compact model in ONNX Runtime on the CPU, timed interleaved at batch 1 and 64
        (`export.compare_onnx_latency`): `{"b1": ..., "b64": ...}`, or `{"skipped": why}` when onnx, onnxscript
        or onnxruntime is not installed or a model does not export (the run itself is not affected)."""
        from . import export

        try:
            export.check_onnx_available()
            return export.compare_onnx_latency({"base": base, "compact": compact}, self.splits.input_shape)
        except ImportError as error:
            return {"skipped": str(error)}
        except Exception as error:  # an op the exporter lacks must not lose a finished run
            return {"skipped": f"export failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def unreachable(graph, cfg: LoopConfig, progress: bool = False) -> str | None:
    """Why a size target of `cfg` cannot be met on `graph`'s model, or None: the targets `_reached` counts,
    against the smallest model pruning can reach, every prunable group at its narrowest width (one channel, or
    `round_to` where the prune stage's selection applies it; a push that selects the keep-set itself does not);
    what the graph cannot prune stays whole. Lenient by design (an allocation's own grid may stop wider), never
    wrong the other way; a push that removes whole blocks can go below it, so it is not checked."""
    from .pruning.costs import cost_model

    if pushes.removes_blocks(cfg.push):
        return None
    targets = _counted_targets(cfg)
    step = 1 if pushes.selects(cfg.push) else cfg.round_to
    narrowest = {g.name: min(g.size, step) for g in graph.groups if g.prunable}
    flags = {"params": "target_params, gpp: --target-params", "flops": "target_flops, gpp: --target-flops",
             "latency": "target_latency, gpp: --target-latency"}
    for kind, target in targets.items():
        model = cost_model(graph, kind, latency_table(cfg, progress) if kind == "latency" else None)
        whole, least = model.cost({}), model.cost(narrowest)
        if target * whole < least:
            what = {"params": "parameters", "flops": "FLOPs", "latency": f"latency ({cfg.latency_runtime}, batch "
                    f"{cfg.latency_batch}, predicted by the per-layer table)"}[kind]
            return (f"a target of {target:g} ({flags[kind]}) cannot be met: the smallest model pruning can reach "
                    f"keeps {least / whole:.1%} of the {what} (every prunable layer at "
                    f"{'one channel' if step <= 1 else f'{step} channels'}; layers it cannot prune, such as the "
                    f"classifier, stay whole); give a target of at least {math.ceil(least / whole * 1000) / 1000:g}, "
                    f"well above it for an accurate model")
    return None


def _counted_targets(cfg: LoopConfig) -> dict:
    """`{kind: fraction}` of the size targets a run must meet: the latency target alone for a latency budget, the
    FLOP target alone for a FLOP-budget schedule, else the parameter target (and the FLOP target when one is
    set)."""
    if cfg.budget_kind == "latency":
        return {"latency": cfg.target_latency}
    if cfg.schedule == "budget" and cfg.budget_kind == "flops":
        return {"flops": cfg.target_flops}
    return {"params": cfg.target_params, **({"flops": cfg.target_flops} if cfg.target_flops is not None else {})}


def _at_chance(accuracy: float, val_set) -> str:
    """Why a base model of validation accuracy `accuracy` on `val_set` has no accuracy to keep (and the run no
    floor), or "": it is no better than always answering the most frequent class, within three standard errors
    of that share on this many samples -- an untrained model, as recipe `gap` starts from (--epochs 0)."""
    from .data.splits import labels_of

    labels = labels_of(val_set)
    n = int(labels.numel())
    if n == 0:
        return ""
    share = float(torch.bincount(labels).max()) / n
    if accuracy > share + 3 * math.sqrt(share * (1 - share) / n):
        return ""
    return (f"the base model's validation accuracy {accuracy:.4f} is at chance (the most frequent class is "
            f"{share:.4f} of the {n} validation samples): it has learnt nothing to keep, as an untrained model has")


def _reached(cfg: LoopConfig, metrics: dict, base: dict) -> bool:
    """Whether `metrics` meet every size target of `cfg` (`_counted_targets`) against `base`."""
    return all(metrics[kind] <= target * base[kind] * (1 + 1e-9) for kind, target in _counted_targets(cfg).items())


def _widths(reports: list) -> dict:
    """`{group: [before, after]}` over the cuts of one prune stage (before the first, after the last)."""
    widths = {}
    for report in reports:
        for name, (before, after) in report.to_dict()["widths"].items():
            widths[name] = [widths.get(name, [before])[0], after]
    return widths
