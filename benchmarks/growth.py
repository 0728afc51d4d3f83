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

The long steps checkpoint under the cache folder (`runs/growth/`, or `$GPP_EXT_CACHE/growth/`): the trained base,
each growth after every attempt (`grow(after_step=...)`) and the triage, so an interrupted seed resumes inside its
growth instead of starting it over. Results go to benchmarks/results/growth.{json,md,png} atomically after every
run (`--render` redraws the tables and plot from the records alone); `--resume` keeps the runs recorded with the
same settings and runs the rest.
Growth takes its own path per seed, so the tables pair every comparison with a grown net of the same seed and
answer each question by the paired differences.
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
from gpp_ext.io import write_atomic, write_text_atomic
from gpp_ext.loop import GrowPushPrune, train_kwargs
from gpp_ext.models.resnet import ResNet
from gpp_ext.training import evaluate, fit
from gpp_ext.triage import BlockCriticality, stage_order, triage

from ._meta import Exclusive, git_commit, machine

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

    def __init__(self, path: str, settings: dict, resume: bool, after=None):
        self.path, self.settings, self.after = path, settings, after
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
        if self.after is not None:
            self.after(self.records)
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

    def grown(order=None, spent: float = 0.0):
        """The base grown stage by stage (`order`: the stages' order, default first to last):
        `(largest, every net met, seconds)`. Saved after every attempt (`_Checkpoint`), so an interrupted
        growth resumes with `--resume` instead of starting over; `spent`: seconds already spent before it."""
        point = _Checkpoint(seed, "growing-triage" if order else "growing", runs.settings)
        resumed = point.load()
        model, state = resumed if resumed else (base(), {"met": [], "history": None, "seconds": 0.0})
        met, spent = state["met"], spent + state["seconds"]
        if resumed:
            log(f"  seed {seed} {'triage order ' if order else ''}growth resumed after {len(met)} nets")
        started = time.perf_counter()
        seen = {id(model): mode["base_epochs"]}

        def train(m):  # a grown candidate: the epochs of the net it grew from, then grow_epochs more
            fit(m, splits.train, mode["grow_epochs"], seed=seed + 100 * _modules(m), **recipe)
            seen[id(m)] = mode["base_epochs"] + mode["grow_epochs"] * (_modules(m) - met[0]["modules"])
            return m

        def score(m):  # `grow` scores the trained net first, then every candidate, in its history's order
            met.append(dict(_measure(m, splits, example), epochs=seen[id(m)], modules=_modules(m), kept=None))
            log(f"  seed {seed} {'triage order ' if order else ''}net with {met[-1]['modules']} modules: "
                f"{met[-1]['params']:,} params, val {met[-1]['val_accuracy']:.4f} "
                f"({spent + time.perf_counter() - started:.0f} s)")
            return met[-1]["val_accuracy"]

        def after_step(m, history):
            point.save(m, {"met": met, "history": [h.to_dict() for h in history],
                           "seconds": spent + time.perf_counter() - started})

        model, history = grow(model, train, score, threshold=0.0, max_modules_per_stage=mode["max_modules_per_stage"],
                              progress=False, order=order, history=state["history"], after_step=after_step,
                              seed=seed)
        for record, step in zip(met, history):
            record.update(kept=step.kept, stage=step.stage)
        seconds = spent + time.perf_counter() - started
        point.clear()
        return model, met, seconds

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
        point = _Checkpoint(seed, "triage", runs.settings)   # the triage, kept while the growth after it runs
        done = point.load(model=False)
        if done is None:
            started = time.perf_counter()
            triaged = triage(base(), splits, epochs=mode["grow_epochs"], distill=0.5, seed=seed, progress=False,
                             **recipe)
            done = {"triage": [r.to_dict() for r in triaged], "seconds": time.perf_counter() - started}
            point.save(None, done)
        triaged = [BlockCriticality(**r) for r in done["triage"]]
        order = stage_order(triaged, len(largest.stages))
        model, met, seconds = grown(order, spent=done["seconds"])
        rec = runs.add(key, dict(_measure(model, splits, example), epochs=_largest_epochs(met), order=order,
                                 triage=done["triage"], met=met, seconds=round(seconds, 1)))
        point.clear()
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


