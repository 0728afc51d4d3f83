"""The training recipe of the loop, chosen on validation: the fine-tune that follows a cut, at equal epochs.

    python -m benchmarks.recipe                      # LeNet-5 and VGG-BN on Fashion-MNIST, seed 0, 10% of params
    python -m benchmarks.recipe --models vgg --budgets 0.1,0.02 --epochs 2 --resume

From the committed base model of each (model, seed) (`benchmarks/results/bases/`), two cuts to the budget:
- `l1`: the library's own L1 cut (`gpp_ext.prune(criterion="l1")`, BatchNorm recalibrated, as the loop does);
- `tp-magnitude`: Torch-Pruning's `MagnitudePruner` (global, group L2 magnitude; the classifier ignored), the
  ratio bisected to the budget.
Each cut is fine-tuned for `--epochs` epochs by every recipe of `gpp_ext.training.fit` in `RECIPES` (schedule x
optimiser x peak learning rate), and the Torch-Pruning cut also by `readme_finetune`, a standard OneCycle
fine-tune written the way a Torch-Pruning user writes one (SGD with momentum, OneCycleLR, cross-entropy; its
own loop, not `fit`). Recorded per run: validation and test accuracy, seconds. The recipe is chosen by mean
validation accuracy over models and budgets (never test); the table shows test beside it.

Results go to benchmarks/results/recipe.{json,md} (atomically, after every run; `--resume` skips runs already
recorded with the same settings).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import gpp_ext
from gpp_ext import data
from gpp_ext.cost import count_params
from gpp_ext.io import write_text_atomic
from gpp_ext.training import evaluate, fit, training_batches

from ._meta import git_commit, machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BASES = {"lenet5": "base20", "vgg": "base15"}
# (schedule, optimiser, peak learning rate): today's loop first, then the annealed ones
RECIPES = (("constant", "adamw", 2e-3), ("cosine", "adamw", 2e-3), ("warmup-cosine", "adamw", 1e-3),
           ("warmup-cosine", "adamw", 2e-3), ("warmup-cosine", "adamw", 4e-3), ("onecycle", "adamw", 2e-3),
           ("onecycle", "adamw", 4e-3), ("onecycle", "sgd", 0.02), ("onecycle", "sgd", 0.05),
           ("onecycle", "sgd", 0.1), ("warmup-cosine", "sgd", 0.05))
# the cuts: the library's criterion and allocation (`gpp_ext.prune`), or Torch-Pruning's magnitude pruner
CUTS = {"l1": dict(criterion="l1"), "l1-uniform": dict(criterion="l1", allocation="uniform"),
        "l1-solver": dict(criterion="l1", allocation="solver", floor=0.05),
        "lda-solver": dict(criterion="lda", allocation="solver", floor=0.05), "tp-magnitude": None}
BATCH = 128


def recipe_name(schedule: str, optimizer: str, lr: float) -> str:
    return f"fit:{schedule}:{optimizer}:{lr:g}"


def readme_finetune(model, splits, epochs: float, seed: int, max_lr: float = 0.05):
    """A standard OneCycle fine-tune, written as a Torch-Pruning user would: SGD (momentum 0.9, weight decay
    5e-4), `torch.optim.lr_scheduler.OneCycleLR` over the run, cross-entropy, shuffled batches of 128."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    steps = max(1, int(round(epochs * len(loader))))
    opt = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    return model.eval()


