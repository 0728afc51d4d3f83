"""`GrowPushPrune`: the whole method as one resumable loop (docs/design.md §2.8).

    [grow while accuracy improves] -> train -> repeat { push -> prune -> recalibrate BN -> fine-tune }
    until the size target is reached or validation accuracy falls below the floor.

An iteration is built from two functions that the benchmarks call too, so that what is benchmarked is what
users run: `push_stage` (the push loss for `push_epochs`, its weights from the `LoopConfig`) and `prune_stage`
(one prune or several toward the iteration's goal: a threshold `eta` raised every iteration, or with
`schedule="budget"` a parameter budget reached geometrically over `max_iterations`).

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

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import distributed as gdist
from . import io
from .cost import count_flops, count_params
from .grow import grow
from .pruning import criteria, prune
from .push import PushLoss
from .training import evaluate, fit, latency_ms, training_batches

__all__ = ["LoopConfig", "GrowPushPrune", "push_stage", "prune_stage", "stage_seed"]

SCHEDULES = ("eta", "budget")


@dataclass
class LoopConfig:
    """Knobs of the loop. Budgets are fractions of the base model; accuracies are fractions in [0, 1]."""

    epochs: int = 5                  # initial training
    push_epochs: int = 1             # per iteration
    finetune_epochs: int = 2         # per iteration
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    target_params: float = 0.1       # stop once params <= target_params * base params
    target_flops: float | None = None
    accuracy_floor: float = 0.02     # stop once validation accuracy < base accuracy - accuracy_floor
    schedule: str = "eta"            # "eta": prune below eta * std per layer, eta raised every iteration;
                                     # "budget": iteration i of n keeps target_params ** (i / n) of the base
    eta_start: float = 0.1           # pruning threshold eta * std, raised every iteration
    eta_step: float = 0.1
    max_iterations: int = 8
    cuts: int = 1                    # cuts per prune stage, each analysed afresh (schedule "budget")
    alpha: float = 0.3               # push weights (docs/design.md §2.8: push strength needs tuning; mild defaults)
    beta: float = 0.3
    gamma: float = 0.05
    separation: str = "fisher"
    criterion: str = "lda"
    neurons: float = 0.75            # pre-decision neurons kept for tracing
    grow: bool = False
    grow_threshold: float = 0.005
    max_modules_per_stage: int = 2
    grow_epochs: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 0 or self.push_epochs < 0 or self.finetune_epochs < 0 or self.batch_size < 1:
            raise ValueError("LoopConfig: epochs must be >= 0 and batch_size >= 1")
        if not 0 < self.target_params <= 1 or (self.target_flops is not None and not 0 < self.target_flops <= 1):
            raise ValueError(f"LoopConfig: target_params/target_flops must be in (0, 1], got {self.target_params}, "
                             f"{self.target_flops}")
        if not 0 <= self.accuracy_floor < 1 or self.max_iterations < 1 or self.eta_start < 0:
            raise ValueError("LoopConfig: accuracy_floor must be in [0, 1), max_iterations >= 1, eta_start >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LoopConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cuts < 1 or (self.cuts > 1 and self.schedule != "budget"):
            raise ValueError(f"LoopConfig: cuts must be >= 1, and more than one cut per stage needs "
                             f"schedule='budget' (got cuts={self.cuts}, schedule={self.schedule!r})")
        if not isinstance(self.criterion, str) or self.criterion not in criteria.names():
            raise ValueError(f"LoopConfig: criterion must be one of {tuple(criteria.names())}, got "
                             f"{self.criterion!r}")


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage `stage` of a run seeded `seed`: every stage draws from its own stream, so a resumed
    run gives what an uninterrupted one would."""
    return seed * 1_000_003 + stage


def push_stage(model: nn.Module, splits, config: LoopConfig, seed: int, device="cpu", progress: bool = False,
               desc: str = "push") -> nn.Module:
    """The push stage of an iteration: `config.push_epochs` epochs of `PushLoss` training (weights
    `config.alpha`, `beta`, `gamma`, separation `config.separation`) at the config's learning rate."""
    push = PushLoss(splits.num_classes, config.alpha, config.beta, config.gamma, separation=config.separation)
    return fit(model, splits.train, config.push_epochs, lr=config.lr, weight_decay=config.weight_decay,
               batch_size=config.batch_size, seed=seed, push=push, device=device, progress=progress, desc=desc)


