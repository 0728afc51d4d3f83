"""Compression benchmark: GPP against our baselines and the strongest peers, at equal training.

    python -m benchmarks.compression --quick           # LeNet-5, 1 seed, 2 budgets: a few minutes on 2 cores
    python -m benchmarks.compression                   # LeNet-5 and VGG-BN, 3 seeds: many hours; run it in parts
    python -m benchmarks.compression --resume          # go on with an interrupted run (same settings)
    python -m benchmarks.compression --models vgg --seeds 0 --budgets 0.1 --methods gpp,l1
    python -m benchmarks.compression --latency         # time the kept compact models (on a quiet machine)

The protocol (harness version 3):
1. One base model per (model, seed), trained to convergence with a cosine schedule and cached; the full mode
   checks it reaches the accuracy the protocol asks (VGG-BN 93.0%, LeNet-5 90.0% test on Fashion-MNIST).
2. Choices on validation, at seed 0 and one budget per model: the regularisation strength of each
   sparse-training method (`methods.SWEEPS`) and GPP's knobs (`GPP_GRID`), each the best final validation
   accuracy; then GPP's ablation (each component switched on or off). Recorded with test accuracy, which is
   never used to choose, in `<out>-choices.json`; a trial whose knobs an earlier one already ran (defaults
   spelled out or not) reuses its figures and names it (`same_as`).
3. Every method then gets the same `epochs` of training after the base, its preparation counted (sparse
   training, a push, a fade: at most `prep_epochs`), the rest fine-tuning with the same optimiser and cosine
   schedule; it is cut to the budget (a fraction of the parameters, or of the FLOPs), and BatchNorm is
   recalibrated once after the cut. One-shot criteria spend the whole budget fine-tuning.
4. Recorded per run: parameters, FLOPs, test accuracy at the end of the preparation, right after the cut, after
   recalibration, after 1/8, 1/4, 1/2 and 1 epoch of fine-tuning and at the end, validation accuracy at the
   end, CPU latency at batch 1 and 64, the seconds it took, and every setting it depends on. The fine-tuned
   compact model is kept under the cache folder (runs/compression/compact/).
5. The latency pass (`--latency`, after the runs): per model and budget, the base and every kept compact model
   timed interleaved in one window, eager PyTorch and ONNX Runtime, at batch 1 and 64; the tables report its
   speed-ups over the base, since latencies measured inside each run depend on what else the machine did.

Results are written after every run (atomically) to benchmarks/results/compression.json; the tables (.md) and
the accuracy-vs-cost plot (.png) are rendered from all records at the end. Base models and budget-independent
preparations are cached under runs/compression/, so `--resume` retrains nothing; the full mode's base models are
also kept in benchmarks/results/bases/ (committed, ~1.3 MB for a VGG-BN), so a fresh checkout resumes without
retraining them. Ctrl-C or SIGTERM saves and renders what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

import gpp_ext
from gpp_ext import data, models
from gpp_ext.io import write_text_atomic
from gpp_ext.layers import is_batch_norm
from gpp_ext.training import evaluate, fit, latency_ms, recalibrate_batchnorm, training_batches

from .._meta import git_commit, machine
from . import latency, methods, render

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
# Bumped whenever the methods or the protocol change, so --resume never mixes records of two harnesses
# (3: converged bases, equal total epochs, the strongest peers, accuracy along fine-tuning, FLOPs budgets).
HARNESS_VERSION = 3
DEFAULT_METHODS = ("gpp", "gpp-nopush", "slimming", "l1", "taylor", "random", "hesso_style")
THRESHOLDS = {"lenet5": 0.900, "vgg": 0.930}   # base test accuracy the full protocol asks for (Fashion-MNIST)
SWEEP_BUDGET = ("params", 0.1)                  # where the validation choices are made
# GPP's knobs tried on validation: one or two push-cut-fine-tune iterations, the push's share of the epochs,
# distillation from the model before the push, the width allocation across layers, the comparison of
# utilities across layers with the fade's schedule, the push terms' weights, and when the fade reaches zero
GPP_GRID = ({"iterations": 1, "push_share": 1 / 3}, {"iterations": 1, "push_share": 2 / 3},
            {"iterations": 2, "push_share": 1 / 2}, {"iterations": 1, "push_share": 1 / 3, "distill": 0.5},
            {"iterations": 1, "push_share": 1 / 3, "allocation": "uniform"},
            {"iterations": 1, "push_share": 1 / 3, "normalize": "none", "schedule": "linear"},
            {"iterations": 1, "push_share": 1 / 3, "normalize": "none", "schedule": "linear", "alpha": 0.0,
             "beta": 0.0, "gamma": 0.0},
            # the removal set at zero half-way through the push: the compact subnetwork then trains for the rest
            # of it (at hard budgets a fade that ends with the push leaves the cut model far below the base)
            {"iterations": 1, "push_share": 1 / 3, "normalize": "none", "schedule": "linear", "fade_end": 0.5},
            # the two findings together: the ablation around the entry above found its push terms costing
            # validation accuracy (as the entry with the terms off did on LeNet-5)
            {"iterations": 1, "push_share": 1 / 3, "normalize": "none", "schedule": "linear", "fade_end": 0.5,
             "alpha": 0.0, "beta": 0.0, "gamma": 0.0})
ABLATION = ({"reselect": 1}, {"terms": "toggle"}, {"schedule": "toggle"},
            {"criterion": "l1"}, {"distill": "toggle"}, {"iterations": "toggle"}, {"allocation": "toggle"},
            {"normalize": "toggle"}, {"fade_end": "toggle"},
            # raw L1 norms are not comparable across layers (deeper filters sum more inputs), so the fair swap of
            # the fade's driver to L1 also compares utilities within each layer
            {"criterion": "l1", "normalize": "mean"})
ABLATION_MODEL = "vgg"

# models, seeds, budgets per model [(kind, fraction)], base epochs, epochs after the base, of which at most
# prep_epochs before the cut, learning rate, and the sweep values (None: methods.SWEEPS, GPP_GRID, ABLATION)
MODES = {
    "smoke": dict(models=["vgg"], seeds=[0], budgets={"lenet5": [("params", 0.3)], "vgg": [("params", 0.3)]},
                  base_epochs={"lenet5": 1, "vgg": 1}, epochs=1.0, prep_epochs=0.5, lr=3e-3,
                  sweep_values=(1e-4,), grid=GPP_GRID[:1], ablation=ABLATION[:1]),
    "quick": dict(models=["lenet5"], seeds=[0], budgets={"lenet5": [("params", 0.25), ("params", 0.1)]},
                  base_epochs={"lenet5": 8, "vgg": 4}, epochs=3.0, prep_epochs=1.0, lr=1e-3,
                  sweep_values=None, grid=GPP_GRID[:2], ablation=()),
    "full": dict(models=["lenet5", "vgg"], seeds=[0, 1, 2],
                 budgets={"lenet5": [("params", b) for b in (0.5, 0.25, 0.1, 0.05)],
                          "vgg": [("params", b) for b in (0.25, 0.1, 0.05, 0.02)] + [("flops", 0.25), ("flops", 0.1)]},
                 base_epochs={"lenet5": 20, "vgg": 15}, epochs=3.0, prep_epochs=1.0, lr=1e-3,
                 sweep_values=None, grid=GPP_GRID, ablation=ABLATION),
}


def settings(args, model: str) -> dict:
    """What a record's numbers depend on besides method, budget and seed; `--resume` reuses only matching ones."""
    return {"harness": HARNESS_VERSION, "dataset": args.data, "mode": args.mode,
            "base_epochs": args.base_epochs[model], "epochs": args.epochs, "prep_epochs": args.prep_epochs,
            "lr": args.lr}


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
        return fit(model, splits.train, args.base_epochs[name], lr=2e-3, seed=seed, lr_schedule="cosine")

    stem = f"{name}-{args.data}-{args.mode}-seed{seed}-base{args.base_epochs[name]}"
    return cache.get(stem, build, keep=True)


