"""The compression benchmark's protocol (harness version 5): what every run gets, and one run measured.

1. One base model per (model, seed), trained to convergence with a cosine schedule and cached; the full mode
   warns when it is below the accuracy the protocol asks (`THRESHOLDS`, test set of Fashion-MNIST).
2. Every method then gets the same `epochs` of training after the base, its preparation counted (sparse
   training, a push, a fade: at most `prep_epochs`), the rest fine-tuning; every phase trains with the loop's
   own recipe (`methods.Setup.train`: the default recipe's optimiser, learning rate and one-cycle schedule).
   BatchNorm is recalibrated once after each cut. One-shot criteria spend the whole budget fine-tuning.
3. GPP's rows are `GrowPushPrune(...).run()` with the default recipe (`methods.gpp_loop`), given the base, the
   data, the budget and the epoch budget, nothing else: what `gpp compress` runs.
4. Recorded per run: parameters, FLOPs, accuracies along the way (for the cut methods: end of preparation,
   right after the cut, after recalibration, after 1/8, 1/4, 1/2 and 1 epoch of fine-tuning; for GPP the loop's
   own validation figures), test and validation accuracy at the end, in-run latency, the wall time (searches
   count) and every setting it depends on. The compact model is kept for the latency pass.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict

import torch

import gpp_ext
from gpp_ext import models, recipes
from gpp_ext.layers import is_batch_norm
from gpp_ext.loop import stage_epochs, train_kwargs
from gpp_ext.training import evaluate, fit, latency_ms, recalibrate_batchnorm, training_batches

from . import methods, render

# Bumped whenever the methods or the protocol change, so --resume never mixes records of two harnesses
# (3: converged bases, equal total epochs, the strongest peers, accuracy along fine-tuning, FLOPs budgets;
#  4: GPP's rows are the loop with the default recipe, every method trains with the loop's recipe, ResNet-20,
#     choices at several budgets per model;
#  5: Group Fisher's Fisher squares each sample's mask gradient before summing (the paper's empirical Fisher; the
#     batch's summed gradient was squared), which the default recipe's Fisher-weighted widths use too, and removes
#     channels every 10 steps instead of in 8 large removals; the loop's prune stage draws from the run's seed;
#     network slimming cuts at one global threshold on the raw BatchNorm scales).
HARNESS_VERSION = 5
# base test accuracy the full protocol asks for (Fashion-MNIST)
THRESHOLDS = {"lenet5": 0.900, "vgg": 0.930, "resnet20": 0.925}
BASE_LR = 2e-3                                   # the bases' training: AdamW, cosine schedule
BUDGET_SLACK = 1.02   # a budget is an upper bound, met within 2% for the granularity of whole channels

_ALL = ("gpp", "group_fisher", "hgs", "genetic", "sss", "slimming", "l1", "taylor", "random", "hesso_style",
        "torch_pruning:magnitude:local",
        "torch_pruning:magnitude:global", "torch_pruning:bn_scale_sl:local", "torch_pruning:bn_scale_sl:global",
        "torch_pruning:group_norm_sl:local", "torch_pruning:group_norm_sl:global")
# ResNet-20 joins with the methods the issue that added it named
_RESNET = ("gpp", "sss_blocks", "random", "torch_pruning:magnitude:local", "torch_pruning:magnitude:global",
           "torch_pruning:group_norm_sl:local", "torch_pruning:group_norm_sl:global")

# models, seeds, budgets per model [(kind, fraction)], where the validation choices are made per model, base
# epochs, epochs after the base (of which at most prep_epochs before the cut), the sweep values (None:
# methods.SWEEPS), the GPP candidates (ties go to the first listed) and ablation cells (None: choices.CANDIDATES,
# choices.ABLATION) and where the ablation runs, and the methods each model runs (GPP's variant row, `gpp-fade`
# or `gpp-nopush`, is added where the model runs gpp)
MODES = {
    "smoke": dict(models=["vgg"], seeds=[0], budgets={"vgg": [("params", 0.3)]},
                  choice_budgets={"vgg": [("params", 0.3)]}, base_epochs={"vgg": 1}, epochs=1.0, prep_epochs=0.5,
                  sweep_values=(1e-4,), candidates=("gpp-fade-taylor", "gpp-cut"),
                  ablation=(("uniform", "cut", "onecycle"),), ablation_budgets={"vgg": [("params", 0.3)]},
                  methods={"vgg": _ALL}),
    "quick": dict(models=["lenet5"], seeds=[0], budgets={"lenet5": [("params", 0.25), ("params", 0.1)]},
                  choice_budgets={"lenet5": [("params", 0.25), ("params", 0.1)]}, base_epochs={"lenet5": 8},
                  epochs=3.0, prep_epochs=1.0, sweep_values=None, candidates=("gpp-fade-taylor", "gpp-cut"),
                  ablation=(), ablation_budgets={}, methods={"lenet5": _ALL}),
    "full": dict(models=["lenet5", "vgg", "resnet20"], seeds=[0, 1, 2],
                 budgets={"lenet5": [("params", b) for b in (0.5, 0.25, 0.1, 0.05)],
                          "vgg": [("params", b) for b in (0.25, 0.1, 0.05, 0.02)] + [("flops", 0.25), ("flops", 0.1)],
                          "resnet20": [("params", 0.25), ("params", 0.1), ("flops", 0.25)]},
                 # GPP's recipe is chosen on LeNet-5 and VGG-BN; ResNet-20 is held out (only the peers'
                 # regularisation is chosen on it)
                 # (the peers' knobs per band: `choices.band`; each model has a mild and a hard choice budget)
                 choice_budgets={"lenet5": [("params", 0.25), ("params", 0.1), ("params", 0.05)],
                                 "vgg": [("params", 0.25), ("params", 0.1), ("params", 0.02), ("flops", 0.1)],
                                 "resnet20": [("params", 0.1), ("flops", 0.25)]},
                 base_epochs={"lenet5": 20, "vgg": 15, "resnet20": 15}, epochs=3.0, prep_epochs=1.0,
                 sweep_values=None, candidates=None, ablation=None,
                 ablation_budgets={"vgg": [("params", 0.1), ("flops", 0.1)]},
                 # the distillation study: GPP, the best peer there (by mean validation accuracy) and the genetic
                 # search, each with and without distillation in its fine-tuning, every seed
                 kd=("lenet5", "params", 0.1),
                 methods={"lenet5": _ALL, "vgg": _ALL, "resnet20": _RESNET}),
}
RECIPE_MODELS = ("lenet5", "vgg")   # where GPP's candidates are compared (the full mode)


def settings(args, model: str) -> dict:
    """What a record's numbers depend on besides method, budget and seed; `--resume` reuses only matching ones."""
    return {"harness": HARNESS_VERSION, "dataset": args.data, "mode": args.mode,
            "base_epochs": args.base_epochs[model], "epochs": args.epochs, "prep_epochs": args.prep_epochs}