def prune_stage(model: nn.Module, splits, config: LoopConfig, iteration: int, base_params: int, seed: int,
                device="cpu", progress: bool = False):
    """The prune stage of iteration `iteration` (from 1): returns `(model, [PruneReport, ...])`.

    With `schedule="eta"` one prune below `eta = eta_start + (iteration - 1) * eta_step`; with
    `schedule="budget"` the model is cut toward `target_params ** (iteration / max_iterations)` of
    `base_params` in `config.cuts` steps (geometric, each analysed afresh; a step the model already meets is
    skipped). Each prune recalibrates BatchNorm on training batches drawn with `seed`.
    """
    torch.manual_seed(seed)
    loader = training_batches(splits.train, config.batch_size, seed)
    example = torch.zeros(2, *splits.input_shape, device=device)
    kwargs = dict(criterion=config.criterion, neurons=config.neurons, progress=progress)
    if config.schedule == "eta":
        eta = config.eta_start + (iteration - 1) * config.eta_step
        model, report = prune(model, loader, example, splits.num_classes, eta=eta, **kwargs)
        return model, [report]
    reports = []
    for cut in range(1, config.cuts + 1):
        goal = config.target_params ** ((iteration - 1 + cut / config.cuts) / config.max_iterations)
        relative = goal * base_params / count_params(model)
        if relative < 1:
            model, report = prune(model, loader, example, splits.num_classes, method="budget", budget=relative,
                                  **kwargs)
            reports.append(report)
    return model, reports


@dataclass
class _State:
    stage: int = 0                   # stages completed
    base: dict = field(default_factory=dict)
    iterations: list = field(default_factory=list)
    growth: list = field(default_factory=list)
    best_accuracy: dict | None = None   # {"metrics": ..., "model": state}
    best_size: dict | None = None
    stopped: str = ""


