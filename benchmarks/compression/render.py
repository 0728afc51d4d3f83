"""Tables and plots of the compression benchmark's records (benchmarks/results/compression.{md,png})."""

from __future__ import annotations

import statistics

from gpp_ext.io import write_atomic

CURVE = ("0.125", "0.25", "0.5", "1")  # fine-tuning epochs at which accuracy is recorded (plus the end)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _budget(kind: str, budget: float) -> str:
    return f"{budget:.0%}" + (" FLOPs" if kind == "flops" else "")


def _groups(records):
    groups = {}
    for r in records:
        groups.setdefault((r["model"], r.get("budget_kind", "params"), r["budget"]), {}).setdefault(
            r["method"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "params", kv[0][1], -kv[0][2])))


def _met(rs) -> bool:
    return all(r.get("met_budget", True) for r in rs)


def _ranked(by_method):
    return sorted(by_method.items(), key=lambda kv: -_mean(r["test_accuracy"] for r in kv[1]))


def _contenders(by_method: dict) -> list:
    """`[(method, runs)]` of a cell ranked by mean test accuracy: the methods that met the budget in every seed
    and have every seed of the cell (one still missing some, a run in progress, is ranked once it has them all).
    Who wins and the speed duel rank the same way."""
    seeds = {r["seed"] for rs in by_method.values() for r in rs}
    return _ranked({m: rs for m, rs in by_method.items() if _met(rs) and {r["seed"] for r in rs} == seeds})


def _paired(mine: list, theirs: list) -> str:
    """`std, k of n`: the per-seed differences of test accuracy between two methods' runs (seeds both have), their
    standard deviation and the number of seeds in which the first was ahead."""
    other = {r["seed"]: r["test_accuracy"] for r in theirs}
    diffs = [r["test_accuracy"] - other[r["seed"]] for r in mine if r["seed"] in other]
    if not diffs:
        return "–"
    spread = f"± {statistics.stdev(diffs):.4f}, " if len(diffs) > 1 else ""
    return f"{spread}{sum(d > 0 for d in diffs)} of {len(diffs)}"


def _latency_cell(rs) -> str:
    passed = [r["latency"]["eager"] for r in rs if "latency" in r]
    if passed:
        b1, b64 = (statistics.median(p[k] for p in passed) for k in ("b1_ms", "b64_ms"))
        return f"{b1:.3f} / {b64:.2f}"
    return f"{_mean(r['latency_ms_b1'] for r in rs):.3f} / {_mean(r['latency_ms_b64'] for r in rs):.2f} *"


def _paired_speed(ours: list, theirs: list, runtime: str, batch: int) -> str:
    """GPP's speed-up over a peer, paired by seed: the peer's latency over GPP's for the models of the same seed
    (same base), so a seed where the two keep other widths is not compared with another seed's model."""
    def by_seed(rs):
        return {r["seed"]: r["latency"][runtime][f"b{batch}_ms"] for r in rs if runtime in r["latency"]}

    mine, other = by_seed(ours), by_seed(theirs)
    ratios = sorted(other[s] / mine[s] for s in mine.keys() & other.keys())
    if not ratios:
        return "–"
    middle = statistics.median(ratios)
    return f"{middle:.2f}" + (f" ({ratios[0]:.2f}–{ratios[-1]:.2f})" if len(ratios) > 1 else "")


def _speed(records) -> list:
    """The speed-up of each method's compact models over the base, from the latency pass (median over seeds)."""
    timed = [r for r in records if "latency" in r]
    if not timed:
        return []
    runtimes = [k for k in ("eager", "onnxruntime") if any(k in r["latency"] for r in timed)]
    heads = [f"{k} b{b}" for k in runtimes for b in (1, 64)]
    lines = ["", "## Speed of the compact models", "",
             "Speed-up over the base model timed in the same window (median over seeds; > 1 is faster), CPU, "
             f"on {', '.join(sorted({r['latency']['machine'] for r in timed}))} (latency pass at commit(s) "
             f"{', '.join(sorted({r['latency']['commit'] for r in timed}))}).", "",
             "| model | budget | method | seeds timed | " + " | ".join(heads) + " |",
             "|---|---:|---|---:|" + "---:|" * len(heads)]

    def speedup(rs, k, b):
        v = [r["latency"][k][f"speedup_b{b}"] for r in rs if k in r["latency"]]
        return statistics.median(v) if v else None

    duel = []
    for (model, kind, budget), by_method in _groups(timed).items():
        for method, rs in _ranked(by_method):
            cells = [f"{v:.2f}x" if v is not None else "–" for v in (speedup(rs, k, b) for k in runtimes
                                                                        for b in (1, 64))]
            lines.append(f"| {model} | {_budget(kind, budget)} | {method} | {len(rs)} | " + " | ".join(cells) + " |")
        # GPP against the most accurate peer that met the budget (the one it has to beat on accuracy)
        ranked = [m for m, _ in _contenders(_groups(records)[(model, kind, budget)]) if not m.startswith("gpp")]
        if "gpp" in by_method and ranked and ranked[0] in by_method:
            cells = [_paired_speed(by_method["gpp"], by_method[ranked[0]], k, b) for k in runtimes for b in (1, 64)]
            duel.append(f"| {model} | {_budget(kind, budget)} | {ranked[0]} | " + " | ".join(cells) + " |")
    if duel:
        lines += ["", "GPP's compact models against the most accurate peer's at each budget: GPP's speed-up over "
                  "the peer's, seed by seed (the peer's latency over GPP's, both models of the same seed and base "
                  "timed in the same window), the median over seeds and, in brackets, the lowest and highest; "
                  "> 1: GPP is faster.", "",
                  "| model | budget | best peer | " + " | ".join(heads) + " |", "|---|---:|---|" + "---:|" * len(heads)]
        lines += duel
    return lines


