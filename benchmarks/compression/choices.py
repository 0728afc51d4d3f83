"""The compression benchmark's choices, made on the validation split at seed 0, recorded, then frozen.

- **The peers' knobs** (`methods.SWEEPS`): per model, band of budgets (`band`: the mild cuts and the hard ones)
  and sparse-training family, the regularisation strength (for Group Fisher the share of the epochs spent
  removing channels, `methods.SWEEP_KNOBS`) with the best mean validation accuracy over the model's choice
  budgets in that band (`protocol.MODES[...]["choice_budgets"]`); a cell takes its band's knobs (`knobs_of`).
- **GPP's recipe**: the candidates below, each the loop with the default recipe changed by a few `LoopConfig`
  fields (every one naming its push, so a recorded trial keeps its meaning when the default changes), compared
  by mean validation accuracy over every choice budget of the recipe models (LeNet-5 and VGG-BN; ResNet-20 is
  held out). The default recipe is a claim that this comparison validated it: it must be one of the candidates,
  and when another wins, the harness says so and runs no GPP row until `recipes` is changed (`default_check`).
- **The ablation** (the full mode: VGG-BN at 10% of the parameters and of the FLOPs): width allocation x push x
  learning-rate schedule, each the loop with those fields changed; validation and test accuracy recorded, nothing
  chosen.

Every trial is recorded in `<out>-choices.json` with its test accuracy, which is never used to choose. A GPP
trial whose loop configuration an earlier trial at the same place already ran (a candidate and an ablation
cell can be the same run) reuses its figures and names it (`same_as`).
"""

from __future__ import annotations

import itertools
import statistics

from . import methods, protocol

# GPP's recipe candidates, each naming its push and its width allocation (the cut at once, or the fade before a
# lossless cut), so that a recorded trial keeps its meaning when the default changes; the default recipe must be
# one of them
SOLVER = dict(allocation="solver")
LDA = dict(criterion="lda")   # the traced discriminant utility: the default criterion until gpp-fade-taylor won
CANDIDATES = {
    "gpp-cut": dict(methods.CUT, **SOLVER, **LDA),
    "gpp-fade": dict(methods.FADE, **SOLVER, **LDA),
    # the fade with less of the budget before the cut (15% instead of a third): more of it fine-tunes the cut
    "gpp-fade-short": dict(methods.FADE, push_share=0.15, **SOLVER, **LDA),
    "gpp-search": dict(methods.CUT, allocation="search", **LDA),
    "gpp-x2": dict(methods.CUT, max_iterations=2, **SOLVER, **LDA),
    "gpp-l1": dict(methods.CUT, criterion="l1", **SOLVER),
    # the short fade at the ablation's other width allocations: near-uniform fractions (the peers' winners
    # keep them) and utilities ranked across groups after per-group normalisation, instead of the solver's
    "gpp-fade-uniform": dict(methods.FADE, push_share=0.15, allocation="uniform", **LDA),
    "gpp-fade-normalised": dict(methods.FADE, push_share=0.15, allocation="global", normalize="mean", **LDA),
    # the short fade with the solver's groups weighted by the loss's mask Fisher information instead of
    # equally (on LeNet-5 at 5% of the parameters the plain solver spends as much on the cheap fc2 as on conv2)
    "gpp-fade-fisher": dict(methods.FADE, push_share=0.15, allocation="fisher", **LDA),
    # the default's fade with the removal set growing over the selections (as gradual pruners remove), and with
    # the first-order Taylor criterion choosing the set instead of the traced discriminant utility: Group Fisher
    # still led on validation at LeNet-5 5% at equal widths; in a 3-seed LeNet-5 probe (10%, 5% of the
    # parameters) they scored +0.07/+0.13 and +0.24/+0.17 points of validation accuracy over the default
    "gpp-fade-gradual": dict(methods.FADE, push_share=0.15, allocation="fisher", fade_gradual=True, **LDA),
    "gpp-fade-taylor": dict(methods.FADE, push_share=0.15, allocation="fisher", criterion="taylor"),
}
# the ablation's axes: how the widths are decided, whether the removal set fades before the cut, and the
# learning-rate schedule of every phase (a constant rate at the rate the first loop used)
ALLOCATION_AXIS = {"raw": dict(allocation="global", normalize="none", floor=0.0),
                   "normalised": dict(allocation="global", normalize="mean"),
                   "solver": dict(allocation="solver"), "fisher": dict(allocation="fisher"),
                   "search": dict(allocation="search"),
                   "uniform": dict(allocation="uniform")}