def tp_cut(model, splits, budget: float, seed: int):
    """Torch-Pruning's global magnitude pruner, its ratio bisected so the model keeps `budget` of the
    parameters."""
    import torch_pruning as tp

    from gpp_ext.classifier import find_classifier

    target = budget * count_params(model)
    example = torch.zeros(1, *splits.input_shape)

    def cut(ratio):
        m = copy.deepcopy(model)
        torch.manual_seed(seed)
        head = dict(m.named_modules())[find_classifier(m)]
        tp.pruner.MagnitudePruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, ignored_layers=[head]).step()
        return m

    lo, hi = 0.0, 0.99
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        if count_params(cut(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return cut(hi)


# Whole-loop candidates for the default recipe (`--loop`): `GrowPushPrune(...).run()` from the base, the harness
# giving only the base, the data, the budget and the epoch budget; everything else is the candidate's.
LOOP_CANDIDATES = {
    "gpp": dict(),  # recipes "gpp": LoopConfig's defaults
    "gpp+fade": dict(push="fade", push_share=1 / 3, fade_schedule="linear", fade_end=0.5, alpha=0.0, beta=0.0,
                     gamma=0.0),
    "gpp+global": dict(allocation="global", floor=0.0),
    "gpp+l1": dict(criterion="l1"),
    "fade-recipe": dict(),  # recipes "fade", the committed benchmark's GPP
}


def loop_candidates(names, budgets, seeds, epochs, records, done, path, commit, where, splits, wanted=None):
    from gpp_ext import recipes
    from gpp_ext.loop import GrowPushPrune

    for name in names:
        for seed in seeds:
            base = gpp_ext.io.load(os.path.join(RESULTS, "bases", f"{name}-fashion-mnist-full-seed{seed}-"
                                                f"{BASES[name]}.pt"))
            for budget in budgets:
                for label, settings in LOOP_CANDIDATES.items():
                    if wanted is not None and label not in wanted:
                        continue
                    key = (name, seed, budget, "loop", label, epochs)
                    if key in done:
                        continue
                    recipe = "fade" if label == "fade-recipe" else "gpp"
                    config = recipes.build(recipe, **{**settings, "epochs": 0, "epoch_budget": epochs,
                                                      "target_params": budget, "accuracy_floor": 0.5,
                                                      "seed": seed})
                    import tempfile

                    with tempfile.TemporaryDirectory() as out:
                        started = time.perf_counter()
                        loop = GrowPushPrune(copy.deepcopy(base), splits, config, out_dir=out, progress=False,
                                             onnx_latency=False)
                        report = loop.run()
                        seconds = time.perf_counter() - started
                    final = report["final"]
                    record = {"model": name, "seed": seed, "budget": budget, "cut": "loop", "recipe": label,
                              "epochs": epochs, "params": final["params"], "val_accuracy": final["val_accuracy"],
                              "test_accuracy": final["test_accuracy"], "seconds": seconds,
                              "widths": report["iterations"][-1].get("widths") if report["iterations"] else None,
                              "commit": commit, "machine": where}
                    records.append(record)
                    done.add(key)
                    records[:] = save(path, records)
                    print(f"{name} seed {seed} {budget:.0%} loop         {label:32s} val {record['val_accuracy']:.4f} "
                          f"test {record['test_accuracy']:.4f} ({seconds:.0f} s)", flush=True)


def save(path: str, records: list) -> list:
    """Writes `records` merged with what the file holds now (another run may have added records since this one
    read it: concurrent runs on one results file add up instead of overwriting each other); returns the
    merged list."""
    def key(r):
        return (r["model"], r["seed"], r["budget"], r["cut"], r["recipe"], r["epochs"])

    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = {key(r): r for r in json.load(f)}
    merged.update({key(r): r for r in records})
    out = list(merged.values())
    write_text_atomic(path, json.dumps(out, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet5,vgg")
    parser.add_argument("--budgets", default="0.1")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--cuts", default="l1,tp-magnitude", help=f"of {', '.join(CUTS)}")
    parser.add_argument("--recipes", default=None, help="comma-separated recipe names to run (default: all)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "recipe"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--loop", action="store_true", help="run the whole-loop candidates (LOOP_CANDIDATES) "
                        "instead of the fine-tuning recipes")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in BASES]
    if unknown:
        parser.error(f"--models: no committed base for {unknown}; known: {', '.join(BASES)}")
    budgets = [float(b) for b in args.budgets.split(",") if b]
    cut_names = [c for c in args.cuts.split(",") if c]
    if set(cut_names) - set(CUTS):
        parser.error(f"--cuts: unknown {sorted(set(cut_names) - set(CUTS))}; known: {', '.join(CUTS)}")
    wanted = set(args.recipes.split(",")) if args.recipes else None
    seeds = [int(s) for s in args.seeds.split(",") if s]
    path = args.out + ".json"
    records = []
    if args.resume and os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    done = {(r["model"], r["seed"], r["budget"], r["cut"], r["recipe"], r["epochs"]) for r in records}
    commit, where = git_commit(), machine()
    splits = data.load_dataset("fashion-mnist", seed=0)
    if args.loop:
        loop_candidates(names, budgets, seeds, args.epochs, records, done, path, commit, where, splits, wanted)
        write_text_atomic(args.out + ".md", render(save(path, records)))
        return 0
    for name in names:
        for seed in seeds:
            base = gpp_ext.io.load(os.path.join(RESULTS, "bases", f"{name}-fashion-mnist-full-seed{seed}-"
                                                f"{BASES[name]}.pt"))
            for budget in budgets:
                cuts = {}
                for cut_name in cut_names:
                    runs = [(recipe_name(*r), r) for r in RECIPES]
                    if cut_name == "tp-magnitude":
                        runs.append(("readme:onecycle:sgd:0.05", None))
                    runs = [(label, r) for label, r in runs if wanted is None or label in wanted]
                    for label, recipe in runs:
                        key = (name, seed, budget, cut_name, label, args.epochs)
                        if key in done:
                            continue
                        if cut_name not in cuts:
                            if CUTS[cut_name] is not None:
                                cuts[cut_name], _ = gpp_ext.prune(base, training_batches(splits.train, 256, seed),
                                                                  torch.zeros(2, *splits.input_shape), budget=budget,
                                                                  progress=False, seed=seed, **CUTS[cut_name])
                            else:
                                cuts[cut_name] = tp_cut(base, splits, budget, seed)
                        model = copy.deepcopy(cuts[cut_name])
                        started = time.perf_counter()
                        if recipe is None:
                            model = readme_finetune(model, splits, args.epochs, seed)
                        else:
                            schedule, optimizer, lr = recipe
                            wd = 5e-4 if optimizer == "sgd" else 1e-4
                            model = fit(model, splits.train, args.epochs, lr=lr, weight_decay=wd, batch_size=BATCH,
                                        seed=seed, lr_schedule=schedule, optimizer=optimizer)
                        seconds = time.perf_counter() - started
                        record = {"model": name, "seed": seed, "budget": budget, "cut": cut_name, "recipe": label,
                                  "epochs": args.epochs, "params": count_params(model),
                                  "val_accuracy": evaluate(model, splits.val), "test_accuracy": evaluate(model,
                                                                                                         splits.test),
                                  "seconds": seconds, "commit": commit, "machine": where}
                        records.append(record)
                        done.add(key)
                        records[:] = save(path, records)
                        print(f"{name} seed {seed} {budget:.0%} {cut_name:12s} {label:32s} val "
                              f"{record['val_accuracy']:.4f} test {record['test_accuracy']:.4f} "
                              f"({seconds:.0f} s)", flush=True)
    write_text_atomic(args.out + ".md", render(save(path, records)))
    return 0


def render(records: list) -> str:
    """Mean validation and test accuracy per (cut, recipe) over models, budgets and seeds, best first by
    validation; then each cell."""
    groups = {}
    for r in records:
        groups.setdefault((r["cut"], r["recipe"]), []).append(r)
    cells = sorted({(r["model"], r["budget"]) for r in records})
    def listed(key, fmt=str):
        return ", ".join(sorted({fmt(r[key]) for r in records}))

    lines = ["# Fine-tuning recipe after a cut, at equal epochs", "",
             f"Records: {len(records)}; machines: {listed('machine')}; commits: {listed('commit')}; epochs: "
             f"{listed('epochs', lambda v: f'{v:g}')}; seeds: {listed('seed')}. Chosen by validation accuracy; test "
             f"shown beside it, never used to choose. A row without a cell (–) averages the cells it has. `loop` "
             f"rows are whole `GrowPushPrune` runs of a candidate recipe from the base (`LOOP_CANDIDATES`).", "",
             "| cut | recipe | mean val | mean test | " + " | ".join(f"{m} {b:.0%} test" for m, b in cells) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cells)]
    ranked = sorted(groups.items(), key=lambda kv: -statistics.mean(r["val_accuracy"] for r in kv[1]))
    for (cut, recipe), rs in ranked:
        per = []
        for m, b in cells:
            got = [r["test_accuracy"] for r in rs if r["model"] == m and r["budget"] == b]
            per.append(f"{statistics.mean(got):.4f}" if got else "–")
        lines.append(f"| {cut} | {recipe} | {statistics.mean(r['val_accuracy'] for r in rs):.4f} | "
                     f"{statistics.mean(r['test_accuracy'] for r in rs):.4f} | " + " | ".join(per) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
