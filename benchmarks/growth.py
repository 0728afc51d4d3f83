"""The growth benchmark: does a grown Inception net beat residual nets of the same size, does pushing and pruning
the largest grown net beat the smaller nets met while growing, and does scheduled grow-and-prune beat
train-then-prune at equal epochs?

    python -m benchmarks.growth                        # Fashion-MNIST, seeds 0, 1, 2 (hours on 2 CPU cores)
    python -m benchmarks.growth --resume               # go on after an interruption
    python -m benchmarks.growth --smoke                # digits, one seed, tiny epochs: proves the harness

Per seed, with the loop's training recipe (`loop.train_kwargs(recipes.build("gpp"))`) on the same splits as the
compression benchmark:

1. `grown`: the Inception net (`models.build("inception")`) trained `base_epochs`, then grown stage by stage by
   `growth.inception` (each candidate trained `grow_epochs`, kept if validation accuracy rose at all); every net
   met on the way is recorded (params, FLOPs, validation and test accuracy, the epochs it has seen, kept or not).
2. `pruned`: the largest grown net pushed and pruned by the default loop (`GrowPushPrune(...).run()`, epoch
   budget `prune_epochs`) to the size of each smaller kept net.
3. `resnet`: ResNet-8, -14 and -20 (CIFAR layout, stage widths w, 2w, and the last width bisected) chosen so the
   parameters match each kept grown net, trained from scratch for as many epochs as that net has seen.
4. `gap` against `pruned`: scheduled grow-and-prune (`gap.scheduled_grow_and_prune`) of the largest net's
   architecture from scratch, to each smaller size, with the epochs the largest net saw plus `prune_epochs`
   (what `pruned` had in all: train-then-prune at equal epochs).
5. `grown-triage`: the same trained net grown again with its most critical stages first (`triage` of its
   modules, each replaced by one layer and fine-tuned `grow_epochs` with distillation, then `stage_order`: what
   `LoopConfig(grow_order="triage")` runs), against the first-to-last order of 1.

Results go to benchmarks/results/growth.{json,md} atomically after every run; `--resume` keeps the runs recorded
with the same settings and runs the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

import gpp_ext
from gpp_ext import data, models, recipes
from gpp_ext.cost import count_flops, count_params
from gpp_ext.gap import scheduled_grow_and_prune
from gpp_ext.grow import grow
from gpp_ext.io import write_text_atomic
from gpp_ext.loop import GrowPushPrune, train_kwargs
from gpp_ext.models.resnet import ResNet
from gpp_ext.training import evaluate, fit
from gpp_ext.triage import stage_order, triage

from ._meta import git_commit, machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MODES = {
    "full": dict(data="fashion-mnist", seeds=[0, 1, 2], base_epochs=10, grow_epochs=2, prune_epochs=3,
                 max_modules_per_stage=3),
    "smoke": dict(data="digits", seeds=[0], base_epochs=1, grow_epochs=2, prune_epochs=1,
                  max_modules_per_stage=2),
}
RESNET_DEPTHS = {"resnet8": 1, "resnet14": 2, "resnet20": 3}


def resnet_of(params: int, blocks: int, in_channels: int, classes: int) -> ResNet:
    """The ResNet with `blocks` blocks per stage and stage widths (w, 2w, 4w) whose parameters come closest to
    `params`."""
    def build(w):
        return ResNet([w, 2 * w, 4 * w], blocks, in_channels=in_channels, num_classes=classes)

    def build_last(w, last):
        return ResNet([w, 2 * w, last], blocks, in_channels=in_channels, num_classes=classes)

    w = min(range(2, 129), key=lambda w: abs(count_params(build(w)) - params))
    lo, hi = 2 * w, 8 * w  # then the last stage's width, bisected: the parameters grow with it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_params(build_last(w, mid)) <= params else (lo, mid)
    return min((build_last(w, k) for k in (lo, hi)), key=lambda m: abs(count_params(m) - params))


class Runs:
    """The recorded runs (`path`), saved atomically after each; a run recorded with other settings is redone."""

    def __init__(self, path: str, settings: dict, resume: bool):
        self.path, self.settings = path, settings
        self.records = []
        if resume and os.path.exists(path):
            with open(path) as f:
                self.records = [r for r in json.load(f) if r.get("settings") == settings]
        elif os.path.exists(path) and not resume:
            raise SystemExit(f"benchmarks.growth: {path} holds results; pass --resume to go on, or move it away")

    def get(self, key: tuple):
        return next((r for r in self.records if tuple(r["key"]) == key), None)

    def add(self, key: tuple, record: dict) -> dict:
        """Records `record` under `key`, replacing a record of the same key (a run redone because its cached
        model was gone, e.g. in a fresh checkout)."""
        record = {"key": list(key), **record, "settings": self.settings, "commit": git_commit(),
                  "machine": machine()}
        self.records = [r for r in self.records if tuple(r["key"]) != tuple(key)] + [record]
        write_text_atomic(self.path, json.dumps(self.records, indent=1))
        return record


def _measure(model, splits, example) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, example),
            "val_accuracy": evaluate(model, splits.val), "test_accuracy": evaluate(model, splits.test)}


def run_seed(seed: int, mode: dict, runs: Runs, log) -> None:
    splits = data.load_dataset(mode["data"], seed=seed)
    channels, classes = splits.input_shape[0], splits.num_classes
    example = torch.zeros(2, *splits.input_shape)
    recipe = train_kwargs(recipes.build("gpp"))
    recipe.pop("amp", None)

    # 1. the Inception net, trained, then grown; every net met recorded
    cached = [r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"]
    largest_key = (seed, "grown-largest")
    def base():  # the trained Inception net every growth starts from (cached: the triage order reuses it)
        path = _cache_path(seed, "base")
        if os.path.exists(path) and runs.get((seed, "base")) is not None:
            return gpp_ext.io.load(path)  # data: rebuilt from its spec
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = fit(models.build("inception", in_channels=channels, num_classes=classes), splits.train,
                    mode["base_epochs"], seed=seed, **recipe)
        gpp_ext.io.save(model, path, spec=model.spec())
        rec = runs.add((seed, "base"), dict(_measure(model, splits, example), epochs=mode["base_epochs"],
                                            seconds=round(time.perf_counter() - started, 1)))
        log(f"  seed {seed} base Inception net: {rec['params']:,} params, test {rec['test_accuracy']:.4f} "
            f"({rec['seconds']:.0f} s)")
        return model

    def grown(order=None):
        """The base grown stage by stage (`order`: the stages' order, default first to last):
        `(largest, every net met, seconds)`."""
        model = base()
        started = time.perf_counter()
        met, seen = [], {id(model): mode["base_epochs"]}

        def train(m):  # a grown candidate: the epochs of the net it grew from, then grow_epochs more
            fit(m, splits.train, mode["grow_epochs"], seed=seed + 100 * _modules(m), **recipe)
            seen[id(m)] = mode["base_epochs"] + mode["grow_epochs"] * (_modules(m) - met[0]["modules"])
            return m

        def score(m):  # `grow` scores the trained net first, then every candidate, in its history's order
            met.append(dict(_measure(m, splits, example), epochs=seen[id(m)], modules=_modules(m), kept=None))
            log(f"  seed {seed} {'triage order ' if order else ''}net with {met[-1]['modules']} modules: "
                f"{met[-1]['params']:,} params, val {met[-1]['val_accuracy']:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            return met[-1]["val_accuracy"]

        model, history = grow(model, train, score, threshold=0.0,
                              max_modules_per_stage=mode["max_modules_per_stage"], progress=False, order=order)
        for record, step in zip(met, history):
            record.update(kept=step.kept, stage=step.stage)
        return model, met, time.perf_counter() - started

    if runs.get(largest_key) is None:
        model, met, seconds = grown()
        for i, record in enumerate(met):
            runs.add((seed, "grown", i), record)
            log(f"  seed {seed} grown net {i}: {record['modules']} modules, {record['params']:,} params, "
                f"test {record['test_accuracy']:.4f}, {record['epochs']:g} epochs, kept {record['kept']}")
        gpp_ext.io.save(model, _cache_path(seed), spec=model.spec())  # the largest grown net, for the runs below
        runs.add(largest_key, dict(_measure(model, splits, example), epochs=_largest_epochs(met),
                                   seconds=round(seconds, 1)))
        cached = [r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"]
    largest_record = runs.get(largest_key)
    largest = gpp_ext.io.load(_cache_path(seed))  # data: rebuilt from its spec
    smaller = [r for r in cached if r["kept"] and r["params"] < largest_record["params"]]

    # 2. the largest pushed and pruned to each smaller size; 4. grow-and-prune from scratch to the same sizes
    for r in smaller:
        target = r["params"] / largest_record["params"]
        key = (seed, "pruned", r["key"][2])
        if runs.get(key) is None:
            started = time.perf_counter()
            config = recipes.build("gpp", epochs=0, epoch_budget=mode["prune_epochs"], target_params=target,
                                   seed=seed)
            with _tempdir() as out:
                loop = GrowPushPrune(copy.deepcopy(largest), splits, config, out_dir=out, progress=False,
                                     onnx_latency=False)
                loop.run()
                compact = loop.final_model
            rec = runs.add(key, dict(_measure(compact, splits, example), target_params=r["params"],
                                     epochs=largest_record["epochs"] + mode["prune_epochs"],
                                     seconds=round(time.perf_counter() - started, 1)))
            log(f"  seed {seed} pruned to net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")
        key = (seed, "gap", r["key"][2])
        if runs.get(key) is None:
            started = time.perf_counter()
            torch.manual_seed(seed)
            fresh = copy.deepcopy(largest)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters") and m is not fresh:
                    m.reset_parameters()
            epochs = largest_record["epochs"] + mode["prune_epochs"]
            compact, _ = scheduled_grow_and_prune(fresh, splits, target, epochs, seed=seed, **recipe)
            rec = runs.add(key, dict(_measure(compact, splits, example), target_params=r["params"], epochs=epochs,
                                     seconds=round(time.perf_counter() - started, 1)))
            log(f"  seed {seed} grow-and-prune to net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")

    # 5. the same growth with the most critical stages first (`triage.stage_order`, as `grow_order="triage"` runs
    #    it in the loop): does triage pick a better order than first to last?
    key = (seed, "grown-triage")
    if runs.get(key) is None:
        started = time.perf_counter()
        triaged = triage(base(), splits, epochs=mode["grow_epochs"], distill=0.5, seed=seed, progress=False, **recipe)
        order = stage_order(triaged, len(largest.stages))
        model, met, _ = grown(order)
        rec = runs.add(key, dict(_measure(model, splits, example), epochs=_largest_epochs(met), order=order,
                                 triage=[r.to_dict() for r in triaged], met=met,
                                 seconds=round(time.perf_counter() - started, 1)))
        log(f"  seed {seed} grown in triage order {order}: {rec['params']:,} params, test {rec['test_accuracy']:.4f} "
            f"(first to last: {largest_record['params']:,} params, test {largest_record['test_accuracy']:.4f})")

    # 3. ResNets matched in size to every kept grown net, trained as long as it was
    for r in [r for r in cached if r["kept"]]:
        for name, blocks in RESNET_DEPTHS.items():
            key = (seed, name, r["key"][2])
            if runs.get(key) is not None:
                continue
            started = time.perf_counter()
            torch.manual_seed(seed)
            net = fit(resnet_of(r["params"], blocks, channels, classes), splits.train, r["epochs"], seed=seed,
                      **recipe)
            rec = runs.add(key, dict(_measure(net, splits, example), target_params=r["params"], epochs=r["epochs"],
                                     seconds=round(time.perf_counter() - started, 1)))
            log(f"  seed {seed} {name} at net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")


def _modules(model) -> int:
    return sum(len(stage) for stage in model.stages)


def _largest_epochs(met: list) -> float:
    kept = [r for r in met if r["kept"]]
    return max(r["epochs"] for r in kept)


def _cache_path(seed: int, what: str = "largest") -> str:
    folder = os.path.join(os.environ.get("GPP_EXT_CACHE", os.path.join(HERE, "..", "runs")), "growth")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{what}-seed{seed}.pt")


class _tempdir:
    def __enter__(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="gpp-growth-")
        return os.path.join(self._dir.name, "run")

    def __exit__(self, *exc):
        self._dir.cleanup()
        return False


def table(records: list) -> str:
    """The answer, per kept grown net's size: mean test accuracy over seeds of every way to reach it."""
    by = {}
    for r in records:
        if len(r["key"]) == 3 and r["key"][1] in ("grown", "pruned", "gap", *RESNET_DEPTHS):
            if r["key"][1] == "grown" and not r.get("kept"):
                continue
            by.setdefault(r["key"][2], {}).setdefault(r["key"][1], []).append(r)
    lines = ["| grown net | params | grown | largest pushed+pruned | grow-and-prune | ResNet-8 | ResNet-14 | "
             "ResNet-20 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(rs):
        if not rs:
            return "–"
        accs = [r["test_accuracy"] for r in rs]
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        return f"{statistics.mean(accs):.4f}{spread} ({statistics.mean(r['params'] for r in rs):,.0f})"

    for net in sorted(by):
        kinds = by[net]
        params = statistics.mean(r["params"] for r in kinds.get("grown", [])) if kinds.get("grown") else 0
        lines.append(f"| {net} | {params:,.0f} | " + " | ".join(cell(kinds.get(k, [])) for k in
                                                                ("grown", "pruned", "gap", *RESNET_DEPTHS)) + " |")
    return "\n".join(lines) + "\n"


def order_table(records: list) -> str:
    """Per seed: the growth in first-to-last order against the growth in triage order (what each ended with)."""
    lines = ["| seed | first to last: params | test | triage order | params | test | triage seconds |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for r in sorted((r for r in records if r["key"][1] == "grown-triage"), key=lambda r: r["key"][0]):
        first = next((x for x in records if x["key"] == [r["key"][0], "grown-largest"]), None)
        if first is None:
            continue
        lines.append(f"| {r['key'][0]} | {first['params']:,} | {first['test_accuracy']:.4f} | "
                     f"{' '.join(map(str, r['order']))} | {r['params']:,} | {r['test_accuracy']:.4f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="digits, one seed, tiny epochs")
    parser.add_argument("--resume", action="store_true", help="keep the runs recorded with the same settings")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "growth.json"))
    args = parser.parse_args(argv)
    mode = dict(MODES["smoke" if args.smoke else "full"])
    if args.seeds:
        try:
            mode["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    settings = {k: v for k, v in mode.items() if k != "seeds"}
    settings["train"] = {k: v for k, v in train_kwargs(recipes.build("gpp")).items() if k != "amp"}
    settings["gpp_ext"] = gpp_ext.__version__
    runs = Runs(args.out, settings, args.resume)

    def log(text):
        print(text, flush=True)

    try:
        for seed in mode["seeds"]:
            run_seed(seed, mode, runs, log)
    except KeyboardInterrupt:
        print("benchmarks.growth: interrupted; run again with --resume to go on", file=sys.stderr)
    md = os.path.splitext(args.out)[0] + ".md"
    write_text_atomic(md, "# Growth benchmark\n\n" + f"{machine()}, commit {git_commit()}; test accuracy, mean ± std "
                      "over seeds (parameters in brackets); every net trained with the loop's recipe\n\n"
                      + table(runs.records) + "\n## Growth order: first to last, or most critical first (triage)\n\n"
                      + order_table(runs.records))
    print(f"benchmarks.growth: {len(runs.records)} runs -> {args.out}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
