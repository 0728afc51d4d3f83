"""`GrowPushPrune`: the whole method as one resumable loop (DESIGN.md 2.8).

    [grow while accuracy improves] -> train -> repeat { push -> prune -> recalibrate BN -> fine-tune }
    until the size target is reached or validation accuracy falls below the floor.

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
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from . import distributed as gdist
from . import io
from .data import labels_of
from .cost import count_flops, count_params
from .grow import grow
from .pruning import prune
from .push import ClassBalancedSampler, PreDecisionTap, PushLoss

__all__ = ["LoopConfig", "GrowPushPrune", "evaluate", "latency_ms"]


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
    eta_start: float = 0.1           # pruning threshold eta * std, raised every iteration
    eta_step: float = 0.1
    max_iterations: int = 8
    alpha: float = 0.3               # push weights (DESIGN.md 2.8: push strength needs tuning; mild defaults)
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


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 512, device="cpu") -> float:
    """Accuracy of `model` on a labelled data set, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape, batch: int, repeats: int = 20) -> float:
    """Median CPU latency of one forward pass of `batch` inputs, in milliseconds."""
    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(batch, *input_shape)
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    def _generator(self, stage: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + stage)

    def _loader(self, stage: int, balanced: bool = False, sliced: bool = False) -> DataLoader:
        """The stage's training batches; `sliced`: this process's slice of them under torch.distributed."""
        train = self.splits.train
        generator = None
        if balanced:
            labels = labels_of(train)
            batches = ClassBalancedSampler(labels, max(self.config.batch_size, self.splits.num_classes),
                                           seed=self.config.seed * 1_000_003 + stage)
        else:
            # what DataLoader(shuffle=True, generator=g) builds, spelled out so that it can be sliced per process
            generator = self._generator(stage)
            batches = BatchSampler(RandomSampler(train, generator=generator), self.config.batch_size, drop_last=False)
        if sliced and gdist.is_distributed():
            batches = gdist.RankSlicedBatchSampler(batches)
        return DataLoader(train, batch_sampler=batches, generator=generator)

    def _train(self, model: nn.Module, epochs: int, stage: int, desc: str, push: PushLoss | None = None):
        if epochs <= 0:
            return model
        torch.manual_seed(self.config.seed * 1_000_003 + stage)  # dropout and any other global draws
        model.to(self.device).train()
        # wrapped afresh for every stage: pruning changes the parameters DDP would otherwise keep in sync
        distributed = gdist.is_distributed()
        net = DistributedDataParallel(model) if distributed else model
        opt = torch.optim.AdamW(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        loader = self._loader(stage, balanced=push is not None, sliced=True)
        tap = PreDecisionTap(model) if push is not None else None
        try:
            for epoch in range(epochs):
                bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                           disable=None if self.progress else True)
                for x, y in bar:
                    x, y = x.to(self.device), y.to(self.device)
                    opt.zero_grad(set_to_none=True)
                    logits = net(x)
                    if push is not None:
                        loss = push(logits, tap.features, y)
                    elif distributed:  # this process's share of the global batch mean (see loss_scale)
                        loss = F.cross_entropy(logits, y, reduction="sum") * gdist.loss_scale(y.shape[0])
                    else:
                        loss = F.cross_entropy(logits, y)
                    loss.backward()
                    opt.step()
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        finally:
            if tap is not None:
                tap.close()
        return model.eval()

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
                push = PushLoss(self.splits.num_classes, cfg.alpha, cfg.beta, cfg.gamma, separation=cfg.separation)
                self.model = self._train(self.model, cfg.push_epochs, stage, f"push {i}", push=push)
                self.state.stage = stage
                self._save()
            if not step(f"prune {i}"):
                torch.manual_seed(cfg.seed * 1_000_003 + stage)
                before = copy.deepcopy(self.model)
                self.model, report = prune(self.model, self._loader(stage), self.example, self.splits.num_classes,
                                           criterion=cfg.criterion, neurons=cfg.neurons, eta=eta,
                                           progress=self.progress)
                self.state.iterations.append({"iteration": i, "eta": eta, "widths": report.to_dict()["widths"],
                                              "val_accuracy_after_prune": evaluate(self.model, self.splits.val,
                                                                                   device=self.device)})
                if count_params(self.model) >= count_params(before):
                    self.state.iterations[-1]["note"] = "nothing pruned at this eta"
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
