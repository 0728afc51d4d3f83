"""The growth benchmark's runs: every step of a seed (the package's doc says which), the records and the
checkpoints of its long steps."""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass

import torch

import gpp_ext
from gpp_ext import data, models, recipes
from gpp_ext.cost import count_flops, count_params
from gpp_ext.gap import scheduled_grow_and_prune
from gpp_ext.grow import grow
from gpp_ext.io import write_text_atomic
from gpp_ext.loop import GrowPushPrune, same_run, train_kwargs
from gpp_ext.models.resnet import ResNet
from gpp_ext.training import evaluate, fit
from gpp_ext.triage import BlockCriticality, stage_order, triage

from .._meta import git_commit, machine

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # benchmarks/
RESULTS = os.path.join(HERE, "results")
MODES = {
    "full": dict(data="fashion-mnist", seeds=[0, 1, 2], base_epochs=10, grow_epochs=2, prune_epochs=3,
                 max_modules_per_stage=3),
    "smoke": dict(data="digits", seeds=[0], base_epochs=1, grow_epochs=2, prune_epochs=1,
                  max_modules_per_stage=2),
}
RESNET_DEPTHS = {"resnet8": 1, "resnet14": 2, "resnet20": 3}


def resnet_of(params: int, blocks: int, in_channels: int, classes: int) -> ResNet:
    """The ResNet with `blocks` blocks per stage whose parameters come closest to `params`: stage widths (w, 2w, 4w)
    with the closest w, then the last width bisected over [2w, 8w]."""
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
        # the code that runs is the one this process imported: its commit is taken once, at the start (commits
        # made while a run of days goes on must not relabel its later records)
        self.commit = git_commit()
        # the models the runs reuse and the long steps' checkpoints, beside the records (`growth-nets/` for
        # `growth.json`) and committed with them, so a run that spans sessions (or fresh checkouts) resumes
        self.cache = os.path.splitext(path)[0] + "-nets"
        self.records = []
        if resume and os.path.exists(path):
            with open(path) as f:
                records = json.load(f)
            other = [r for r in records if r.get("settings") != settings]
            if other:  # resuming would drop them at the first save: the user's results are not thrown away unasked
                raise SystemExit(f"benchmarks.growth: {len(other)} of the {len(records)} runs in {path} were made "
                                 f"with other settings (epochs, training recipe or gpp_ext version); move the file "
                                 f"away to start afresh, or run the version that made them")
            self.records = records
        elif os.path.exists(path) and not resume:
            raise SystemExit(f"benchmarks.growth: {path} holds results; pass --resume to go on, or move it away")

    def get(self, key: tuple):
        return next((r for r in self.records if tuple(r["key"]) == key), None)

    def add(self, key: tuple, record: dict) -> dict:
        """Records `record` under `key`, replacing a record of the same key (a run redone because its cached
        model was gone, e.g. in a fresh checkout)."""
        record = {"key": list(key), **record, "settings": self.settings, "commit": self.commit,
                  "machine": machine()}
        self.records = [r for r in self.records if tuple(r["key"]) != tuple(key)] + [record]
        self._saved()
        return record

    def drop(self, keep) -> list:
        """Removes the records for which `keep(record)` is false; returns them."""
        dropped = [r for r in self.records if not keep(r)]
        if dropped:
            self.records = [r for r in self.records if keep(r)]
            self._saved()
        return dropped

    def _saved(self) -> None:
        write_text_atomic(self.path, json.dumps(self.records, indent=1))
        if self.after is not None:
            self.after(self.records)


def _measure(model, splits, example) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, example),
            "val_accuracy": evaluate(model, splits.val), "test_accuracy": evaluate(model, splits.test)}


# the passes over the seeds: the runs that answer the paper's two claims (grown nets, the largest pushed and
# pruned, matched ResNets) for every seed first; then the control that makes the second claim a comparison at
# equal epochs (each smaller grown net's architecture trained from scratch as long as the pushed-and-pruned net
# was); then grow-and-prune and the triage order, which take as long again as the rest
PARTS = ("claims", "controls", "further")