PUSH_AXIS = {"cut": dict(methods.CUT), "fade": dict(methods.FADE, push_share=0.15)}  # the default's fade
SCHEDULE_AXIS = {"onecycle": dict(lr_schedule="onecycle"), "constant": dict(lr_schedule="constant", lr=2e-3)}
ABLATION = tuple(itertools.product(ALLOCATION_AXIS, PUSH_AXIS, SCHEDULE_AXIS))


def ablation_overrides(cell: tuple) -> dict:
    allocation, push, schedule = cell
    return {**ALLOCATION_AXIS[allocation], **PUSH_AXIS[push], **SCHEDULE_AXIS[schedule]}


class Trials:
    """The recorded validation trials (`choices`, saved by `save` after each), run by `measure`."""

    def __init__(self, args, choices: list, save, measure):
        self.args, self.choices, self.save, self.measure = args, choices, save, measure

    def _current(self, entry: dict, config: dict | None) -> bool:
        """An entry made with today's settings (and, for a loop trial, today's resolution of its knobs)."""
        same = all(entry.get(k) == v for k, v in protocol.settings(self.args, entry["model"]).items())
        return same and entry.get("train") == protocol.train_recipe() and \
            protocol.same_config(entry.get("config"), config)

    def run(self, what: str, setting: str, method: str, knobs: dict, place: tuple, context) -> dict:
        """The trial `what: setting` of `method` with `knobs` at `place = (model, kind, budget, seed)`:
        recorded if new (or made under other settings, then replaced), else read back."""
        model, kind, budget, seed = place
        settings = methods.loop_settings(method, knobs)
        config = protocol.config_of(settings) if settings is not None else None
        key = (model, what, setting, kind, budget, seed)
        for entry in self.choices:
            if _key(entry) == key and self._current(entry, config):
                return entry
        self.choices[:] = [e for e in self.choices if _key(e) != key]  # made under other settings: redone
        earlier = next((e for e in self.choices if config is not None and "same_as" not in e
                        and _key(e)[0] == model and _key(e)[3:] == (kind, budget, seed)
                        and self._current(e, config)), None)
        base = {"model": model, "budget_kind": kind, "budget": budget, "seed": seed, "what": what,
                "setting": setting, "method": method, "knobs": knobs, "config": config,
                **protocol.settings(self.args, model), "train": protocol.train_recipe()}
        if earlier is not None:  # the same run under another name: its figures are reused, not measured twice
            entry = {**base, **{k: earlier[k] for k in _FIGURES if k in earlier},
                     "same_as": f"{earlier['what']}: {earlier['setting']}"}
            note = f" (= {entry['same_as']})"
        else:
            splits, base_model, stem = context
            setup = methods.Setup(splits, budget, kind, seed, self.args.epochs, self.args.prep_epochs, knobs=knobs)
            m = self.measure(method, base_model, setup, stem)
            entry = {**base, **{k: m[k] for k in _FIGURES if k in m}, "commit": self.args.commit,
                     "machine": self.args.machine}
            note = f" ({m['seconds']:.0f} s)"
        self.choices.append(entry)
        self.save(self.choices)
        print(f"  {what:<14} {_where(kind, budget):<11} {setting:<34} val {entry['val_accuracy']:.4f}{note}",
              flush=True)
        return entry

    def mark(self, what: str, model: str | None, chosen_setting: str, places=None) -> None:
        """Flags the trials of `what` on `model` (every model: None) at `places` (`(kind, budget)` pairs; None:
        everywhere) chosen or not, by whether their setting is `chosen_setting`."""
        for e in self.choices:
            if e["what"] == what and (model is None or e["model"] == model) and \
                    (places is None or (e["budget_kind"], e["budget"]) in places):
                e["chosen"] = e["setting"] == chosen_setting
        self.save(self.choices)


_FIGURES = ("val_accuracy", "test_accuracy", "params", "flops", "seconds", "widths", "commit", "machine",
            "target_reached")


def _key(e: dict) -> tuple:
    return (e["model"], e["what"], e["setting"], e["budget_kind"], e["budget"], e["seed"])