class _Checkpoint:
    """A long step's progress under the cache folder (`<what>-seed<seed>.json`: its state, the settings it ran
    under and the name of its model file, `<what>-seed<seed>-<n>.pt`), so `--resume` goes on from it; ignored
    when the settings differ, removed when the step is recorded. Each save writes a new model file before the
    state that names it, so an interruption at any moment leaves a state and the model it describes."""

    def __init__(self, seed: int, what: str, settings: dict):
        self.stem = os.path.splitext(_cache_path(seed, what))[0]
        self.state_path = self.stem + ".json"
        self.settings, self.saves = settings, 0

    def load(self, model: bool = True):
        """`(model, state)` (`model=False`: the state alone), or None when there is no checkpoint of these
        settings."""
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as f:
            saved = json.load(f)
        if saved.get("settings") != self.settings:
            return None
        self.saves = saved.get("saves", 0)
        if not model:
            return saved["state"]
        path = os.path.join(os.path.dirname(self.stem), saved.get("model") or "")
        if not saved.get("model") or not os.path.exists(path):
            return None
        return gpp_ext.io.load(path), saved["state"]  # data: rebuilt from its spec

    def save(self, model, state: dict) -> None:
        entry = {"settings": self.settings, "state": state, "saves": self.saves + 1, "model": None}
        if model is not None:
            path = f"{self.stem}-{self.saves + 1}.pt"
            gpp_ext.io.save(model, path, spec=model.spec())
            entry["model"] = os.path.basename(path)
        write_text_atomic(self.state_path, json.dumps(entry))
        self.saves += 1
        self._remove_models(keep=entry["model"])

    def clear(self) -> None:
        if os.path.exists(self.state_path):
            os.remove(self.state_path)
        self._remove_models(keep=None)

    def _remove_models(self, keep) -> None:
        import glob

        prefix = os.path.basename(self.stem) + "-"
        for path in glob.glob(glob.escape(self.stem) + "-*.pt"):
            name = os.path.basename(path)
            if name != keep and name[len(prefix):-3].isdigit():
                os.remove(path)


class _tempdir:
    def __enter__(self):
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="gpp-growth-")
        return os.path.join(self._dir.name, "run")

    def __exit__(self, *exc):
        self._dir.cleanup()
        return False


def _kept(records: list) -> list:
    """The kept grown nets of every seed, by seed then index."""
    return sorted((r for r in records if len(r["key"]) == 3 and r["key"][1] == "grown" and r.get("kept")),
                  key=lambda r: (r["key"][0], r["key"][2]))


def _at(records: list, seed: int, kind: str, net: int):
    return next((r for r in records if r["key"] == [seed, kind, net]), None)


def _acc(r) -> str:
    return f"{r['test_accuracy']:.4f} ({r['params']:,})" if r else "–"