def render(records: list, meta: dict, sweeps: list = ()) -> str:
    """Markdown: how the numbers were made, who wins at each budget, every method with accuracy along the way,
    the distillation study, then the sweeps and the ablation made on validation."""
    from .methods import kd_variant

    kd = [r for r in records if kd_variant(r["method"])[1] is not None]
    plain = [r for r in records if kd_variant(r["method"])[1] is None]
    return _render(plain, meta, sweeps, kd)


def _distillation(plain: list, kd: list) -> list:
    if not kd:
        return []
    from .methods import kd_variant

    lines = ["", "## Distillation in the fine-tuning", "",
             "The same runs with and without distillation from the base model in every fine-tuning (weight 0.5, "
             "temperature 4): GPP (`gpp+kd`), the best peer there by validation accuracy (`+kd`) and the genetic "
             "search, which distils by default (`genetic-nokd` without). Test accuracy, mean ± std over seeds.", "",
             "| model | budget | method | without | with | with − without |", "|---|---:|---|---:|---:|---:|"]
    places = sorted({(r["model"], r.get("budget_kind", "params"), r["budget"]) for r in kd})
    for model, kind, budget in places:
        here = [r for r in plain + kd if r["model"] == model and r.get("budget_kind", "params") == kind
                and r["budget"] == budget]
        for variant in sorted({r["method"] for r in kd if r["model"] == model and r["budget"] == budget}):
            method, with_kd = kd_variant(variant)
            other = [r["test_accuracy"] for r in here if r["method"] == method]
            this = [r["test_accuracy"] for r in here if r["method"] == variant]
            without, withs = (other, this) if with_kd else (this, other)
            diff = f"{_mean(withs) - _mean(without):+.4f}" if withs and without else "–"
            lines.append(f"| {model} | {_budget(kind, budget)} | {method} | {mean_std(without)} | {mean_std(withs)} "
                         f"| {diff} |")
    return lines