def compact_path(folder: str, stem: str, kind: str, budget: float, method: str) -> str:
    """Where a run's fine-tuned compact model is kept (under the cache folder, not committed)."""
    return os.path.join(folder, "compact", f"{stem}-{kind}{budget:g}-{method.replace(':', '_')}.pt")


def measure(method: str, base, setup: methods.Setup, cache: Cache, stem: str, keep: bool = True) -> dict:
    """One method's run: its preparation and cut, recalibration, fine-tuning with accuracy along the way.
    `keep`: keep the compact model for the latency pass (a record's run; a validation trial keeps none, so it
    never overwrites the model of the record with the same method and budget)."""
    started = time.perf_counter()
    splits = setup.splits

    def cached(key, build):
        return cache.get(f"{stem}-{key}", build)

    before, cut, used = methods.run(method, base, setup, cached=cached)
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

    fit(cut, splits.train, remaining, lr=setup.lr, batch_size=setup.batch_size, seed=setup.seed + 17,
        lr_schedule="cosine", after_step=along)
    # kept for the latency pass (`--latency`), which times every compact model of a budget in one window
    if keep:
        gpp_ext.io.save(cut, compact_path(cache.folder, stem, setup.kind, setup.budget, method))
    example = torch.zeros(2, *splits.input_shape)
    return {"params": gpp_ext.count_params(cut), "flops": gpp_ext.count_flops(cut, example),
            "acc_end_of_prep": acc_prep, "acc_after_cut": acc_cut, "acc_after_recal": acc_recal, "ft_curve": curve,
            "test_accuracy": evaluate(cut, splits.test), "val_accuracy": evaluate(cut, splits.val),
            "prep_epochs_used": used, "finetune_epochs": remaining,
            "latency_ms_b1": latency_ms(cut, splits.input_shape, 1),
            "latency_ms_b64": latency_ms(cut, splits.input_shape, 64, 5),
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------------ choices

def _choose(args, model_name, splits, base, cache, choices, save_choices, stem) -> dict:
    """The knobs every method runs with for `model_name`, chosen on validation (resumable, recorded)."""
    kind, budget = args.budgets[model_name][0] if args.mode == "smoke" else SWEEP_BUDGET
    done = {(c["model"], c["what"], c["setting"]): c for c in choices}
    seed = args.seeds[0]

    def same_run(method, knobs):
        """An earlier GPP trial (grid or ablation) that ran exactly these knobs, defaults spelled out or not."""
        if method != "gpp":
            return None
        full = {**methods.GPP_DEFAULTS, **knobs}
        for c in choices:
            measured = c["what"].startswith("gpp ") and "same_as" not in c
            same_place = (c["model"], c["budget_kind"], c["budget"], c["seed"]) == (model_name, kind, budget, seed)
            if measured and same_place and {**methods.GPP_DEFAULTS, **c["knobs"]} == full \
                    and all(c.get(k) == v for k, v in settings(args, model_name).items()):
                return c
        return None

    def trial(what, method, knobs, setting):
        key = (model_name, what, setting)
        if key not in done and (earlier := same_run(method, knobs)) is not None:
            # the same run under another name: its figures are reused, not measured twice
            entry = {**{k: v for k, v in earlier.items() if k != "chosen"}, "what": what, "setting": setting,
                     "knobs": knobs, "same_as": f"{earlier['what']}: {earlier['setting']}"}
            choices.append(entry)
            done[key] = entry
            save_choices(choices)
            print(f"  choice {what:<28} {setting:<40} val {entry['val_accuracy']:.4f} (= {entry['same_as']})",
                  flush=True)
        if key not in done:
            setup = methods.Setup(splits, budget, kind, seed, args.epochs, args.prep_epochs, args.lr, knobs=knobs)
            m = measure(method, base, setup, cache, stem, keep=False)
            entry = {"model": model_name, "budget_kind": kind, "budget": budget, "seed": seed, "what": what,
                     "setting": setting, "knobs": knobs, "val_accuracy": m["val_accuracy"],
                     "test_accuracy": m["test_accuracy"], "acc_after_cut": m["acc_after_cut"],
                     "acc_end_of_prep": m["acc_end_of_prep"], **settings(args, model_name),
                     "commit": args.commit, "machine": args.machine}
            choices.append(entry)
            done[key] = entry
            save_choices(choices)
            print(f"  choice {what:<28} {setting:<40} val {m['val_accuracy']:.4f}", flush=True)
        return done[key]

    def best(what, entries):
        top = max(entries, key=lambda e: e["val_accuracy"])
        for e in entries:
            e["chosen"] = e is top
        save_choices(choices)
        return top["knobs"]

    knobs = {}
    values = args.sweep_values
    for family, regs in methods.SWEEPS.items():
        method = family if family == "slimming" else f"{family}:global"
        if method not in args.available or (family != "torch_pruning:group_norm_sl" and not _has_bn(base)):
            continue  # slimming and BN-scale pruning need BatchNorm
        if not any(m == family or m.startswith(family + ":") for m in args.methods):
            continue
        entries = [trial(f"{family} reg", method, {"reg": reg}, f"reg={reg:g}") for reg in (values or regs)]
        knobs[family] = best(family, entries)
    if "gpp" in args.methods or "hesso_style" in args.methods:
        entries = [trial("gpp knobs", "gpp", dict(g), _setting(g)) for g in args.grid]
        knobs["gpp"] = best("gpp", entries)
        if model_name == ABLATION_MODEL or args.mode == "smoke":
            for change in args.ablation:
                variant = dict(knobs["gpp"])
                for k, v in change.items():
                    if k == "terms":  # the v1 push terms on the kept features: off if on, on if off
                        on = any(variant.get(w, methods.GPP_DEFAULTS[w]) for w in ("alpha", "beta", "gamma"))
                        variant.update({w: 0.0 if on else methods.GPP_DEFAULTS[w] for w in ("alpha", "beta", "gamma")})
                        continue
                    if v == "toggle":
                        v = {"distill": 0.0 if variant.get("distill", 0.0) else 0.5,
                             "iterations": 2 if variant.get("iterations", 1) == 1 else 1,
                             "allocation": "uniform" if variant.get("allocation", "global") == "global"
                             else "global",
                             "schedule": "linear" if variant.get("schedule", "cosine") == "cosine" else "cosine",
                             "normalize": "none" if variant.get("normalize", "mean") == "mean" else "mean",
                             "fade_end": 1.0 if variant.get("fade_end", 1.0) < 1 else 0.5}[k]
                        if k == "iterations":
                            variant["push_share"] = 1 / 2 if v == 2 else 1 / 3
                    variant[k] = v
                trial("gpp ablation", "gpp", variant, _setting(change) + " → " + _setting(variant))
    return knobs


def _has_bn(model) -> bool:
    return any(is_batch_norm(m) for m in model.modules())


def _setting(knobs: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items()) or "defaults"


def knobs_for(method: str, chosen: dict) -> dict:
    family = methods.sweep_key(method)
    if family is not None:
        return chosen.get(family, {})
    if method == "gpp":
        return chosen.get("gpp", {})
    if method == "hesso_style":  # the same fade as GPP's, driven by the peer's saliency
        return {k: v for k, v in chosen.get("gpp", {}).items() if k in ("reselect",)}
    return {}


# ---------------------------------------------------------------------------------------------------- run

def run(args, records: list, save, choices: list, save_choices) -> None:
    """Runs every (model, seed, budget, method) not yet in `records`, saving after each run."""
    done = {(r["model"], r["seed"], r.get("budget_kind", "params"), r["budget"], r["method"]) for r in records}
    # full-mode bases are kept beside the results (benchmarks/results/bases/), committed with them
    kept = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bases") if args.mode == "full" else None
    cache = Cache(args.cache, args.resume, kept)
    for name in args.models:
        first_splits = None
        chosen = None
        for seed in args.seeds:
            todo = [(k, b, m) for k, b in args.budgets[name] for m in args.methods
                    if (name, seed, k, b, m) not in done]
            if not todo and chosen is not None:
                continue
            splits = data.load_dataset(args.data, seed=seed)
            first_splits = first_splits or splits
            base = base_model(name, splits, args, seed, cache)
            base_acc = evaluate(base, splits.test)
            stem = f"{name}-{args.data}-{args.mode}-seed{seed}"
            print(f"{name} seed {seed}: base {gpp_ext.count_params(base):,} params, test accuracy {base_acc:.4f}",
                  flush=True)
            if args.mode == "full" and base_acc < THRESHOLDS.get(name, 0.0):
                print(f"  warning: the base is below the protocol's {THRESHOLDS[name]:.1%}", file=sys.stderr)
            if chosen is None:  # the validation choices are made once, at the first seed
                chosen = _choose(args, name, splits, base, cache, choices, save_choices, stem)
                # records made with knobs other than those chosen now (a choice revised by a longer grid) are redone
                stale = [r for r in records if r["model"] == name and r.get("knobs", {}) != knobs_for(r["method"], chosen)]
                if stale:
                    print(f"  redoing {len(stale)} record(s) made with other knobs than the current choice", flush=True)
                    records[:] = [r for r in records if not any(r is x for x in stale)]
                    done -= {(r["model"], r["seed"], r.get("budget_kind", "params"), r["budget"], r["method"])
                             for r in stale}
                    save(records)
                todo = [(k, b, m) for k, b in args.budgets[name] for m in args.methods
                        if (name, seed, k, b, m) not in done]
            for kind, budget, method in todo:
                if (method.startswith("torch_pruning:bn_scale") or method == "slimming") and not _has_bn(base):
                    continue  # BN-scale pruning and network slimming do not exist without BatchNorm
                setup = methods.Setup(splits, budget, kind, seed, args.epochs, args.prep_epochs, args.lr,
                                      knobs=knobs_for(method, chosen))
                m = measure(method, base, setup, cache, stem)
                base_cost = gpp_ext.count_params(base) if kind == "params" else \
                    gpp_ext.count_flops(base, torch.zeros(2, *splits.input_shape))
                record = {"method": method, "model": name, "dataset": args.data, "budget_kind": kind,
                          "budget": budget, "seed": seed, "knobs": setup.knobs, **m,
                          "base_params": gpp_ext.count_params(base), "base_cost": base_cost,
                          "base_test_accuracy": base_acc,
                          # the budget is an upper bound; 2% slack for the granularity of whole channels
                          "met_budget": m[kind] <= budget * base_cost * 1.02}
                record.update(settings(args, name), commit=args.commit, torch=torch.__version__,
                              machine=args.machine)
                records.append(record)
                save(records)
                print(f"  {method:<34} {kind} {budget:>5.0%}: {m[kind]:>11,} after cut {m['acc_after_cut']:.4f} "
                      f"-> recal {m['acc_after_recal']:.4f} -> {m['test_accuracy']:.4f} ({m['seconds']:.0f} s)",
                      flush=True)


def _list(kind, choices=None):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {list(choices)}, got {text!r}"
                                             if choices is not None else f"expected a non-empty list, got {text!r}")
        return values
    return parse