def table(records: list) -> str:
    """Per seed and kept grown net: the net's test accuracy and every other way to reach its size (test accuracy,
    parameters in brackets). Growth takes a different path per seed, so nets are not averaged across seeds; the
    answers are paired differences (`answers`)."""
    lines = ["| seed | net | modules | epochs | grown | largest pushed+pruned | grow-and-prune | ResNet-8 | "
             "ResNet-14 | ResNet-20 |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _kept(records):
        seed, net = r["key"][0], r["key"][2]
        lines.append(f"| {seed} | {net} | {r['modules']} | {r['epochs']:g} | {_acc(r)} | "
                     + " | ".join(_acc(_at(records, seed, kind, net)) for kind in ("pruned", "gap", *RESNET_DEPTHS))
                     + " |")
    return "\n".join(lines) + "\n"


def _pairs(records: list, ours: str, theirs) -> list:
    """`(seed, net, ours - theirs)` test-accuracy differences at every kept net's size where both are recorded
    (`ours`/`theirs`: a kind, or "grown"; `theirs` may be a function of `(seed, net)` giving the record)."""
    out = []
    for r in _kept(records):
        seed, net = r["key"][0], r["key"][2]
        a = r if ours == "grown" else _at(records, seed, ours, net)
        b = theirs(seed, net) if callable(theirs) else (r if theirs == "grown" else _at(records, seed, theirs, net))
        if a is not None and b is not None:
            out.append((seed, net, a["test_accuracy"] - b["test_accuracy"]))
    return out


def answers(records: list) -> str:
    """The benchmark's questions, answered by paired differences at equal size (same seed, same net's size)."""
    def best_resnet(seed, net):
        rs = [x for x in (_at(records, seed, k, net) for k in RESNET_DEPTHS) if x is not None]
        return max(rs, key=lambda x: x["test_accuracy"]) if len(rs) == len(RESNET_DEPTHS) else None

    questions = [("grown Inception net vs the best of ResNet-8/14/20 at its size", "grown", best_resnet)]
    questions += [(f"grown Inception net vs {k.replace('resnet', 'ResNet-')}", "grown", k) for k in RESNET_DEPTHS]
    questions += [("largest grown net pushed+pruned vs the grown net of that size", "pruned", "grown"),
                  ("grow-and-prune from scratch vs train-then-prune (pushed+pruned), equal epochs", "gap", "pruned")]
    lines = ["| question (first minus second) | pairs | first wins | mean difference (points) | min | max |",
             "|---|---:|---:|---:|---:|---:|"]
    for text, ours, theirs in questions:
        diffs = [d for _, _, d in _pairs(records, ours, theirs)]
        if not diffs:
            lines.append(f"| {text} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {text} | {len(diffs)} | {sum(d > 0 for d in diffs)} | {100 * statistics.mean(diffs):+.2f} | "
                     f"{100 * min(diffs):+.2f} | {100 * max(diffs):+.2f} |")
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


def plot(records: list, path: str) -> None:
    """Test accuracy against parameters, one panel per seed: the grown nets (the path growth took), the largest
    pushed and pruned to their sizes, grow-and-prune, and the ResNets matched to them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["key"][0] for r in _kept(records)})
    if not seeds:
        return
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4.5), squeeze=False, sharey=True)
    styles = {"grown": ("o-", "grown Inception"), "pruned": ("s--", "largest pushed+pruned"),
              "gap": ("^:", "grow-and-prune"), "resnet8": ("x:", "ResNet-8"), "resnet14": ("+:", "ResNet-14"),
              "resnet20": ("d:", "ResNet-20")}
    for ax, seed in zip(axes[0], seeds):
        kept = [r for r in _kept(records) if r["key"][0] == seed]
        for kind, (style, label) in styles.items():
            rs = kept if kind == "grown" else [x for x in (_at(records, seed, kind, r["key"][2]) for r in kept) if x]
            if rs:
                rs = sorted(rs, key=lambda x: x["params"])
                ax.plot([x["params"] for x in rs], [x["test_accuracy"] for x in rs], style, label=label,
                        linewidth=2 if kind == "grown" else 1)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(f"seed {seed}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def render(records: list, stem: str) -> None:
    """`stem`.md (the tables) and `stem`.png (the plot) from the records, atomically."""
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    machines = sorted({r["machine"] for r in records if r.get("machine")})
    seeds = sorted({r["key"][0] for r in records})
    write_text_atomic(stem + ".md", "# Growth benchmark\n\n"
                      f"Machine: {', '.join(machines) or '–'}; commits {', '.join(commits) or '–'}; seeds "
                      f"{', '.join(map(str, seeds)) or '–'}. Every net trained with the loop's recipe; test accuracy "
                      "(parameters in brackets). `benchmarks/growth.py` states the protocol.\n\n"
                      "## The answers: paired differences at equal size\n\n" + answers(records)
                      + "\n## Every kept grown net and the other ways to reach its size\n\n" + table(records)
                      + "\n## Growth order: first to last, or most critical first (triage)\n\n"
                      + order_table(records))
    plot(records, stem + ".png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="digits, one seed, tiny epochs")
    parser.add_argument("--resume", action="store_true", help="keep the runs recorded with the same settings")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "growth.json"))
    parser.add_argument("--render", action="store_true", help="only render the tables and plot from --out")
    args = parser.parse_args(argv)
    stem = os.path.splitext(args.out)[0]
    if args.render:
        if not os.path.exists(args.out):
            parser.error(f"--render: no results at {args.out}")
        with open(args.out) as f:
            records = json.load(f)
        render(records, stem)
        print(f"benchmarks.growth: {len(records)} runs -> {stem}.md, {stem}.png")
        return 0
    mode = dict(MODES["smoke" if args.smoke else "full"])
    if args.seeds:
        try:
            mode["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    settings = {k: v for k, v in mode.items() if k != "seeds"}
    settings["train"] = {k: v for k, v in train_kwargs(recipes.build("gpp")).items() if k != "amp"}
    settings["gpp_ext"] = gpp_ext.__version__
    with Exclusive(args.out, "benchmarks.growth"):   # one writer per results file
        return _run(args, mode, settings, stem)


def _run(args, mode: dict, settings: dict, stem: str) -> int:
    runs = Runs(args.out, settings, args.resume, after=lambda records: render(records, stem))

    def log(text):
        print(text, flush=True)

    try:
        for seed in mode["seeds"]:
            run_seed(seed, mode, runs, log)
    except KeyboardInterrupt:
        print("benchmarks.growth: interrupted; run again with --resume to go on", file=sys.stderr)
    render(runs.records, stem)
    print(f"benchmarks.growth: {len(runs.records)} runs -> {args.out}, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