def _render(records: list, meta: dict, sweeps: list, kd: list) -> str:
    lines = [f"# Compression benchmark ({', '.join(sorted({r['dataset'] for r in records}))})", "",
             f"Rendered {meta['date']}. Machine: {', '.join(sorted({r['machine'] for r in records}))}; torch "
             f"{', '.join(sorted({r['torch'] for r in records}))}; commit(s) "
             f"{', '.join(sorted({r['commit'] for r in records}))}; harness version "
             f"{', '.join(sorted({str(r.get('harness')) for r in records}))}.", "",
             "Every method starts from the same converged base model and gets the same training after it: "
             "`epochs` in all, its preparation (sparse training, a push, a fade) counted, the rest fine-tuning; "
             "every phase trains with the loop's own recipe ("
             + "; ".join(sorted({_recipe(r.get("train")) for r in records})) + "). GPP's rows are "
             "`GrowPushPrune(...).run()` with the default recipe (`gpp`; `gpp-fade`/`gpp-nopush`: the same loop with "
             "the push switched). BatchNorm is recalibrated after each cut. The peers' regularisation and GPP's "
             "recipe were chosen on a validation split at seed 0 (see the end); accuracies below are on the test "
             "set, mean ± std over seeds; seconds are the median over seeds of a run's wall time (searches "
             "included; the median, because a run that shared the machine with a memory-starved process once "
             "took 50x its usual time).", ""]
    for model in sorted({r["model"] for r in records}):
        mine = [r for r in records if r["model"] == model]
        base = {r["seed"]: r["base_test_accuracy"] for r in mine}
        conf = {k: sorted({str(r.get(k)) for r in mine}) for k in ("base_epochs", "epochs", "prep_epochs")}
        lines.append(f"- **{model}**: base {', '.join(conf['base_epochs'])} epochs (cosine), test accuracy "
                     f"{mean_std(list(base.values()))} over seeds {sorted(base)}; then {', '.join(conf['epochs'])} "
                     f"epochs per method, of which up to {', '.join(conf['prep_epochs'])} before the cut.")
    lines += ["", "## Who wins", "",
              "| model | budget | best (test acc) | gpp: test acc, rank | best peer on test | gpp − best peer | "
              "per seed: std, gpp ahead |",
              "|---|---:|---|---|---|---:|---|"]
    for (model, kind, budget), by_method in _groups(records).items():
        order = _contenders(by_method)
        names = [m for m, _ in order]
        if not names:
            continue

        def acc(method):
            return _mean(r["test_accuracy"] for r in by_method[method])

        peers = [m for m in names if not m.startswith("gpp")]
        gap = f"{acc('gpp') - acc(peers[0]):+.4f}" if "gpp" in names and peers else "–"
        paired = _paired(by_method["gpp"], by_method[peers[0]]) if "gpp" in names and peers else "–"
        lines.append(f"| {model} | {_budget(kind, budget)} | {names[0]} ({acc(names[0]):.4f}) | "
                     + (f"{acc('gpp'):.4f}, {names.index('gpp') + 1} of {len(names)}" if "gpp" in names else "–")
                     + " | " + (f"{peers[0]} ({acc(peers[0]):.4f})" if peers else "–") + f" | {gap} | {paired} |")
    lines += ["", "The best peer is the one with the best mean test accuracy, picked after the fact among every peer "
              "(a best-of-many on test, so the gap is if anything conservative for GPP; every choice the methods "
              "ran with was made on validation). "
              "Ranks count the methods that met the budget (2% slack for whole channels) in every seed; † "
              "below marks the others; a method still missing some of a cell's seeds is not ranked there yet. The "
              "last column pairs GPP with the best peer seed by seed (the same base model): the standard deviation "
              "of the per-seed differences, and in how many seeds GPP was ahead. A gap smaller than that deviation "
              "is not one the seeds can tell from noise.", "", "## Every method", "",
              "Accuracy at the end of the preparation, right after the cut, after BatchNorm recalibration, after "
              "1/8, 1/4, 1/2 and 1 epoch of fine-tuning, and at the end (test set, mean over seeds). GPP's rows "
              "are whole loop runs, which report validation accuracy at the end of the push and after the cut "
              "(in the records: `val_end_of_push`, `val_after_cut`), so their columns along the way are empty.", "",
              "| model | budget | method | params | FLOPs | end of prep | after cut | after recal | ft 1/8 | "
              "ft 1/4 | ft 1/2 | ft 1 | final (± std) | latency b1 / b64 (ms) | seconds |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(v):
        return "–" if v is None else f"{v:.4f}"

    for (model, kind, budget), by_method in _groups(records).items():
        seeds = {r["seed"] for rs in by_method.values() for r in rs}
        for method, rs in _ranked(by_method):
            missed = "" if _met(rs) else f" † ({sum(not r['met_budget'] for r in rs)} of {len(rs)} over budget)"
            if len(rs) < len(seeds):
                missed += f" (seeds {', '.join(str(s) for s in sorted(r['seed'] for r in rs))} so far)"
            curve = [cell(_mean(r.get("ft_curve", {}).get(k) for r in rs)) for k in CURVE]
            lines.append(f"| {model} | {_budget(kind, budget)} | {method}{missed} | "
                         f"{_mean(r['params'] for r in rs):,.0f} | {_mean(r['flops'] for r in rs):,.0f} | "
                         f"{cell(_mean(r['acc_end_of_prep'] for r in rs))} | "
                         f"{cell(_mean(r['acc_after_cut'] for r in rs))} | "
                         f"{cell(_mean(r['acc_after_recal'] for r in rs))} | {' | '.join(curve)} | "
                         f"{mean_std([r['test_accuracy'] for r in rs])} | "
                         f"{_latency_cell(rs)} | {statistics.median(r['seconds'] for r in rs):.0f} |")
    lines += ["", "Latency: CPU, eager PyTorch, median ms at batch 1 / 64, from the latency pass (`--latency`: "
              "every compact model of a budget and the base timed interleaved in one window); * marks figures "
              "measured inside the run instead, which depend on what else the machine was doing."]
    lines += _speed(records)
    lines += _distillation(records, kd)
    lines += _choices(sweeps)
    return "\n".join(lines) + "\n"


def _recipe(train) -> str:
    if not train:
        return "recipe not recorded"
    return (f"{train['optimizer']} lr {train['lr']:g}, {train['lr_schedule']} schedule (warm-up {train['warmup']:g}), "
            f"weight decay {train['weight_decay']:g}, batch {train['batch_size']}")


def _choices(sweeps) -> list:
    if not sweeps:
        return []
    lines = []
    recipe = [s for s in sweeps if s["what"] == "gpp recipe"]
    if recipe:
        lines += ["", "## GPP's recipe, chosen on validation (seed 0)", "",
                  "Each candidate is the loop with the default recipe changed as named, its push named too "
                  "(`choices.CANDIDATES`); the default recipe is one of them and must have the best mean validation "
                  "accuracy over every budget below; † marks a run "
                  "that missed its size target (the loop stopped at its accuracy floor), which disqualifies its "
                  "candidate.", ""]
        places = sorted({(s["model"], s["budget_kind"], s["budget"]) for s in recipe},
                        key=lambda p: (p[0], p[1] != "params", -p[2]))
        lines += ["| candidate | mean val | " + " | ".join(f"{m} {_budget(k, b)} val / test" for m, k, b in places)
                  + " | chosen |", "|---|---:|" + "---:|" * len(places) + ":---:|"]
        by = {}
        for s in recipe:
            by.setdefault(s["setting"], {})[(s["model"], s["budget_kind"], s["budget"])] = s
        for name, cells in sorted(by.items(), key=lambda kv: -_mean(c["val_accuracy"] for c in kv[1].values())):
            row = [f"{cells[p]['val_accuracy']:.4f} / {cells[p]['test_accuracy']:.4f}"
                   + (" †" if cells[p].get("target_reached") is False else "") if p in cells else "–"
                   for p in places]
            chosen = any(c.get("chosen") for c in cells.values())
            lines.append(f"| {name} | {_mean(c['val_accuracy'] for c in cells.values()):.4f} | " + " | ".join(row)
                         + f" | {'yes' if chosen else ''} |")
    ablation = [s for s in sweeps if s["what"] == "gpp ablation"]
    if ablation:
        places = sorted({(s["model"], s["budget_kind"], s["budget"]) for s in ablation},
                        key=lambda p: (p[0], p[1] != "params", -p[2]))
        lines += ["", "## Ablation (seed 0): width allocation x push x schedule", "",
                  "Each cell is the loop with the default recipe changed on these three axes (`choices.ABLATION`); "
                  "validation / test accuracy, nothing chosen from it.", "",
                  "| allocation x push x schedule | " + " | ".join(f"{m} {_budget(k, b)}" for m, k, b in places) + " |",
                  "|---|" + "---:|" * len(places)]
        by = {}
        for s in ablation:
            by.setdefault(s["setting"], {})[(s["model"], s["budget_kind"], s["budget"])] = s
        for name, cells in by.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{cells[p]['val_accuracy']:.4f} / {cells[p]['test_accuracy']:.4f}" if p in cells else "–"
                for p in places) + " |")
    regs = [s for s in sweeps if s["what"] not in ("gpp recipe", "gpp ablation")]
    if regs:
        lines += ["", "## The peers' regularisation, chosen on validation (seed 0)", "",
                  "| model | budget | what | setting | val acc | test acc (not used to choose) | chosen |",
                  "|---|---:|---|---|---:|---:|:---:|"]
        for s in regs:
            setting = s["setting"] + (f" (the run of {s['same_as']})" if s.get("same_as") else "")
            lines.append(f"| {s['model']} | {_budget(s['budget_kind'], s['budget'])} | {s['what']} | {setting} | "
                         f"{s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} | {'yes' if s.get('chosen') else ''} |")
    return lines


def plot(records: list, path: str) -> None:
    from .methods import kd_variant

    records = [r for r in records if kd_variant(r["method"])[1] is None]  # the distillation study: its own table
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r.get("budget_kind", "params")) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (model, kind) in zip(axes[0], panels):
        rows = [r for r in records if r["model"] == model and r.get("budget_kind", "params") == kind]
        for method in sorted({r["method"] for r in rows}):
            rs = [r for r in rows if r["method"] == method]
            budgets = sorted({r["budget"] for r in rs})
            xs = [_mean(r[kind] for r in rs if r["budget"] == b) for b in budgets]
            ys = [_mean(r["test_accuracy"] for r in rs if r["budget"] == b) for b in budgets]
            style = "o-" if method.startswith("gpp") else ("x--" if method.startswith("torch_pruning") else ".:")
            ax.plot(xs, ys, style, label=method, linewidth=2.5 if method == "gpp" else 1)
        ax.set_xscale("log")
        ax.set_xlabel(kind)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{model}, {kind} budgets")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
