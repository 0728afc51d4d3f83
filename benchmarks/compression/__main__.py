"""Compression benchmark: GPP against our baselines and Torch-Pruning, side by side on the same footing.

    python -m benchmarks.compression --quick           # LeNet-5, 1 seed, 2 budgets: a few minutes on 2 cores
    python -m benchmarks.compression                   # LeNet-5 and VGG-BN, 3 seeds (about 2 h on 2 cores)
    python -m benchmarks.compression --resume          # go on with an interrupted run (same settings)
    python -m benchmarks.compression --models vgg --seeds 0 --budgets 0.1 --methods gpp,l1

For every (model, data set, seed) one base model is trained. Then every method gets the same extra training
before its cut, `prep_epochs` epochs that differ only in the objective: cross-entropy for the one-shot
criteria and Torch-Pruning, the push loss for `gpp`, cross-entropy plus an L1 penalty on BatchNorm scales for
`slimming` (a prepared model does not depend on the budget, so it is trained once per seed and shared). Each
method then cuts its copy to the same parameter budget (a fraction of the base), gets its BatchNorm
statistics recalibrated, and is fine-tuned with the same epochs and learning rate. Recorded per run:
parameters, FLOPs, test accuracy right after the cut (before any fine-tuning) and after fine-tuning, CPU
latency at batch 1 and 64.

Methods: `gpp` (the library's own loop iteration, `gpp_ext.loop.push_stage` then `prune_stage` with the
budget schedule in two cuts; the push weights are `LoopConfig`'s), `gpp-nopush` (the same without push),
`slimming` (BN-scale pruning after the sparsity training), every criterion of the registry in one shot (`l1`,
`taylor`, `random` by default; `lda`, `fisher`, `bn_scale` on request), and
`torch_pruning:<magnitude|bn_scale|taylor|random>:<local|global>` when the optional `torch-pruning` package is
installed. All training goes through `gpp_ext.training.fit`, as in the `gpp` command. Results are written after every run (atomically) to benchmarks/results/compression.json;
the table (.md) and the accuracy-vs-parameters plot (.png) are rendered from all the records at the end. Base
and prepared models are cached under runs/compression/ so that `--resume` does not retrain them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gpp_ext
from gpp_ext import data, models
from gpp_ext.classifier import find_classifier
from gpp_ext.io import write_atomic, write_text_atomic
from gpp_ext.layers import is_batch_norm
from gpp_ext.loop import LoopConfig, prune_stage, push_stage
from gpp_ext.pruning import criteria
from gpp_ext.training import evaluate, fit, latency_ms, recalibrate_batchnorm

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
# the methods run by default (with Torch-Pruning's); every other registered criterion runs on request
OURS = ("gpp", "gpp-nopush", "l1", "slimming", "taylor", "random")
LOOP_METHODS = ("gpp", "gpp-nopush")
TP_CRITERIA = ("magnitude", "bn_scale", "taylor", "random")
SLIMMING_L1 = 1e-4  # network slimming's sparsity weight on |gamma|


def known_methods() -> list:
    """Every method the harness can run without Torch-Pruning: the loop, slimming, each registered criterion."""
    return list(dict.fromkeys(list(LOOP_METHODS) + ["slimming"] + criteria.names()))


def loop_config(args, seed, budget=1.0) -> LoopConfig:
    """The library's loop settings for the `gpp` methods: its own push weights and criterion, the harness's
    epochs and learning rate, and the budget schedule in two cuts (the first to sqrt(budget))."""
    return LoopConfig(push_epochs=args.prep_epochs, lr=args.lr, seed=seed, schedule="budget", target_params=budget,
                      max_iterations=1, cuts=2)


def train(model, dataset, epochs, lr, seed, penalty=None):
    """Cross-entropy training (plus an optional penalty) with the library's `fit`."""
    return fit(model, dataset, epochs, lr=lr, seed=seed, penalty=penalty).eval()


def _slimming_penalty(model):
    return SLIMMING_L1 * sum(m.weight.abs().sum() for m in model.modules() if is_batch_norm(m) and m.weight is not None)


def prepare(kind, base, splits, args, seed):
    """The extra training every method gets before its cut (module docstring): "ce", "push" or "slimming"."""
    model = copy.deepcopy(base)
    if kind == "push":
        model, _ = push_stage(model, splits, loop_config(args, seed), seed)
        return model.eval()
    return train(model, splits.train, args.prep_epochs, args.lr, seed,
                 penalty=_slimming_penalty if kind == "slimming" else None)


def preparation(method: str) -> str:
    return {"gpp": "push", "slimming": "slimming"}.get(method, "ce")