class Cache:
    """Trained models under `folder`: read back when resuming, else built and written (atomically). Models
    asked for with `keep=True` (the base models) are also kept in `kept` (beside the committed results in the
    full mode), so that a resumed run in a fresh checkout retrains no base; the files carry checksums."""

    def __init__(self, folder: str, resume: bool, kept: str | None = None):
        self.folder, self.resume, self.kept = folder, resume, kept

    def get(self, name: str, build, keep: bool = False):
        path = os.path.join(self.folder, name + ".pt")
        kept = os.path.join(self.kept, name + ".pt") if keep and self.kept else None
        for candidate in (path, kept):
            if self.resume and candidate and os.path.exists(candidate):
                return gpp_ext.io.load(candidate)
        model = build()
        gpp_ext.io.save(model, path)
        if kept:
            gpp_ext.io.save(model, kept)
        return model


def base_model(name: str, splits, args, seed: int, cache: Cache):
    def build():
        torch.manual_seed(seed)
        kwargs = {"input_size": splits.input_shape[-1]} if name == "lenet5" else {}
        model = models.build(name, in_channels=splits.input_shape[0], num_classes=splits.num_classes, **kwargs)
        print(f"{name} seed {seed}: training the base model ({args.base_epochs[name]} epochs)", flush=True)
        return fit(model, splits.train, args.base_epochs[name], lr=BASE_LR, seed=seed, lr_schedule="cosine")

    return cache.get(base_stem(name, args, seed), build, keep=True)