def run_seed(seed: int, mode: dict, runs: Runs, log, part: str | None = None) -> None:
    """A seed's steps (the package's doc): growth, then `part`'s runs (`PARTS`; None: all, in order)."""
    parts = PARTS if part is None else (part,)
    splits = data.load_dataset(mode["data"], seed=seed)
    channels, classes = splits.input_shape[0], splits.num_classes
    example = torch.zeros(2, *splits.input_shape)
    recipe = train_kwargs(recipes.build("gpp"))
    recipe.pop("amp", None)

    # 1. the Inception net, trained, then grown; every net met recorded
    cached = [r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"]
    largest_key = (seed, "grown-largest")
    def base():  # the trained Inception net every growth starts from (cached: the triage order reuses it)
        path = _cache_path(runs, seed, "base")
        if os.path.exists(path) and runs.get((seed, "base")) is not None:
            return gpp_ext.io.load(path)  # data: rebuilt from its spec
        clock, point = _Clock(), _cache_path(runs, seed, "base-training")
        torch.manual_seed(seed)
        model = fit(models.build("inception", in_channels=channels, num_classes=classes), splits.train,
                    mode["base_epochs"], seed=seed, after_step=clock, checkpoint=point, **recipe)
        gpp_ext.io.save(model, path, spec=model.spec())
        os.remove(point)
        rec = runs.add((seed, "base"), dict(_measure(model, splits, example), epochs=mode["base_epochs"],
                                            **clock.times()))
        log(f"  seed {seed} base Inception net: {rec['params']:,} params, test {rec['test_accuracy']:.4f} "
            f"({rec['seconds']:.0f} s)")
        return model

    def grown(order=None, spent: dict | None = None):
        """The base grown stage by stage (`order`: the stages' order, default first to last):
        `(largest, every net met, times)`. Saved after every attempt (`_Checkpoint`), so an interrupted
        growth resumes with `--resume` instead of starting over; `spent`: the times used before it."""
        point = _Checkpoint(runs, seed, "growing-triage" if order else "growing", runs.settings)
        resumed = point.load()
        model, state = resumed if resumed else (base(), {"met": [], "history": None, "times": {}})
        met = state["met"]
        if resumed:
            log(f"  seed {seed} {'triage order ' if order else ''}growth resumed after {len(met)} nets")
        clock = _Clock(state["times"] if resumed else spent)  # a resumed state's times already hold `spent`
        seen = {id(model): mode["base_epochs"]}

        def train(m):  # a grown candidate: the epochs of the net it grew from, then grow_epochs more
            fit(m, splits.train, mode["grow_epochs"], seed=seed + 100 * _modules(m), **recipe)
            seen[id(m)] = mode["base_epochs"] + mode["grow_epochs"] * (_modules(m) - met[0]["modules"])
            return m

        def score(m):  # `grow` scores the trained net first, then every candidate, in its history's order
            met.append(dict(_measure(m, splits, example), epochs=seen[id(m)], modules=_modules(m), kept=None))
            log(f"  seed {seed} {'triage order ' if order else ''}net with {met[-1]['modules']} modules: "
                f"{met[-1]['params']:,} params, val {met[-1]['val_accuracy']:.4f} "
                f"({clock.times()['seconds']:.0f} s)")
            return met[-1]["val_accuracy"]

        def after_step(m, history):
            point.save(m, {"met": met, "history": [h.to_dict() for h in history], "times": clock.times()})

        model, history = grow(model, train, score, threshold=0.0, max_modules_per_stage=mode["max_modules_per_stage"],
                              progress=False, order=order, history=state["history"], after_step=after_step,
                              seed=seed)
        for record, step in zip(met, history):
            record.update(kept=step.kept, stage=step.stage)
        return model, met, clock.times()   # the checkpoint stays until the caller has recorded the growth

    if runs.get(largest_key) is not None and not os.path.exists(_cache_path(runs, seed)):
        _regrow(seed, runs, grown, lambda m: _measure(m, splits, example), log, mode)
        cached = [r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"]
    if runs.get(largest_key) is None:
        model, met, times = grown()
        # a growth interrupted before this point and grown again may take a shorter path: no net of an earlier
        # path stays recorded
        runs.drop(lambda r: not (r["key"][0] == seed and r["key"][1] == "grown"))
        for i, record in enumerate(met):
            runs.add((seed, "grown", i), record)
            log(f"  seed {seed} grown net {i}: {record['modules']} modules, {record['params']:,} params, "
                f"test {record['test_accuracy']:.4f}, {record['epochs']:g} epochs, kept {record['kept']}")
        gpp_ext.io.save(model, _cache_path(runs, seed), spec=model.spec())  # the largest grown net, for the runs below
        runs.add(largest_key, dict(_measure(model, splits, example), epochs=_largest_epochs(met),
                                   refused_epochs=_refused_epochs(met, mode), **times))
        _Checkpoint(runs, seed, "growing", runs.settings).clear()
        cached = [r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"]
    largest_record = runs.get(largest_key)
    largest = gpp_ext.io.load(_cache_path(runs, seed))  # data: rebuilt from its spec

    grown_seed = _Grown(seed, mode, runs, log, splits, example, recipe, base, grown, largest, largest_record,
                        cached)
    for part, steps in (("claims", _claims), ("controls", _controls), ("further", _further)):
        if part in parts:
            steps(grown_seed)


@dataclass
class _Grown:
    """A seed once grown: what its later runs read (`base()`, `grown(order)`: the growth's steps, re-runnable)."""
    seed: int
    mode: dict
    runs: Runs
    log: object
    splits: object
    example: torch.Tensor
    recipe: dict
    base: object
    grown: object
    largest: torch.nn.Module
    largest_record: dict
    cached: list

    def base_spec(self) -> dict:
        return self.base().spec()

    @property
    def smaller(self) -> list:
        """The kept nets smaller than the largest: the sizes it is pushed and pruned to."""
        return [r for r in self.cached if r["kept"] and r["params"] < self.largest_record["params"]]


def _claims(g: _Grown) -> None:
    """2. the largest pushed and pruned to each smaller size; 3. the matched ResNets."""
    seed, mode, runs, log, splits, example, recipe = g.seed, g.mode, g.runs, g.log, g.splits, g.example, g.recipe
    largest, largest_record, cached = g.largest, g.largest_record, g.cached
    channels, classes = splits.input_shape[0], splits.num_classes
    for r in g.smaller:
        target = r["params"] / largest_record["params"]
        key = (seed, "pruned", r["key"][2])
        done = runs.get(key)
        if done is None or not same_recipe(done.get("recipe")):  # made by another default: redone
            config = recipes.build("gpp", epochs=0, epoch_budget=mode["prune_epochs"], target_params=target,
                                   seed=seed)
            with _ResumableLoop(runs, seed, f"pruned-{r['key'][2]}", largest_record, config) as (folder, clock):
                loop = GrowPushPrune(copy.deepcopy(largest), splits, config, out_dir=folder, progress=False,
                                     onnx_latency=False)
                report = loop.run(resume=True)
                compact = loop.final_model
                # whether the loop met the size: a pair "at equal size" is one only if it did
                rec = runs.add(key, dict(_measure(compact, splits, example), target_params=r["params"],
                                         epochs=largest_record["epochs"] + mode["prune_epochs"],
                                         target_reached=bool(report["target_reached"]), stopped=report["stopped"],
                                         recipe=default_recipe(), **clock.times()))
            log(f"  seed {seed} pruned to net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")

    # 3. ResNets matched in size to every kept grown net, trained as long as it was
    for r in [r for r in cached if r["kept"]]:
        for name, blocks in RESNET_DEPTHS.items():
            key = (seed, name, r["key"][2])
            if runs.get(key) is not None:
                continue
            clock, point = _Clock(), _cache_path(runs, seed, f"{name}-{r['key'][2]}")
            torch.manual_seed(seed)
            net = fit(resnet_of(r["params"], blocks, channels, classes), splits.train, r["epochs"], seed=seed,
                      after_step=clock, checkpoint=point, **recipe)
            os.remove(point)
            rec = runs.add(key, dict(_measure(net, splits, example), target_params=r["params"], epochs=r["epochs"],
                                     **clock.times()))
            log(f"  seed {seed} {name} at net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")


def _controls(g: _Grown) -> None:
    """2b. every smaller kept net's architecture trained from scratch for as many epochs as the pushed-and-pruned
    net of its size had in all (the largest net's epochs plus `prune_epochs`): the second claim at equal epochs."""
    seed, mode, runs, log, splits, example, recipe = g.seed, g.mode, g.runs, g.log, g.splits, g.example, g.recipe
    epochs = g.largest_record["epochs"] + mode["prune_epochs"]
    for r in g.smaller:
        key = (seed, "scratch", r["key"][2])
        if runs.get(key) is not None:
            continue
        clock, point = _Clock(), _cache_path(runs, seed, f"scratch-{r['key'][2]}")
        torch.manual_seed(seed)
        net = grown_architecture(g.cached, r["key"][2], g.base_spec())
        if count_params(net) != r["params"]:
            raise RuntimeError(f"benchmarks.growth: seed {seed} net {r['key'][2]}'s architecture rebuilt with "
                               f"{count_params(net):,} parameters, recorded with {r['params']:,}")
        net = fit(net, splits.train, epochs, seed=seed, after_step=clock, checkpoint=point, **recipe)
        os.remove(point)
        rec = runs.add(key, dict(_measure(net, splits, example), target_params=r["params"], epochs=epochs,
                                 **clock.times()))
        log(f"  seed {seed} net {r['key'][2]}'s architecture from scratch, {epochs:g} epochs: {rec['params']:,} "
            f"params, test {rec['test_accuracy']:.4f}")


def grown_architecture(cached: list, net: int, base_spec: dict):
    """The architecture of kept grown net `net`, untrained: the base's stages with a copy of a stage's last
    module appended for every kept growth step up to `net` (what `growth.inception` adds), from the records."""
    kwargs = copy.deepcopy(base_spec["kwargs"])
    for r in sorted(cached, key=lambda r: r["key"][2]):
        if 0 < r["key"][2] <= net and r["kept"]:
            stage = kwargs["stages"][r["stage"]]
            stage.append(list(stage[-1]))
    return models.build(base_spec["name"], **kwargs)


def default_recipe() -> dict:
    """The default recipe's settings and the pruning algorithms' version (`gpp_ext.pruning.ALGORITHM_VERSION`),
    as a pushed-and-pruned record states them (its epochs, target and seed are the run's own)."""
    from dataclasses import asdict

    from gpp_ext.pruning import ALGORITHM_VERSION

    return json.loads(json.dumps({**asdict(recipes.build("gpp")), "algorithms": ALGORITHM_VERSION}))


def same_recipe(stored: dict | None) -> bool:
    """Whether a pushed-and-pruned record's `recipe` (`default_recipe()` when it was made) runs the loop today's
    default runs, with today's pruning algorithms: a `LoopConfig` field added since, at the value runs used
    before it existed, changes nothing (`loop.same_run`)."""
    if stored is None:
        return False
    now = default_recipe()
    return stored.get("algorithms") == now["algorithms"] and same_run(
        {k: v for k, v in stored.items() if k != "algorithms"}, {k: v for k, v in now.items() if k != "algorithms"})


def _further(g: _Grown) -> None:
    """4. grow-and-prune from scratch to the sizes of 2; 5. the growth in triage order."""
    seed, mode, runs, log, splits, example, recipe = g.seed, g.mode, g.runs, g.log, g.splits, g.example, g.recipe
    largest, largest_record = g.largest, g.largest_record
    for r in g.smaller:
        target = r["params"] / largest_record["params"]
        key = (seed, "gap", r["key"][2])
        if runs.get(key) is None:
            clock = _Clock()
            torch.manual_seed(seed)
            fresh = copy.deepcopy(largest)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters") and m is not fresh:
                    m.reset_parameters()
            epochs = largest_record["epochs"] + mode["prune_epochs"]
            compact, _ = scheduled_grow_and_prune(fresh, splits, target, epochs, seed=seed, after_step=clock,
                                                  checkpoint=_cache_path(runs, seed, f"gap-{r['key'][2]}"), **recipe)
            rec = runs.add(key, dict(_measure(compact, splits, example), target_params=r["params"], epochs=epochs,
                                     **clock.times()))
            log(f"  seed {seed} grow-and-prune to net {r['key'][2]}'s size: {rec['params']:,} params, test "
                f"{rec['test_accuracy']:.4f}")

    # 5. the same growth with the most critical stages first (`triage.stage_order`, as `grow_order="triage"` runs
    #    it in the loop): does triage pick a better order than first to last?
    key = (seed, "grown-triage")
    if runs.get(key) is None:
        point = _Checkpoint(runs, seed, "triage", runs.settings)   # the triage, kept while the growth after it runs
        done = point.load(model=False)
        if done is None:
            clock = _Clock()
            triaged = triage(g.base(), splits, epochs=mode["grow_epochs"], distill=0.5, seed=seed, progress=False,
                             **recipe)
            done = {"triage": [r.to_dict() for r in triaged], "times": clock.times()}
            point.save(None, done)
        triaged = [BlockCriticality(**r) for r in done["triage"]]
        order = stage_order(triaged, len(largest.stages))
        model, met, times = g.grown(order, spent=done["times"])
        rec = runs.add(key, dict(_measure(model, splits, example), epochs=_largest_epochs(met), order=order,
                                 triage=done["triage"], triage_seconds=done["times"]["seconds"], met=met, **times))
        point.clear()
        _Checkpoint(runs, seed, "growing-triage", runs.settings).clear()
        log(f"  seed {seed} grown in triage order {order}: {rec['params']:,} params, test {rec['test_accuracy']:.4f} "
            f"(first to last: {largest_record['params']:,} params, test {largest_record['test_accuracy']:.4f})")


def _regrow(seed: int, runs: Runs, grown, measure, log, mode: dict) -> None:
    """The largest grown net's file is gone (a checkout without it) while the runs after it are recorded: the
    growth is run again (it is seeded). When it meets the recorded nets again (same parameters, same test
    accuracy), its file is restored and every record stands. Otherwise its nets replace the recorded ones, and of
    the runs after it only those that never read the grown weights stand: a grow-and-prune (from scratch, seeded),
    a ResNet or a net's architecture from scratch whose size and epochs the new growth asks for again; the
    pushed-and-pruned nets and the triage order's growth are dropped, to be redone."""
    log(f"  seed {seed}: the largest grown net's file is gone; growing again to rebuild it")
    model, met, times = grown()
    recorded = sorted((r for r in runs.records if r["key"][0] == seed and r["key"][1] == "grown"),
                      key=lambda r: r["key"][2])
    same = [(r["params"], r["test_accuracy"]) for r in met] == [(r["params"], r["test_accuracy"]) for r in recorded]
    gpp_ext.io.save(model, _cache_path(runs, seed), spec=model.spec())
    if same:
        _Checkpoint(runs, seed, "growing", runs.settings).clear()
        log(f"  seed {seed}: the growth met the {len(met)} recorded nets again; its records stand")
        return
    old_largest = runs.get((seed, "grown-largest"))
    largest = dict(measure(model), epochs=_largest_epochs(met), **times)
    kept = {i: r for i, r in enumerate(met) if r["kept"]}
    same_arch = old_largest["params"] == largest["params"] and old_largest["epochs"] == largest["epochs"]

    def still(kind: str, i: int, params: int, epochs: float) -> bool:
        """Whether a `kind` run at net `i`, made for a net of `params` parameters and `epochs` epochs, is one the
        new growth asks for again: grow-and-prune needs the same largest net too, a net from scratch the same
        largest net's epochs, a ResNet its net's epochs."""
        net = kept.get(i)
        if net is None or net["params"] != params:
            return False
        if kind == "gap":
            return same_arch
        if kind == "scratch":
            return old_largest["epochs"] == largest["epochs"]
        return net["epochs"] == epochs

    def stands(r) -> bool:
        key = r["key"]
        if key[0] != seed or key[1] == "base":
            return True
        if key[1] in ("gap", "scratch", *RESNET_DEPTHS):
            return still(key[1], key[2], r["target_params"], r["epochs"])
        return False  # the growth's own records (replaced below), the pushed-and-pruned nets, the triage order

    dropped = runs.drop(stands)
    # an interrupted training the new growth does not ask for again would resume from weights of another shape
    # (or for another target): its checkpoint goes, by the same rule as the records
    for r in recorded:
        i = r["key"][2]
        if not r["kept"]:
            continue
        for kind in ("gap", "scratch", *RESNET_DEPTHS):
            if still(kind, i, r["params"], r["epochs"]):
                continue
            stem, ext = os.path.splitext(_cache_path(runs, seed, f"{kind}-{i}"))
            for path in (stem + ext, f"{stem}-phases{ext}", f"{stem}-finetune{ext}"):
                if os.path.exists(path):
                    os.remove(path)
    for i, record in enumerate(met):
        runs.add((seed, "grown", i), record)
    runs.add((seed, "grown-largest"), dict(largest, refused_epochs=_refused_epochs(met, mode)))
    _Checkpoint(runs, seed, "growing", runs.settings).clear()
    log(f"  seed {seed}: the growth did not meet the recorded nets again; its {len(met)} nets recorded anew, "
        f"{len([r for r in dropped if r['key'][1] not in ('grown', 'grown-largest')])} run(s) after it dropped "
        f"to be redone, the rest (grow-and-prune, matched ResNets, the nets from scratch) stand")


def _modules(model) -> int:
    return sum(len(stage) for stage in model.stages)


def _largest_epochs(met: list) -> float:
    """The epochs that built the largest kept net: the base's and its kept growth steps' (not the refused ones)."""
    kept = [r for r in met if r["kept"]]
    return max(r["epochs"] for r in kept)


def _refused_epochs(met: list, mode: dict) -> float:
    """The epochs spent on growth steps that were tried and refused (on nets thrown away)."""
    return mode["grow_epochs"] * sum(1 for r in met[1:] if not r["kept"])


def _cache_path(runs: Runs, seed: int, what: str = "largest") -> str:
    os.makedirs(runs.cache, exist_ok=True)
    return os.path.join(runs.cache, f"{what}-seed{seed}.pt")


class _Clock:
    """A step's wall time and CPU time (`times()`: `{"seconds", "cpu_seconds"}`), with what earlier parts of it
    used (`spent`: an interrupted step's times, or a triage before its growth). The CPU time does not grow while
    the process is paused or waits for a core another process holds."""

    def __init__(self, *spent):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.before = {k: sum((part or {}).get(k, 0.0) for part in spent) for k in ("seconds", "cpu_seconds")}

    def times(self) -> dict:
        return {"seconds": round(self.before["seconds"] + time.perf_counter() - self.wall, 1),
                "cpu_seconds": round(self.before["cpu_seconds"] + time.process_time() - self.cpu, 1)}

    # a `fit` hook: checkpointed with the training (`fit(checkpoint=...)`), so a step resumed in a later process
    # records the time of its saved progress plus this process's, as an uninterrupted run would
    def __call__(self, step: int, total: int) -> None:
        pass

    def state_dict(self) -> dict:
        return self.times()

    def load_state_dict(self, state: dict) -> None:
        self.before = {k: float(state[k]) for k in ("seconds", "cpu_seconds")}
        self.wall, self.cpu = time.perf_counter(), time.process_time()


class _Checkpoint:
    """A long step's progress under the cache folder (`<what>-seed<seed>.json`: its state, the settings it ran
    under and the name of its model file, `<what>-seed<seed>-<n>.pt`), so `--resume` goes on from it; ignored
    when the settings differ, removed when the step is recorded. Each save writes a new model file before the
    state that names it, so an interruption at any moment leaves a state and the model it describes."""

    def __init__(self, runs: Runs, seed: int, what: str, settings: dict):
        self.stem = os.path.splitext(_cache_path(runs, seed, what))[0]
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


class _ResumableLoop:
    """A loop run that outlives the process: its run folder (`<what>-seed<seed>/` in the cache, checkpointed by
    the loop after every stage) and a mark beside it (`<what>-seed<seed>.json`: what the folder was started for,
    the largest net, the loop's settings and the benchmark's, and the time spent before an interruption), both
    committed with the records, so `--resume` goes on from the last completed stage, also in a fresh checkout.
    A folder started for anything else (another grown net, target or recipe) is removed and the run starts
    afresh. Yields `(folder, clock)`; the clock counts the interrupted attempts' time as well. Both go when the
    block ends normally (the step is recorded)."""

    def __init__(self, runs: Runs, seed: int, what: str, largest: dict, config):
        from dataclasses import asdict

        self.folder = os.path.splitext(_cache_path(runs, seed, what))[0]
        started_for = {**runs.settings, "config": asdict(config),
                       "largest": [largest["params"], largest["test_accuracy"]]}
        # as the mark's file will read it back (tuples as lists), so that the same run compares equal
        self.mark = _Checkpoint(runs, seed, what, json.loads(json.dumps(started_for)))

    def __enter__(self):
        import shutil

        spent = self.mark.load(model=False)
        if spent is None and os.path.isdir(self.folder):
            shutil.rmtree(self.folder)   # started for something else: its checkpoint would be refused
        self.clock = _Clock(spent)
        self.mark.save(None, self.clock.times())
        return self.folder, self.clock

    def __exit__(self, kind, error, trace):
        import shutil

        if kind is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.mark.clear()
        else:   # interrupted (Ctrl-C, `kill`) or failed: the next attempt counts this one's time
            self.mark.save(None, self.clock.times())
        return False
