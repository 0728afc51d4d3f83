"""The compression benchmark's runner: the choices first, then every (model, seed, budget, method) cell.

1. GPP's recipe candidates on validation at the recipe models' choice budgets (seed 0); the default recipe must
   win them, or no GPP row runs (`choices.default_check`).
2. Per model: the peers' regularisation on validation (seed 0), per band of budgets (`choices.sweep_bands`),
   then every cell not yet in the records, each
   saved as soon as it is measured; records made under other choices, another training recipe or another
   GPP configuration are redone.
3. The ablation, after the cells of the model it runs on.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict

import torch

import gpp_ext
from gpp_ext import data
from gpp_ext.training import evaluate

from . import choices as choosing
from . import methods, protocol


def knobs_for(method: str, chosen: dict, budget: float) -> dict:
    """A cell's knobs for `method` at `budget`: its band's choice (`choices.sweep_bands`)."""
    return choosing.knobs_of(chosen, methods.sweep_key(method), budget)


def _stale(record: dict, chosen: dict) -> bool:
    """A record made with other choices, another training recipe, (a loop row) another loop than the one its
    cell would run now (compared on what the run reads, `loop.run_settings`), (a one-shot criterion) another
    default's widths (`methods.widths_rule`), or before records carried their widths (no `widths` key; None is a
    recorded answer): the latency pass rebuilds a compact model that was not kept from them."""
    if "widths" not in record:
        return True
    settings = methods.loop_settings(record["method"], record.get("knobs", {}))
    if settings is not None:
        now = methods.cell_config(record["budget"], record.get("budget_kind", "params"), record["epochs"],
                                  record["seed"], settings)
        if not protocol.same_config(record.get("config"), {k: v for k, v in asdict(now).items() if k != "ignore"}):
            return True
    rule = methods.widths_rule(record["method"])
    if rule is not None and record.get("widths_rule", methods.WIDTHS_RULE_BEFORE) != rule:
        return True  # a one-shot criterion cut at the widths of another default
    return record.get("knobs", {}) != knobs_for(record["method"], chosen, record["budget"]) or \
        record.get("train") != protocol.train_recipe()


def _left(name: str, cells: list, done: set, records: list, choices: list) -> str:
    """A line saying how many of `name`'s cells are still to run and about how long they take: per method, the
    median wall time of its recorded runs on this model (else of its validation trials, else of every run on the
    model)."""
    todo = [c for c in cells if (name, *c) not in done]
    if not todo:
        return f"{name}: every cell recorded"
    seconds = {}
    for r in [*records, *choices]:
        if r["model"] == name and r.get("seconds") is not None:
            seconds.setdefault(r["method"], []).append(r["seconds"])
    every = [v for vs in seconds.values() for v in vs]
    if not every:
        return f"{name}: {len(todo)} of {len(cells)} cells to run"
    fallback = statistics.median(every)
    hours = sum(statistics.median(seconds[m]) if m in seconds else fallback for *_, m in todo) / 3600
    return f"{name}: {len(todo)} of {len(cells)} cells to run, about {hours:.1f} h at the medians of its recorded runs"


def _then(first, later):
    """The items of `first`, then those of `later()`, called only once `first` is exhausted."""
    yield from first
    yield from later()


def kd_cells(args, name: str, records: list, validated: bool) -> list:
    """The distillation study's cells on model `name` (`args.kd = (model, kind, budget)`), once every seed of
    the plain methods is recorded there: GPP with distillation, the genetic search without it, and the peer with
    the best mean validation accuracy there (all its seeds recorded) with it."""
    if not getattr(args, "kd", None) or args.kd[0] != name:
        return []
    _, kind, budget = args.kd
    here = [r for r in records if r["model"] == name and r.get("budget_kind", "params") == kind
            and r["budget"] == budget and methods.kd_variant(r["method"])[1] is None]
    seeds = set(args.seeds)
    by = {}
    for r in here:
        by.setdefault(r["method"], []).append(r)
    complete = {m: rs for m, rs in by.items() if {r["seed"] for r in rs} >= seeds}
    peers = {m: rs for m, rs in complete.items() if not m.startswith("gpp") and m != "genetic"}  # as the tables
    if not peers or "genetic" not in complete or (validated and "gpp" not in complete):
        return []
    best = max(peers, key=lambda m: statistics.mean(r["val_accuracy"] for r in peers[m]))
    wanted = ["genetic-nokd", f"{best}+kd"] + (["gpp+kd"] if validated else [])
    return [(s, kind, budget, m) for s in args.seeds for m in wanted]


class Contexts:
    """`(splits, base, stem)` per (model, seed), the last two kept (a split of Fashion-MNIST is ~200 MB)."""

    def __init__(self, args, cache: protocol.Cache):
        self.args, self.cache, self.kept = args, cache, {}

    def __call__(self, name: str, seed: int):
        key = (name, seed)
        if key not in self.kept:
            args = self.args
            splits = data.load_dataset(args.data, seed=seed)
            base = protocol.base_model(name, splits, args, seed, self.cache)
            accuracy = evaluate(base, splits.test)
            print(f"{name} seed {seed}: base {gpp_ext.count_params(base):,} params, test accuracy {accuracy:.4f}",
                  flush=True)
            if args.mode == "full" and accuracy < protocol.THRESHOLDS.get(name, 0.0):
                print(f"  warning: the base is below the protocol's {protocol.THRESHOLDS[name]:.1%}", file=sys.stderr)
            while len(self.kept) >= 2:
                self.kept.pop(next(iter(self.kept)))
            self.kept[key] = (splits, base, f"{name}-{args.data}-{args.mode}-seed{seed}", accuracy)
        return self.kept[key][:3]

    def accuracy(self, name: str, seed: int) -> float:
        self(name, seed)
        return self.kept[(name, seed)][3]


def run(args, records: list, save, choices: list, save_choices) -> None:
    """Runs the choices and every cell not yet in `records`, saving after each run."""
    # full-mode bases are kept beside the results (benchmarks/results/bases/), committed with them
    cache = protocol.Cache(args.cache, args.resume, args.kept)
    contexts = Contexts(args, cache)
    trials = choosing.Trials(args, choices, save_choices,
                             lambda method, base, setup, stem: protocol.measure(method, base, setup, cache, stem,
                                                                                keep=False))
    seed0 = args.choice_seed   # the mode's first seed, whichever seeds this part runs
    recipe_models = [m for m in args.models if m in args.recipe_models]
    if any(m in args.gpp_methods for name in args.models for m in args.methods_of[name]):
        print(f"GPP's recipe on validation: {', '.join(args.candidates)} at the choice budgets of "
              f"{', '.join(recipe_models)}", flush=True)
        for name in recipe_models:
            choosing.compare_recipes(trials, name, args.choice_budgets[name], seed0, contexts(name, seed0),
                                     args.candidates)
    # the default recipe is validated on every recipe model together, whichever models this part runs
    validated, best, default, means, missed = choosing.default_check(choices, tuple(args.recipe_models))
    absent = [m for m in args.recipe_models
              if not any(e["what"] == "gpp recipe" and e["model"] == m for e in choices)]
    if absent:
        validated = False
        print(f"benchmarks.compression: GPP's recipe is validated on {', '.join(args.recipe_models)} together and "
              f"{', '.join(absent)} has no recipe trials yet; the GPP rows wait until a part runs it (--models "
              f"{','.join(absent)})", file=sys.stderr)
    if best is not None:
        trials.mark("gpp recipe", None, best)
        print("  mean validation accuracy: " + ", ".join(f"{s} {v:.4f}{' (missed a size target)' * (s in missed)}"
                                                        for s, v in sorted(means.items(), key=lambda kv: -kv[1]))
              + f"; chosen: {best}", flush=True)
    if not validated and default is None:
        print("benchmarks.compression: no recipe candidate is the default recipe (choices.CANDIDATES), so nothing "
              "validates it; the GPP rows run the default recipe, so none runs until it is a candidate that wins "
              "(then --resume)", file=sys.stderr)
    elif not validated:
        print(f"benchmarks.compression: candidate {best!r} beats the default recipe ({default!r}) on validation "
              f"({means[best]:.4f} against {means[default]:.4f}); the GPP rows run the default recipe, so none "
              f"runs until gpp_ext.recipes makes the validated candidate the default (then --resume)",
              file=sys.stderr)
    done = {(r["model"], r["seed"], r.get("budget_kind", "params"), r["budget"], r["method"]) for r in records}
    for name in args.models:
        wanted = [m for m in args.methods_of[name] if validated or m not in args.gpp_methods]
        cells = [(s, k, b, m) for s in args.seeds for k, b in args.budgets[name] for m in wanted]
        ablation = args.ablation if name in args.ablation_budgets else ()
        if not cells and not ablation:
            continue
        chosen = choosing.sweep_bands(trials, name, args.choice_budgets[name], seed0, contexts(name, seed0),
                                      args.sweep_values)
        stale = [r for r in records if r["model"] == name and _stale(r, chosen)]
        if stale:
            print(f"  redoing {len(stale)} record(s) made with other choices, training or GPP configuration",
                  flush=True)
            records[:] = [r for r in records if not any(r is x for x in stale)]
            done -= {(r["model"], r["seed"], r.get("budget_kind", "params"), r["budget"], r["method"]) for r in stale}
            save(records)
        with_bn = protocol.has_bn(contexts(name, seed0)[1])
        print(_left(name, [c for c in cells if with_bn or not protocol.needs_bn(c[3])], done, records, choices),
              flush=True)
        for seed, kind, budget, method in _then(cells, lambda: kd_cells(args, name, records, validated)):
            if (name, seed, kind, budget, method) in done:
                continue
            splits, base, stem = contexts(name, seed)
            if protocol.needs_bn(method) and not protocol.has_bn(base):
                continue
            setup = methods.Setup(splits, budget, kind, seed, args.epochs, args.prep_epochs,
                                  knobs=knobs_for(method, chosen, budget))
            m = protocol.measure(method, base, setup, cache, stem)
            base_cost = gpp_ext.count_params(base) if kind == "params" else \
                gpp_ext.count_flops(base, torch.zeros(2, *splits.input_shape))
            record = {"method": method, "model": name, "dataset": args.data, "budget_kind": kind,
                      "budget": budget, "seed": seed, "knobs": setup.knobs, **m,
                      "base_params": gpp_ext.count_params(base), "base_cost": base_cost,
                      "base_test_accuracy": contexts.accuracy(name, seed),
                      "met_budget": m[kind] <= budget * base_cost * protocol.BUDGET_SLACK}
            record.update(protocol.settings(args, name), commit=args.commit, torch=torch.__version__,
                          machine=args.machine, train=protocol.train_recipe())
            records.append(record)
            done.add((name, seed, kind, budget, method))
            save(records)
            after = (f"after cut {m['acc_after_cut']:.4f} -> recal {m['acc_after_recal']:.4f}"
                     if m["acc_after_cut"] is not None else f"val after cut {m['val_after_cut']:.4f}")
            print(f"  {name} seed {seed} {method:<34} {kind} {budget:>5.0%}: {m[kind]:>11,} {after} -> "
                  f"{m['test_accuracy']:.4f} ({m['seconds']:.0f} s)", flush=True)
        if ablation:
            print(f"{name}: the ablation ({len(ablation)} cells) on validation, seed {seed0}", flush=True)
            choosing.run_ablation(trials, name, args.ablation_budgets[name], seed0, contexts(name, seed0),
                                  ablation)