def _where(kind: str, budget: float) -> str:
    return f"{kind} {budget:g}"


def best_by_mean(entries: list) -> tuple:
    """`(setting, {setting: mean validation accuracy})` over `entries` (ties: the first listed). A setting whose
    run missed its size target anywhere (a loop that stopped early at its accuracy floor keeps a larger model,
    whose accuracy says nothing about the budget) cannot be chosen while another met every target."""
    by, missed = {}, missed_target(entries)
    for e in entries:
        by.setdefault(e["setting"], []).append(e["val_accuracy"])
    means = {s: statistics.mean(v) for s, v in by.items()}
    eligible = [s for s in means if s not in missed] or list(means)
    return max(eligible, key=means.get), means


def missed_target(entries: list) -> set:
    """The settings whose run missed its size target in any of `entries`."""
    return {e["setting"] for e in entries if e.get("target_reached") is False}


# how many steps a regularisation sweep may go past an end of its grid while its best strength sits at that end
EXTEND_STEPS = 2


def beyond(values: list, best: float) -> float | None:
    """The next strength past the end of the (geometric, ascending) grid `values` where `best` sits, one grid step
    further (the ratio of the last two values at that end, to 3 significant digits, so 1e-3 steps to 0.01 and
    not 0.009999999999999998); None when `best` is inside the grid."""
    if best == values[-1]:
        return float(f"{values[-1] * values[-1] / values[-2]:.3g}")
    if best == values[0]:
        return float(f"{values[0] * values[0] / values[1]:.3g}")
    return None


# The peers' knobs are chosen per band of budgets, since a sparse-training peer's best strength depends on how
# much it must remove: in harness 4 one strength per model, chosen at the hard budgets, cost Torch-Pruning's
# group-norm sparse learning 3 points at LeNet-5's 50% (0.8700 against 0.9017 at its earlier strength). A budget
# keeping at least MILD of the cost is a mild cut; the rest are hard. GPP gets no such choice: its rows run the
# one default recipe at every budget, as users run it.
MILD = 0.2
BANDS = ("hard", "mild")


def band(budget: float) -> str:
    return "mild" if budget >= MILD else "hard"


def sweep_bands(trials: Trials, model: str, budgets: list, seed: int, context, values=None) -> dict:
    """`{band: {family: knobs}}`: `sweep_regs` over the choice budgets of each band that has some. The peers'
    trials of `model` are unflagged first, so a trial at a budget that is no longer a choice budget is not left
    flagged chosen."""
    for e in trials.choices:
        if e["model"] == model and e["what"] not in ("gpp recipe", "gpp ablation"):
            e["chosen"] = False
    return {b: sweep_regs(trials, model, here, seed, context, values)
            for b in BANDS if (here := [(k, x) for k, x in budgets if band(x) == b])}


def knobs_of(chosen: dict, family: str | None, budget: float) -> dict:
    """The knobs a cell at `budget` runs `family` with: its band's choice (`sweep_bands`), or, where its band
    had no choice budget, the other band's."""
    if family is None or not chosen:
        return {}
    return chosen.get(band(budget), next(iter(chosen.values()))).get(family, {})