class GrowPushPrune:
    """Runs the grow-push-prune loop on `model` for the task in `splits` (a `gpp_ext.data.DataSplits`).

    Args:
        model: the base network (a built-in model, or any traceable classifier with `factory` given).
        splits: train / val / test data sets and their shapes.
        config: a `LoopConfig`.
        out_dir: where checkpoints go (and the caller's reports).
        factory: rebuilds a user model's unpruned architecture (built-in models need none).
        progress: tqdm bars on every long step (on a terminal; redirected output stays clean).
    """

    def __init__(self, model: nn.Module, splits, config: LoopConfig | None = None, out_dir: str = "runs/gpp",
                 factory=None, progress: bool = True, device="cpu"):
        self.config = config or LoopConfig()
        self.config.validate()
        self.model, self.splits, self.out_dir, self.factory = model, splits, os.fspath(out_dir), factory
        self.device = torch.device(device)
        self.progress = progress and gdist.rank() == 0  # one set of bars per job
        self.checkpoint = os.path.join(self.out_dir, "checkpoint.pt")
        self.state = _State()
        self.example = torch.zeros(2, *splits.input_shape, device=self.device)

    # -------------------------------------------------------------------------------------------- helpers
    def _train(self, model: nn.Module, epochs: int, stage: int, desc: str) -> nn.Module:
        cfg = self.config
        return fit(model, self.splits.train, epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                   batch_size=cfg.batch_size, seed=stage_seed(cfg.seed, stage), device=self.device,
                   progress=self.progress, desc=desc)

    def _metrics(self, model: nn.Module, **extra) -> dict:
        """Size, accuracy and latency, measured on rank 0 (latency would suffer from processes running beside
        it) and shared with every process."""
        metrics = self._measure(model, **extra) if gdist.rank() == 0 else None
        return gdist.broadcast_object(metrics)

    def _measure(self, model: nn.Module, **extra) -> dict:
        shape = self.splits.input_shape
        return {"params": count_params(model), "flops": count_flops(model, self.example),
                "val_accuracy": evaluate(model, self.splits.val, device=self.device),
                "test_accuracy": evaluate(model, self.splits.test, device=self.device),
                "latency_ms_b1": latency_ms(model, shape, 1), "latency_ms_b64": latency_ms(model, shape, 64, 5),
                **extra}

    def _save(self) -> None:
        if gdist.rank() != 0:
            return
        state = asdict(self.state)
        io.save_atomic({"format": "gpp_ext.loop/1", "config": asdict(self.config), "state": state,
                        "model": io.payload(self.model)}, self.checkpoint)

    def _resume(self) -> bool:
        # Rank 0 reads the checkpoint and shares it, so the other processes need not see its folder.
        data = None
        if gdist.rank() == 0 and os.path.exists(self.checkpoint):
            data = torch.load(self.checkpoint, weights_only=True)
        data = gdist.broadcast_object(data)
        if data is None:
            return False
        if data.get("format") != "gpp_ext.loop/1":
            raise ValueError(f"GrowPushPrune: {self.checkpoint} is not a gpp_ext loop checkpoint")
        if data["config"] != asdict(self.config):
            raise ValueError(f"GrowPushPrune: {self.checkpoint} was written with another configuration; use a "
                             f"new output folder or the same settings to resume")
        self.state = _State(**data["state"])
        self.model = io.from_payload(data["model"], self.factory).to(self.device)
        return True

    # ------------------------------------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> dict:
        """Runs (or, with `resume=True`, continues) the loop and returns the report dictionary."""
        cfg = self.config
        if not (resume and self._resume()):
            self.state = _State()
        started = time.perf_counter()
        stage = 0

        def step(name: str):  # each completed stage is checkpointed; a resumed run skips those already done
            nonlocal stage
            stage += 1
            done = stage <= self.state.stage
            return done

        if not step("train"):
            self.model = self._train(self.model, cfg.epochs, stage, "training")
            self.state.base = self._metrics(self.model)
            self.state.stage = stage
            self._save()
        if cfg.grow and hasattr(self.model, "add_module_to_stage") and not step("grow"):
            def train(m):
                return self._train(m, cfg.grow_epochs, stage, "growing")

            self.model, history = grow(self.model, train, lambda m: evaluate(m, self.splits.val, device=self.device),
                                       cfg.grow_threshold, cfg.max_modules_per_stage, progress=self.progress)
            self.state.growth = [h.to_dict() for h in history]
            self.state.base = self._metrics(self.model, grown=True)
            self.state.stage = stage
            self._save()
        base = self.state.base
        floor = base["val_accuracy"] - cfg.accuracy_floor
        for i in range(1, cfg.max_iterations + 1):
            if self.state.stopped:
                break
            eta = cfg.eta_start + (i - 1) * cfg.eta_step
            if not step(f"push {i}"):
                self.model = push_stage(self.model, self.splits, cfg, stage_seed(cfg.seed, stage), self.device,
                                        self.progress, desc=f"push {i}")
                self.state.stage = stage
                self._save()
            if not step(f"prune {i}"):
                params_before = count_params(self.model)
                self.model, reports = prune_stage(self.model, self.splits, cfg, i, base["params"],
                                                  stage_seed(cfg.seed, stage), self.device, self.progress)
                widths = _widths(reports)
                entry = {"iteration": i, "eta": eta if cfg.schedule == "eta" else None, "widths": widths,
                         "val_accuracy_after_prune": evaluate(self.model, self.splits.val, device=self.device)}
                if cfg.schedule == "budget":
                    entry["goal_params"] = cfg.target_params ** (i / cfg.max_iterations)
                self.state.iterations.append(entry)
                if count_params(self.model) >= params_before:
                    self.state.iterations[-1]["note"] = "nothing pruned at this eta" if cfg.schedule == "eta" \
                        else "the model already meets this iteration's budget"
                self.state.stage = stage
                self._save()
            if not step(f"finetune {i}"):
                self.model = self._train(self.model, cfg.finetune_epochs, stage, f"fine-tune {i}")
                metrics = self._metrics(self.model)
                self.state.iterations[-1].update(metrics)
                snapshot = {"metrics": self.state.iterations[-1], "model": io.payload(self.model)}
                best = self.state.best_accuracy
                if best is None or metrics["val_accuracy"] > best["metrics"]["val_accuracy"]:
                    self.state.best_accuracy = snapshot
                if metrics["val_accuracy"] >= floor:
                    size = self.state.best_size
                    if size is None or metrics["params"] < size["metrics"]["params"]:
                        self.state.best_size = snapshot
                if metrics["val_accuracy"] < floor:
                    self.state.stopped = f"validation accuracy {metrics['val_accuracy']:.4f} fell below the floor " \
                                         f"{floor:.4f}"
                elif metrics["params"] <= cfg.target_params * base["params"] and (
                        cfg.target_flops is None or metrics["flops"] <= cfg.target_flops * base["flops"]):
                    self.state.stopped = "size target reached"
                self.state.stage = stage
                self._save()
        if not self.state.stopped:
            self.state.stopped = f"{cfg.max_iterations} iterations done"
        chosen = self.state.best_size or self.state.best_accuracy
        final_model = io.from_payload(chosen["model"], self.factory) if chosen else self.model
        final = chosen["metrics"] if chosen else base
        self.final_model = final_model
        return {"input_shape": list(self.splits.input_shape), "dataset": self.splits.name,
                "num_classes": self.splits.num_classes, "config": asdict(cfg), "base": base, "final": final,
                "growth": self.state.growth, "iterations": self.state.iterations, "stopped": self.state.stopped,
                "accuracy_first": self.state.best_accuracy["metrics"] if self.state.best_accuracy else None,
                "size_first": self.state.best_size["metrics"] if self.state.best_size else None,
                "seconds": time.perf_counter() - started}


def _widths(reports: list) -> dict:
    """`{group: [before, after]}` over the cuts of one prune stage (before the first, after the last)."""
    widths = {}
    for report in reports:
        for name, (before, after) in report.to_dict()["widths"].items():
            widths[name] = [widths.get(name, [before])[0], after]
    return widths