def needs_bn(method: str) -> bool:
    """BN-scale pruning and network slimming (whose factors are the BatchNorm weights) do not exist without
    BatchNorm (their runs are skipped there); sparse structure selection puts its own factors on layers no
    BatchNorm follows."""
    return method.startswith("torch_pruning:bn_scale") or method.split("+")[0] == "slimming"


def has_bn(model) -> bool:
    return any(is_batch_norm(m) for m in model.modules())


def base_stem(name: str, args, seed: int) -> str:
    return f"{name}-{args.data}-{args.mode}-seed{seed}-base{args.base_epochs[name]}"


def compact_path(folder: str, stem: str, kind: str, budget: float, method: str) -> str:
    """Where a run's fine-tuned compact model is kept (under the cache folder, not committed)."""
    return os.path.join(folder, "compact", f"{stem}-{kind}{budget:g}-{method.replace(':', '_')}.pt")


def _sizes(model, splits) -> dict:
    example = torch.zeros(2, *splits.input_shape)
    return {"params": gpp_ext.count_params(model), "flops": gpp_ext.count_flops(model, example),
            "latency_ms_b1": latency_ms(model, splits.input_shape, 1),
            "latency_ms_b64": latency_ms(model, splits.input_shape, 64, 5)}


def measure_loop(base, setup: methods.Setup, overrides: dict) -> tuple:
    """A GPP row: the loop run from `base` with the default recipe changed by `overrides`. Returns
    `(measurements, compact model)`."""
    started = time.perf_counter()
    report, compact = methods.gpp_loop(base, setup, overrides)
    splits = setup.splits
    last = report["iterations"][-1] if report["iterations"] else {}
    push, finetune = stage_epochs(methods.loop_config(setup, overrides))  # the loop's split of the budget
    iterations = len(report["iterations"])
    return {"acc_end_of_prep": None, "acc_after_cut": None, "acc_after_recal": None, "ft_curve": {},
            "val_end_of_push": last.get("val_accuracy_end_of_push"),
            "val_after_cut": last.get("val_accuracy_after_prune"),
            "widths": last.get("widths"), "iterations": iterations, "stopped": report["stopped"],
            "target_reached": report["target_reached"],
            "test_accuracy": evaluate(compact, splits.test), "val_accuracy": evaluate(compact, splits.val),
            "prep_epochs_used": push * iterations, "finetune_epochs": finetune * iterations,
            "config": {k: v for k, v in report["config"].items() if k != "ignore"},
            **_sizes(compact, splits), "seconds": round(time.perf_counter() - started, 1)}, compact


def measure_cut(method: str, base, setup: methods.Setup, cache: Cache, stem: str) -> tuple:
    """A cut method's run: its preparation and cut, recalibration, fine-tuning with the loop's recipe, accuracy
    along the way. Returns `(measurements, compact model)`."""
    started = time.perf_counter()
    splits = setup.splits

    def cached(key, build):
        return cache.get(f"{stem}-{key}", build)

    plain, kd = methods.kd_variant(method)
    teacher = dict(teacher=copy.deepcopy(base).eval(), distill=methods.KD["weight"],
                   temperature=methods.KD["temperature"]) if kd else {}
    before, cut, used = methods.run(plain, base, setup, cached=cached)
    acc_prep = evaluate(before, splits.test)
    acc_cut = evaluate(cut, splits.test)
    recalibrate_batchnorm(cut, setup.loader(offset=1))
    acc_recal = evaluate(cut, splits.test)
    remaining = max(0.0, setup.epochs - used)
    per_epoch = len(training_batches(splits.train, setup.batch_size, 0))
    marks = {max(1, round(float(k) * per_epoch)): k for k in render.CURVE if float(k) <= remaining + 1e-9}
    curve = {}

    def along(step, total):
        if step in marks:
            curve[marks[step]] = evaluate(cut, splits.test)

    fit(cut, splits.train, remaining, seed=setup.seed + 17, after_step=along, **setup.train, **teacher)
    return {"acc_end_of_prep": acc_prep, "acc_after_cut": acc_cut, "acc_after_recal": acc_recal, "ft_curve": curve,
            "test_accuracy": evaluate(cut, splits.test), "val_accuracy": evaluate(cut, splits.val),
            "prep_epochs_used": used, "finetune_epochs": remaining, **_sizes(cut, splits),
            # as a cell's `met_budget`: a setting whose cut missed its budget cannot be chosen (`best_by_mean`)
            "target_reached": setup.cost(cut) <= setup.budget * setup.cost(base) * BUDGET_SLACK,
            "widths": widths_of(base, cut, setup.example),
            "widths_rule": methods.widths_rule(method), "seconds": round(time.perf_counter() - started, 1)}, cut