def ours(method, model, splits, budget, args, seed):
    """One of our methods on its prepared model; returns the cut (not yet fine-tuned) model."""
    if method in LOOP_METHODS:
        model, _ = prune_stage(model, splits, loop_config(args, seed, budget), 1, args.base_params, seed)
        return model
    loader = DataLoader(splits.train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    example = torch.zeros(2, *splits.input_shape)
    criterion = "bn_scale" if method == "slimming" else method
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
        classifier = dict(m.named_modules())[find_classifier(m)]
        pruner = tp.pruner.MetaPruner(m, example, importance=importance, pruning_ratio=ratio,
                                      global_pruning=scope == "global", ignored_layers=[classifier])
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


# Bumped whenever the harness's methods or training change, so --resume never mixes records of two harnesses
# (2: every method trains through gpp_ext.training.fit, and `gpp` is the loop's own push and prune stages).
HARNESS_VERSION = 2


def settings(args, model: str) -> dict:
    """What a record's numbers depend on besides method, budget and seed; `--resume` reuses only matching ones."""
    return {"harness": HARNESS_VERSION, "dataset": args.data, "mode": args.mode, "epochs": args.epochs[model],
            "prep_epochs": args.prep_epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr}


def cached(path, build, resume):
    """A trained model from `path` when resuming and it is there, else `build()` saved (atomically) to `path`."""
    if resume and os.path.exists(path):
        return gpp_ext.io.load(path)
    model = build()
    gpp_ext.io.save(model, path)
    return model


def run(args, records: list, save) -> None:
    """Runs every (model, seed, budget, method) not yet in `records`, appending to it and calling `save(records)`
    after each run."""
    done = {(r["model"], r["seed"], r["budget"], r["method"]) for r in records}
    for name in args.models:
        for seed in args.seeds:
            budgets = args.budgets[name] if isinstance(args.budgets, dict) else args.budgets
            todo = [(b, m) for b in budgets for m in args.methods if (name, seed, b, m) not in done]
            if not todo:
                continue
            splits = data.load_dataset(args.data, seed=seed)
            config = settings(args, name)
            stem = os.path.join(args.cache, f"{name}-{args.data}-{args.mode}-seed{seed}")

            def build_base():
                torch.manual_seed(seed)
                kwargs = {"input_size": splits.input_shape[-1]} if name == "lenet5" else {}
                base = models.build(name, in_channels=splits.input_shape[0], num_classes=splits.num_classes, **kwargs)
                return train(base, splits.train, config["epochs"], args.lr, seed)

            base = cached(stem + "-base.pt", build_base, args.resume)
            args.base_params = gpp_ext.count_params(base)
            has_bn = any(is_batch_norm(m) for m in base.modules())
            prepared = {}
            base_acc = None
            print(f"{name} seed {seed}: base {args.base_params:,} params", flush=True)
            loader = DataLoader(splits.train, batch_size=256, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            for budget, method in todo:
                if method.startswith("torch_pruning:bn_scale") and not has_bn:
                    continue  # Torch-Pruning's BN-scale criterion prunes nothing without BatchNorm
                started = time.perf_counter()
                kind = preparation(method)
                if kind not in prepared:
                    prepared[kind] = cached(f"{stem}-{kind}.pt", lambda: prepare(kind, base, splits, args, seed),
                                            args.resume)
                if base_acc is None:  # the reference every method is compared with: base + CE preparation
                    if "ce" not in prepared:
                        prepared["ce"] = cached(f"{stem}-ce.pt", lambda: prepare("ce", base, splits, args, seed),
                                                args.resume)
                    base_acc = evaluate(prepared["ce"], splits.test)
                    print(f"  reference (base + {args.prep_epochs} epoch(s)): test accuracy {base_acc:.4f}", flush=True)
                model = copy.deepcopy(prepared[kind])
                if method.startswith("torch_pruning:"):
                    model = torch_pruning(method, model, splits, budget, seed)
                else:
                    model = ours(method, model, splits, budget, args, seed)
                recalibrate_batchnorm(model, loader)  # for every method (docs/design.md §2.8)
                after_prune = evaluate(model, splits.test)
                model = train(model, splits.train, args.finetune_epochs, args.lr, seed)
                example = torch.zeros(2, *splits.input_shape)
                record = {"method": method, "model": name, "dataset": args.data, "budget": budget, "seed": seed,
                          "params": gpp_ext.count_params(model), "flops": gpp_ext.count_flops(model, example),
                          "base_params": args.base_params, "base_test_accuracy": base_acc,
                          "acc_after_prune": after_prune, "test_accuracy": evaluate(model, splits.test),
                          "latency_ms_b1": latency_ms(model, splits.input_shape, 1),
                          "latency_ms_b64": latency_ms(model, splits.input_shape, 64, 5),
                          "seconds": round(time.perf_counter() - started, 1)}
                # the budget is an upper bound; 2% slack for the granularity of whole channels
                record["met_budget"] = record["params"] <= budget * args.base_params * 1.02
                record.update(config, commit=args.commit, torch=torch.__version__, machine=args.machine)
                records.append(record)
                save(records)
                print(f"  {method:<34} budget {budget:>5.0%}: params {record['params']:>8,} "
                      f"after cut {after_prune:.4f} -> {record['test_accuracy']:.4f} ({record['seconds']:.0f} s)",
                      flush=True)


def _mean_std(values) -> str:
    return (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1
            else f"{values[0]:.4f}")


def render(records: list, meta: dict) -> str:
    """Markdown: how the numbers were made, who wins at each budget, then every method at every budget."""
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r["budget"]), {}).setdefault(r["method"], []).append(r)
    lines = [f"# Compression benchmark ({', '.join(sorted({r['dataset'] for r in records}))})", "",
             f"Rendered {meta['date']}. Machine: {', '.join(sorted({r['machine'] for r in records}))}; torch "
             f"{', '.join(sorted({r['torch'] for r in records}))}; commit(s) "
             f"{', '.join(sorted({r['commit'] for r in records}))}. Every method starts from the same base model, "
             "gets the same extra training before its cut (cross-entropy, push or sparsity: see the harness), is "
             "cut to the same parameter budget, has BatchNorm recalibrated, and gets the same fine-tuning. "
             "Accuracies are on the test set, mean ± std over seeds; latency is the median CPU time of one "
             "forward pass.", ""]
    for model in sorted({r["model"] for r in records}):
        mine = [r for r in records if r["model"] == model]
        conf = {k: sorted({str(r[k]) for r in mine}) for k in ("mode", "epochs", "prep_epochs", "finetune_epochs",
                                                                "lr")}
        reference = {r["seed"]: r["base_test_accuracy"] for r in mine}  # one per seed
        lines.append(f"- **{model}**: base {', '.join(conf['epochs'])} epochs, preparation "
                     f"{', '.join(conf['prep_epochs'])}, fine-tuning {', '.join(conf['finetune_epochs'])} epoch(s) "
                     f"at lr {', '.join(conf['lr'])}; mode {', '.join(conf['mode'])}; seeds {sorted(reference)}; "
                     f"reference test accuracy (base + preparation epochs of cross-entropy) "
                     f"{_mean_std(list(reference.values()))}.")
    lines += ["", "## Who wins", "",
              "| model | budget | best (test acc) | gpp: test acc, rank | gpp-nopush: rank | best Torch-Pruning |",
              "|---|---:|---|---|---:|---|"]

    def ranked(by_method):
        return sorted(by_method.items(), key=lambda kv: -statistics.mean(r["test_accuracy"] for r in kv[1]))

    def met(rs):
        return all(r.get("met_budget", True) for r in rs)

    for (model, budget), by_method in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        # a method that missed the budget in any seed is larger than the others: it is not ranked here
        order = ranked({m: rs for m, rs in by_method.items() if met(rs)})
        names = [m for m, _ in order]

        def acc(method):
            return statistics.mean(r["test_accuracy"] for r in by_method[method])

        tp = [m for m in names if m.startswith("torch_pruning:")]
        lines.append(f"| {model} | {budget:.0%} | {names[0]} ({acc(names[0]):.4f}) | "
                     + (f"{acc('gpp'):.4f}, {names.index('gpp') + 1} of {len(names)}" if "gpp" in names else "–")
                     + " | " + (f"{names.index('gpp-nopush') + 1}" if "gpp-nopush" in names else "–")
                     + " | " + (f"{tp[0]} ({acc(tp[0]):.4f})" if tp else "–") + " |")
    lines += ["", "Ranks count the methods that met the budget (2% slack for whole channels) in every seed; † in the "
              "table below marks the others.", "", "## Every method", "",
              "| model | budget | method | params | FLOPs | acc after cut | test acc | latency b1 (ms) | b64 (ms) |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (model, budget), by_method in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for method, rs in ranked(by_method):
            mean = {k: statistics.mean(r[k] for r in rs) for k in ("params", "flops", "latency_ms_b1",
                                                                    "latency_ms_b64")}
            missed = "" if met(rs) else f" † ({sum(not r['met_budget'] for r in rs)} of {len(rs)} over budget)"
            lines.append(f"| {model} | {budget:.0%} | {method}{missed} | {mean['params']:,.0f} | {mean['flops']:,.0f} | "
                         f"{_mean_std([r['acc_after_prune'] for r in rs])} | "
                         f"{_mean_std([r['test_accuracy'] for r in rs])} | "
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


# models, seeds, budgets (one list, or one per model), base epochs per model, preparation and fine-tuning
# epochs, learning rate. The full mode leaves VGG's 50% budget out: VGG costs about 50 s an epoch on 2 cores,
# and the time goes to three seeds of the small budgets, where methods part (docs/design.md §2.8).
MODES = {
    "smoke": dict(models=["lenet5"], seeds=[0], budgets=[0.3], epochs={"lenet5": 1, "vgg": 1}, prep_epochs=1,
                  finetune_epochs=1, lr=3e-3),
    "quick": dict(models=["lenet5"], seeds=[0], budgets=[0.25, 0.1], epochs={"lenet5": 5, "vgg": 3},
                  prep_epochs=1, finetune_epochs=2, lr=2e-3),
    "full": dict(models=["lenet5", "vgg"], seeds=[0, 1, 2],
                 budgets={"lenet5": [0.5, 0.25, 0.1, 0.05], "vgg": [0.25, 0.1, 0.05]},
                 epochs={"lenet5": 10, "vgg": 6}, prep_epochs=1, finetune_epochs=2, lr=2e-3),
}


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def _load_records(path, args) -> list:
    """The records of an earlier run with the same settings (for --resume); refuses to mix settings."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"benchmarks.compression: --resume cannot read {path}: {e}")
    mismatched = [r for r in records if r.get("model") not in args.epochs
                  or any(r.get(k) != v for k, v in settings(args, r["model"]).items())]
    if mismatched:
        raise SystemExit(f"benchmarks.compression: {path} holds {len(mismatched)} record(s) made with other settings "
                         f"(e.g. {json.dumps({k: mismatched[0].get(k) for k in settings(args, 'lenet5')})}); "
                         "resume with the same mode and --data, or write elsewhere with --out")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="LeNet-5, 1 seed, budgets 25%% and 10%%, short training")
    parser.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--models", type=_list(str, ("lenet5", "vgg")), help="comma-separated (default: the mode's)")
    parser.add_argument("--seeds", type=_list(int), help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--budgets", type=_list(float), help="comma-separated parameter fractions in (0, 1)")
    parser.add_argument("--methods", help="comma-separated method names (default: all; see above)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --out and run only the missing ones, reusing cached models")
    parser.add_argument("--out", default=os.path.join(RESULTS, "compression.json"))
    parser.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "runs", "compression"),
                        help="folder for the trained base and prepared models (default: runs/compression)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's tiny run
    args = parser.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401  (only whether it is installed)
        tp_methods = [f"torch_pruning:{c}:{s}" for c in TP_CRITERIA for s in ("local", "global")]
    except ImportError:
        print("benchmarks.compression: torch-pruning is not installed (pip install torch-pruning); its rows are "
              "left out", file=sys.stderr)
        tp_methods = []
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.budgets, list) and any(not 0 < b < 1 for b in args.budgets):
        parser.error(f"--budgets: every budget must be a fraction in (0, 1), got {args.budgets}")
    known = known_methods() + tp_methods
    if args.methods is None:
        args.methods = list(OURS) + tp_methods
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in known]
        if unknown or not args.methods:
            parser.error(f"--methods: unknown {unknown or args.methods}; known here: {', '.join(known)}"
                         + ("" if tp_methods else " (torch-pruning is not installed)"))
    args.commit, args.machine = _commit(), _machine()
    records = _load_records(args.out, args) if args.resume else []
    if records:
        print(f"benchmarks.compression: resuming with {len(records)} record(s) from {args.out}", flush=True)
    stem = os.path.splitext(args.out)[0]

    def save(rs):  # after every run, so an interruption loses at most the run in progress
        write_text_atomic(args.out, json.dumps(rs, indent=1) + "\n")

    started = time.perf_counter()
    interrupted = False
    # `kill` (SIGTERM) stops a background run as cleanly as Ctrl-C does: a shell starts background jobs with
    # SIGINT ignored, so Ctrl-C's signal cannot reach them.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args, records, save)
    except KeyboardInterrupt:  # what was measured so far is saved and rendered; --resume goes on from there
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not records:
        print("benchmarks.compression: nothing was run", file=sys.stderr)
        return 130 if interrupted else 1
    save(records)
    table = render(records, {"date": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_text_atomic(stem + ".md", table)
    plot(records, stem + ".png")
    print(table)
    print(f"benchmarks.compression: {len(records)} records ({round(time.perf_counter() - started)} s this run) "
          f"-> {args.out}, {stem}.md, {stem}.png")
    if interrupted:
        print("benchmarks.compression: interrupted; run again with --resume to go on", file=sys.stderr)
        return 130
    return 0

if __name__ == "__main__":
    sys.exit(main())