def _load(path, args, what) -> list:
    """The records of an earlier run with the same settings (for --resume); refuses to mix settings."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"benchmarks.compression: --resume cannot read {path}: {e}")
    mismatched = [r for r in records if r.get("model") not in args.base_epochs
                  or any(r.get(k) != v for k, v in settings(args, r["model"]).items())]
    if mismatched:
        raise SystemExit(f"benchmarks.compression: {path} holds {len(mismatched)} {what} made with other settings "
                         f"(e.g. {json.dumps({k: mismatched[0].get(k) for k in settings(args, 'lenet5')})}); "
                         "resume with the same mode and --data, or write elsewhere with --out")
    return records


def _latency(args, stem: str, choices_path: str) -> int:
    """The `--latency` pass over the records in `args.out` (see `latency.py`)."""
    records, choices = _load(args.out, args, "record(s)"), _load(choices_path, args, "choice(s)")
    records_of = [r for r in records if r["model"] in args.models]
    if not records_of:
        print(f"benchmarks.compression: no records of {args.models} in {args.out} to time", file=sys.stderr)
        return 1
    kept = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bases") if args.mode == "full" else None
    shapes = {}

    def input_shape_of(name):
        if name not in shapes:
            shapes[name] = data.load_dataset(args.data, seed=0).input_shape
        return shapes[name]

    def load_base(name):
        stem0 = f"{name}-{args.data}-{args.mode}-seed0-base{args.base_epochs[name]}"
        for folder in (args.cache, kept):
            if folder and os.path.exists(os.path.join(folder, stem0 + ".pt")):
                return gpp_ext.io.load(os.path.join(folder, stem0 + ".pt"))
        raise SystemExit(f"benchmarks.compression --latency: no base model {stem0}.pt in {args.cache} or {kept}")

    def path_of(r):
        return compact_path(args.cache, f"{r['model']}-{args.data}-{args.mode}-seed{r['seed']}",
                            r.get("budget_kind", "params"), r["budget"], r["method"])

    def save(rs):
        write_text_atomic(args.out, json.dumps(rs, indent=1) + "\n")

    timed = latency.latency_pass(records_of, latency.compact_loader(path_of), load_base, input_shape_of,
                                 machine=args.machine, commit=args.commit, save=lambda _: save(records))
    print(f"benchmarks.compression: timed {timed} of {len(records_of)} record(s)' compact models", flush=True)
    _render(records, choices, stem)
    return 0 if timed else 1


def _render(records, choices, stem) -> str:
    table = render.render(records, {"date": time.strftime("%Y-%m-%d %H:%M:%S")}, choices)
    write_text_atomic(stem + ".md", table)
    render.plot(records, stem + ".png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet-5, 1 seed, budgets 25%% and 10%%")
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--models", type=_list(str, ("lenet5", "vgg")), help="comma-separated (default: the mode's)")
    parser.add_argument("--seeds", type=_list(int), help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--budgets", type=_list(float), help="comma-separated parameter fractions in (0, 1)")
    parser.add_argument("--flops-budgets", type=_list(float), help="comma-separated FLOP fractions in (0, 1)")
    parser.add_argument("--methods", help="comma-separated method names (default: all; see above)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --out and run only the missing ones, reusing cached models")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compression.json"))
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "runs", "compression"),
                        help="folder for the trained base and prepared models (default: runs/compression)")
    parser.add_argument("--render", action="store_true",
                        help="only render the tables and the plot from --out's records (e.g. while a run goes on)")
    parser.add_argument("--latency", action="store_true",
                        help="only time the kept compact models of --out's records, every budget's models and the "
                             "base interleaved in one window (run it on a quiet machine), then render")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's tiny run
    args = parser.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401  (only whether it is installed)
        tp = True
    except ImportError:
        print("benchmarks.compression: torch-pruning is not installed (pip install torch-pruning); its rows are "
              "left out", file=sys.stderr)
        tp = False
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[args.mode]
    args.models = args.models or mode["models"]
    args.seeds = args.seeds or mode["seeds"]
    for key in ("base_epochs", "epochs", "prep_epochs", "lr", "sweep_values", "grid", "ablation"):
        setattr(args, key, mode[key])
    for given in (args.budgets, args.flops_budgets):
        if given and any(not 0 < b < 1 for b in given):
            parser.error(f"--budgets/--flops-budgets: every budget must be a fraction in (0, 1), got {given}")
    if args.budgets or args.flops_budgets:
        chosen = [("params", b) for b in args.budgets or ()] + [("flops", b) for b in args.flops_budgets or ()]
        args.budgets = {m: chosen for m in args.models}
    else:
        args.budgets = {m: mode["budgets"][m] for m in args.models}
    args.available = methods.known(tp)
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS) + ([m for m in args.available if m.startswith("torch_pruning:")]
                                                if tp else [])
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in args.available]
        if unknown or not args.methods:
            parser.error(f"--methods: unknown {unknown or args.methods}; known here: {', '.join(args.available)}"
                         + ("" if tp else " (torch-pruning is not installed)"))
    args.commit, args.machine = git_commit(), machine()
    stem = os.path.splitext(args.out)[0]
    choices_path = stem + "-choices.json"
    if args.render:
        records, choices = _load(args.out, args, "record(s)"), _load(choices_path, args, "choice(s)")
        if not records:
            print(f"benchmarks.compression: no records in {args.out} to render", file=sys.stderr)
            return 1
        _render(records, choices, stem)
        return 0
    if args.latency:
        return _latency(args, stem, choices_path)
    records = _load(args.out, args, "record(s)") if args.resume else []
    choices = _load(choices_path, args, "choice(s)") if args.resume else []
    if records or choices:
        print(f"benchmarks.compression: resuming with {len(records)} record(s) and {len(choices)} choice(s)",
              flush=True)

    def save(rs):  # after every run, so an interruption loses at most the run in progress
        write_text_atomic(args.out, json.dumps(rs, indent=1) + "\n")

    def save_choices(cs):
        write_text_atomic(choices_path, json.dumps(cs, indent=1) + "\n")

    started = time.perf_counter()
    interrupted = False
    # `kill` (SIGTERM) stops a background run as cleanly as Ctrl-C does: a shell starts background jobs with
    # SIGINT ignored, so Ctrl-C's signal cannot reach them.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args, records, save, choices, save_choices)
    except KeyboardInterrupt:  # what was measured so far is saved and rendered; --resume goes on from there
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not records:
        print("benchmarks.compression: nothing was run", file=sys.stderr)
        return 130 if interrupted else 1
    save(records)
    print(_render(records, choices, stem))
    print(f"benchmarks.compression: {len(records)} records ({round(time.perf_counter() - started)} s this run) "
          f"-> {args.out}, {stem}.md, {stem}.png")
    if interrupted:
        print("benchmarks.compression: interrupted; run again with --resume to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
