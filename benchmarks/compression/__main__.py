"""Compression benchmark: GPP against our baselines and Torch-Pruning, side by side on the same footing.

    python -m benchmarks.compression --quick           # LeNet-5, 1 seed, 2 budgets: a few minutes on 2 cores
    python -m benchmarks.compression                   # LeNet-5 and VGG-BN, 3 seeds, budgets 50/25/10/5 %

For every (model, data set, seed) one base model is trained; every method starts from a copy of it, is cut to
the same parameter budget (a fraction of the base), gets its BatchNorm statistics recalibrated, and is
fine-tuned with the same epochs and learning rate. Recorded per run: parameters, FLOPs, test accuracy right
after the cut (before any fine-tuning) and after fine-tuning, CPU latency at batch 1 and 64.

Methods: `gpp` (push, then the discriminant criterion in two steps toward the budget), `gpp-nopush` (the same
without push), `l1`, `slimming` (L1 on BatchNorm scales during extra training, then BN-scale pruning),
`taylor`, `random` (ours, one shot), and `torch_pruning:<magnitude|bn_scale|taylor|random>:<local|global>`
when the optional `torch-pruning` package is installed. Writes benchmarks/results/compression.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gpp_ext
from gpp_ext import data, models
from gpp_ext.io import write_atomic, write_text_atomic
from gpp_ext.loop import evaluate, latency_ms
from gpp_ext.pruning import recalibrate_batchnorm
from gpp_ext.push import ClassBalancedSampler, PreDecisionTap, PushLoss

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
OURS = ("gpp", "gpp-nopush", "l1", "slimming", "taylor", "random")
TP_CRITERIA = ("magnitude", "bn_scale", "taylor", "random")


def train(model, dataset, epochs, lr, seed, batch_size=128, push=None, slimming=0.0):
    """Plain training (cross-entropy), optionally with a PushLoss or an L1 penalty on BatchNorm scales."""
    if epochs <= 0:
        return model.eval()
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    if push is not None:
        loader = DataLoader(dataset, batch_sampler=ClassBalancedSampler(data.labels_of(dataset), batch_size, seed))
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with PreDecisionTap(model) as tap:
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = push(logits, tap.features, y) if push is not None else F.cross_entropy(logits, y)
                if slimming:
                    loss = loss + slimming * sum(m.weight.abs().sum() for m in norms)
                loss.backward()
                opt.step()
    return model.eval()


def ours(method, model, splits, budget, args, seed):
    """One of our methods; returns the cut (not yet fine-tuned) model."""
    loader = DataLoader(splits.train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    example = torch.zeros(2, *splits.input_shape)
    if method in ("gpp", "gpp-nopush"):
        if method == "gpp":
            model = train(model, splits.train, args.push_epochs, args.lr, seed,
                          push=PushLoss(splits.num_classes, 0.3, 0.3, 0.05))
        # two steps toward the budget: sqrt(budget) first, then the rest (DESIGN.md 2.8: small steps)
        for step in (budget ** 0.5, budget):
            relative = step / (gpp_ext.count_params(model) / args.base_params)
            if relative < 1:
                model, _ = gpp_ext.prune(model, loader, example, splits.num_classes, criterion="lda", method="budget",
                                         budget=min(1.0, relative), progress=False)
        return model
    criterion = {"l1": "l1", "slimming": "bn_scale", "taylor": "taylor", "random": "random"}[method]
    if method == "slimming":
        model = train(model, splits.train, args.push_epochs, args.lr, seed, slimming=1e-4)
    model, _ = gpp_ext.prune(model, loader, example, splits.num_classes, criterion=criterion, method="budget",
                             budget=budget, progress=False, seed=seed)
    return model


def torch_pruning(method, model, splits, budget, seed):
    """A Torch-Pruning criterion, local or global, with the channel ratio found by bisection on the budget."""
    import torch_pruning as tp

    _, criterion, scope = method.split(":")
    example = torch.zeros(1, *splits.input_shape)
    x, y = next(iter(DataLoader(splits.train, batch_size=256, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))))

    def cut(ratio):
        m = copy.deepcopy(model)
        importance = {"magnitude": tp.importance.MagnitudeImportance(p=1),
                      "bn_scale": tp.importance.BNScaleImportance(),
                      "taylor": tp.importance.TaylorImportance(),
                      "random": tp.importance.RandomImportance()}[criterion]
        pruner = tp.pruner.MetaPruner(m, example, importance=importance, pruning_ratio=ratio,
                                      global_pruning=scope == "global", ignored_layers=[m.classifier])
        if criterion == "taylor":
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        torch.manual_seed(seed)
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    lo, hi = 0.0, 0.99
    for _ in range(12):  # the smallest channel ratio that meets the parameter budget
        mid = 0.5 * (lo + hi)
        if gpp_ext.count_params(cut(mid)) <= budget * gpp_ext.count_params(model):
            hi = mid
        else:
            lo = mid
    return cut(hi)


def run(args) -> list:
    records = []
    for name in args.models:
        for seed in args.seeds:
            splits = data.load_dataset(args.data, seed=seed)
            torch.manual_seed(seed)
            kwargs = {"input_size": splits.input_shape[-1]} if name == "lenet5" else {}
            base = models.build(name, in_channels=splits.input_shape[0], num_classes=splits.num_classes, **kwargs)
            base = train(base, splits.train, args.epochs, args.lr, seed)
            args.base_params = gpp_ext.count_params(base)
            base_acc = evaluate(base, splits.test)
            print(f"{name} seed {seed}: base {args.base_params:,} params, test accuracy {base_acc:.4f}", flush=True)
            loader = DataLoader(splits.train, batch_size=256, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            for budget in args.budgets:
                for method in args.methods:
                    if method.startswith("torch_pruning:bn_scale") and not any(
                            isinstance(m, nn.BatchNorm2d) for m in base.modules()):
                        continue  # Torch-Pruning's BN-scale criterion prunes nothing without BatchNorm
                    started = time.perf_counter()
                    model = copy.deepcopy(base)
                    if method.startswith("torch_pruning:"):
                        model = torch_pruning(method, model, splits, budget, seed)
                    else:
                        model = ours(method, model, splits, budget, args, seed)
                    recalibrate_batchnorm(model, loader)  # for every method (DESIGN.md 2.8)
                    after_prune = evaluate(model, splits.test)
                    model = train(model, splits.train, args.finetune_epochs, args.lr, seed)
                    example = torch.zeros(2, *splits.input_shape)
                    record = {"method": method, "model": name, "dataset": args.data, "budget": budget, "seed": seed,
                              "params": gpp_ext.count_params(model), "flops": gpp_ext.count_flops(model, example),
                              "base_params": args.base_params, "base_test_accuracy": base_acc,
                              "acc_after_prune": after_prune, "test_accuracy": evaluate(model, splits.test),
                              "latency_ms_b1": latency_ms(model, splits.input_shape, 1),
                              "latency_ms_b64": latency_ms(model, splits.input_shape, 64, 5),
                              "seconds": time.perf_counter() - started}
                    # the budget is an upper bound; 2% slack for the granularity of whole channels
                    record["met_budget"] = record["params"] <= budget * args.base_params * 1.02
                    records.append(record)
                    print(f"  {method:<34} budget {budget:>5.0%}: params {record['params']:>8,} "
                          f"after cut {after_prune:.4f} -> {record['test_accuracy']:.4f}", flush=True)
    return records


def render(records: list, meta: dict) -> str:
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["budget"], r["method"]), []).append(r)

    def ms(values):
        return (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1
                else f"{values[0]:.4f}")

    lines = [f"# Compression benchmark ({meta['dataset']})", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, commit {meta['commit']}, mode {meta['mode']}; "
             f"base {meta['epochs']} epochs, fine-tune {meta['finetune_epochs']} epochs at lr {meta['lr']} for every "
             f"method, BatchNorm recalibrated after every cut; mean ± std over seeds {meta['seeds']}.", "",
             "| model | budget | method | params | FLOPs | acc after cut | test acc | latency b1 (ms) | b64 (ms) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (model, budget, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("params", "flops", "latency_ms_b1", "latency_ms_b64")}
        lines.append(f"| {model} | {budget:.0%} | {method} | {mean['params']:,.0f} | {mean['flops']:,.0f} | "
                     f"{ms([r['acc_after_prune'] for r in rs])} | {ms([r['test_accuracy'] for r in rs])} | "
                     f"{mean['latency_ms_b1']:.3f} | {mean['latency_ms_b64']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(records: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["model"] for r in records}), figsize=(7 * len({r["model"] for r in records}), 5),
                             squeeze=False)
    for ax, model in zip(axes[0], sorted({r["model"] for r in records})):
        for method in sorted({r["method"] for r in records}):
            rs = [r for r in records if r["model"] == model and r["method"] == method]
            budgets = sorted({r["budget"] for r in rs})
            xs = [statistics.mean(r["params"] for r in rs if r["budget"] == b) for b in budgets]
            ys = [statistics.mean(r["test_accuracy"] for r in rs if r["budget"] == b) for b in budgets]
            ax.plot(xs, ys, "o-" if not method.startswith("torch_pruning") else "x--", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet-5, 1 seed, budgets 25%% and 10%%, short training")
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "compression.json"))
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's tiny run
    args = parser.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
        tp_methods = [f"torch_pruning:{c}:{s}" for c in TP_CRITERIA for s in ("local", "global")]
    except ImportError:
        print("benchmarks.compression: torch-pruning is not installed (pip install torch-pruning); its rows are "
              "left out", file=sys.stderr)
        tp_methods = []
    if args.smoke:
        args.models, args.seeds, args.budgets = ["lenet5"], [0], [0.3]
        args.epochs, args.finetune_epochs, args.push_epochs, args.lr = 1, 1, 1, 3e-3
    elif args.quick:
        args.models, args.seeds, args.budgets = ["lenet5"], [0], [0.25, 0.1]
        args.epochs, args.finetune_epochs, args.push_epochs, args.lr = 5, 2, 1, 2e-3
    else:
        args.models, args.seeds, args.budgets = ["lenet5", "vgg"], [0, 1, 2], [0.5, 0.25, 0.1, 0.05]
        args.epochs, args.finetune_epochs, args.push_epochs, args.lr = 10, 3, 1, 2e-3
    args.methods = list(OURS) + tp_methods
    started = time.perf_counter()
    records = run(args)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__, "mode": mode,
            "dataset": args.data, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
            "seeds": args.seeds, "commit": os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip(),
            "seconds": round(time.perf_counter() - started)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for record in records:  # a flat list of self-describing records
        record.update(mode=meta["mode"], commit=meta["commit"], torch=meta["torch"], machine=meta["machine"])
    write_text_atomic(args.out, json.dumps(records, indent=1) + "\n")
    table = render(records, meta)
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", table)
    plot(records, os.path.splitext(args.out)[0] + ".png")
    print(table)
    print(f"benchmarks.compression: {len(records)} runs in {meta['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