def sweep_regs(trials: Trials, model: str, budgets: list, seed: int, context, values=None) -> dict:
    """The peers' knob per family (the regularisation strength of the sparse-training ones, Group Fisher's
    removal share), chosen by mean validation accuracy over `budgets`: `{family: {knob: value}}`. `values`
    replaces every regularisation sweep's strengths (a smaller mode; other knobs then keep their middle value).

    A full regularisation sweep (`values` None) whose best strength sits at an end of its grid goes on past that
    end, a grid step at a time (`beyond`, at most `EXTEND_STEPS`), until the best is inside what it tried: a
    peer's best recipe may lie outside the grid first written down, and the peers must get their best. The
    sparse-training peers (`methods.PREP_OPTIMIZER_FAMILIES`) sweep their strengths under each optimiser of their
    preparation (`methods.PREP_OPTIMIZERS`), and the best of all is chosen; they then try a shorter preparation
    at the chosen strength (`methods.PREP_SHARES`, the knob `push_share`). Torch-Pruning's methods then try
    their cut both ways their authors run it, at once (`tp_steps` 1) and progressively (`methods.TP_STEPS`
    small steps, the importance computed again before each), at the chosen strength (full sweeps only)."""
    args = trials.args
    chosen = {}
    for family, regs in methods.SWEEPS.items():
        knob = methods.SWEEP_KNOBS.get(family, "reg")
        # a smaller mode's `values` are strengths; another knob then tries only its middle value
        if values is None:
            values_here = list(regs)
        else:
            values_here = list(values) if knob == "reg" else list(regs[len(regs) // 2:][:1])
        method = family   # every sweep is named by the method it runs
        if method not in args.available or not any(methods.sweep_key(m) == family for m in args.methods_of[model]):
            continue
        if protocol.needs_bn(method) and not protocol.has_bn(context[1]):
            continue
        what = f"{family} {knob}"
        tried = {}   # setting -> knobs

        def trial(knobs, setting):
            tried[setting] = knobs
            return [trials.run(what, setting, method, knobs, (model, kind, budget, seed), context)
                    for kind, budget in budgets]

        def strength(v, optimizer):
            return trial({knob: v, **({"prep_optimizer": optimizer} if optimizer else {})},
                         f"{knob}={v:g}" + (f" {optimizer}" if optimizer else ""))

        entries = []
        # the sparse-training peers: the strengths swept under each optimiser of the preparation
        for optimizer in (methods.PREP_OPTIMIZERS if family in methods.PREP_OPTIMIZER_FAMILIES else (None,)):
            if not values_here:
                break
            grid = list(values_here)
            here = [e for v in grid for e in strength(v, optimizer)]
            best = tried[best_by_mean(here)[0]][knob]
            for _ in range(EXTEND_STEPS if values is None and knob == "reg" else 0):
                further = beyond(grid, best)
                if further is None:
                    break
                grid = sorted([*grid, further])
                here += strength(further, optimizer)
                best = tried[best_by_mean(here)[0]][knob]
            entries += here
        if family in methods.PREP_SHARE_FAMILIES and values is None and entries:
            # a shorter preparation (more fine-tuning) at the best strength
            setting = best_by_mean(entries)[0]
            for share in methods.PREP_SHARES:
                entries += trial({**tried[setting], "push_share": share}, f"{setting}, {share:g} preparing")
        if method.startswith("torch_pruning:") and values is None:
            # the cut at once (what the strengths were swept with), then progressively, at the best strength
            at = tried[best_by_mean(entries)[0]] if entries else {}
            if not entries:
                entries += trial(dict(at), "at once")
            setting = best_by_mean(entries)[0]
            entries += trial({**at, "tp_steps": methods.TP_STEPS},
                             (f"{setting}, " if at else "") + f"{methods.TP_STEPS} steps")
        if not entries:
            continue
        setting = best_by_mean(entries)[0]
        trials.mark(what, model, setting, places=budgets)
        chosen[family] = tried[setting]
    return chosen


def compare_recipes(trials: Trials, model: str, budgets: list, seed: int, context, candidates) -> list:
    """GPP's recipe candidates at `budgets` of `model` (validation, recorded)."""
    return [trials.run("gpp recipe", name, "gpp", CANDIDATES[name], (model, kind, budget, seed), context)
            for name in candidates for kind, budget in budgets]


def default_check(choices: list, models: tuple) -> tuple:
    """`(validated, best, default, means, missed)` over the recipe trials of `models`: whether the candidate whose
    recorded loop is the default recipe's (`default`, None if no candidate is) has the best mean validation
    accuracy (`best`, by `best_by_mean`; `means`: per candidate; `missed`: the candidates that missed a size
    target, which cannot be chosen)."""
    entries = [e for e in choices if e["what"] == "gpp recipe" and e["model"] in models]
    if not entries:
        return True, None, None, {}, set()
    best, means = best_by_mean(entries)
    today = protocol.config_of({})
    default = next((e["setting"] for e in entries if protocol.same_config(e.get("config"), today)), None)
    return default is not None and best == default, best, default, means, missed_target(entries)


def run_ablation(trials: Trials, model: str, budgets: list, seed: int, context, cells) -> None:
    for cell in cells:
        for kind, budget in budgets:
            trials.run("gpp ablation", " x ".join(cell), "gpp", ablation_overrides(cell), (model, kind, budget, seed),
                       context)