def widths_of(base, compact, example) -> dict | None:
    """`{group: [base width, compact width]}` over the base's channel groups (what a GPP row records from its
    loop), read from the two models' graphs; None when the compact model's groups are not the base's (blocks
    removed, or a graph that cannot be traced). The latency pass rebuilds a compact model's shapes from it when the
    model itself was not kept."""
    from gpp_ext.pruning import ChannelGraph

    try:
        before = {g.name: g.size for g in ChannelGraph(base, example).groups}
        after = {g.name: g.size for g in ChannelGraph(compact, example).groups}
    except Exception as error:  # an aid to the latency pass: a graph that cannot be read must not lose the run
        print(f"  widths not recorded: {type(error).__name__}: {error}", flush=True)
        return None
    if set(after) != set(before):
        return None
    return {name: [before[name], after[name]] for name in before}


def measure(method: str, base, setup: methods.Setup, cache: Cache, stem: str, keep: bool = True) -> dict:
    """One run of `method` (a GPP row when `methods.loop_overrides(method)` names one; `setup.knobs` then holds
    extra loop overrides, for candidates and the ablation). `keep`: keep the compact model for the latency
    pass (a record's run; a validation trial keeps none, so it never overwrites the model of the record with
    the same method and budget)."""
    settings = methods.loop_settings(method, setup.knobs)
    cpu = time.process_time()
    if settings is not None:
        m, compact = measure_loop(base, setup, settings)
    else:
        m, compact = measure_cut(method, base, setup, cache, stem)
    # the process's CPU time beside the wall time: unlike `seconds`, it does not grow while the process is paused
    # or waits for a core another process holds (at 1 thread, the wall time of the same run on a quiet machine)
    m["cpu_seconds"] = round(time.process_time() - cpu, 1)
    if keep:
        gpp_ext.io.save(compact, compact_path(cache.folder, stem, setup.kind, setup.budget, method))
    return m


def train_recipe() -> dict:
    """The training recipe every method used (recorded with each record)."""
    return {k: v for k, v in train_kwargs(recipes.build("gpp")).items() if k != "amp"}


def same_config(stored: dict | None, current: dict | None) -> bool:
    """Whether a recorded loop configuration runs the loop `current` runs: they agree on every setting the run
    reads (`loop.run_settings`: a push setting the push method never reads does not count); a field one of them
    lacks (added to `LoopConfig` after the record was made) counts as the value the older runs used
    (`loop._ADDED_SINCE`)."""
    if stored is None or current is None:
        return stored is current
    from gpp_ext.loop import same_run

    return same_run(stored, current)


def config_of(overrides: dict) -> dict:
    """The default recipe with `overrides` as the harness runs it, as a dict (to tell whether two trials ran the
    same loop). The harness always sets an epoch budget after a trained base (`methods.cell_config`), so the
    comparison must too: without one, `loop.run_settings` drops `push_share` (unread without an epoch budget)
    and two candidates that differ only in it would pass for one. Its amount is in the trial's settings
    (`settings`), so a placeholder of 1 stands for it here."""
    config = recipes.build("gpp", **{**overrides, "epochs": 0, "epoch_budget": 1.0})
    return {k: v for k, v in asdict(config).items() if k != "ignore"}
