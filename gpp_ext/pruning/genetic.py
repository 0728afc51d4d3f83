"""A genetic search over the widths, guided by per-layer sensitivity (channel pruning by a genetic algorithm,
fine-tuned with knowledge distillation): `allocation="genetic"`.

    widths, record = genetic_widths(graph, scores, budget=0.1, evaluate=evaluator, kind="flops", seed=0)

1. **Sensitivity**: each group alone is cut to the budget's fraction of its channels (the others whole) and the
   candidate's loss is measured (`CandidateEvaluator`); a group whose cut costs little loss is insensitive.
2. **The population**: the solver's widths (plain, then with random per-group coefficients), the uniform and
   the global ones, all meeting the budget.
3. **Generations**: tournament selection, uniform crossover of the groups' widths, mutation by grid steps
   biased toward shrinking insensitive groups and growing sensitive ones, then a repair that meets the budget
   exactly (the cheapest loss of sensitivity per unit of cost given back, then what is left of the budget
   spent on the most sensitive groups); the best `elite` carry over. Identical width vectors are scored once.
4. **Two-step fitness**: every individual is scored by its loss after BatchNorm recalibration (the evaluator:
   the same one the calibrated search uses); the `finalists` best are re-scored after a short fine-tune
   (`CandidateEvaluator.finetuned`) on its held-out batches, which ranked none of them (the scoring batches
   would favour whichever finalist their noise favoured), and the best of those wins.

Same seed, same widths. The loop fine-tunes the result; with `finetune_distill` it distils from the unpruned
model (the recipe `genetic` does).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from .allocation import _check, _warn_over, allocate, width_grid
from .costs import cost_model as make_cost_model
from .graph import ChannelGraph

__all__ = ["genetic_widths", "sensitivity"]


def sensitivity(graph: ChannelGraph, budget: float, evaluate, grids: dict) -> dict:
    """`{group: loss rise}` when each group alone keeps `budget` of its channels (snapped to its grid)."""
    full = {g.name: g.size for g in graph.groups}
    base = float(evaluate({n: full[n] for n in grids}))
    out = {}
    for name, grid in grids.items():
        width = next((w for w in grid if w >= math.ceil(budget * full[name])), grid[-1])
        out[name] = max(0.0, float(evaluate({**{n: full[n] for n in grids}, name: width})) - base)
    return out


def genetic_widths(graph: ChannelGraph, scores: dict, budget: float, evaluate, kind: str = "params",
                   normalize: str = "mean", floor: float = 0.0, min_channels: int = 1, round_to: int | None = None,
                   population: int = 12, generations: int = 8, elite: int = 2, mutation: float = 0.25,
                   finalists: int = 3, finetune_steps: int = 8, seed: int = 0, progress: bool = False,
                   cost_model=None, latency=None) -> tuple:
    """The genetic search of the module's doc: `(widths, record)`; `record` holds the sensitivities, the best
    loss of every generation, the evaluations and the seconds."""
    from tqdm.auto import tqdm

    _check(graph, scores, budget, kind, normalize, floor, min_channels, round_to)
    if population < 4 or generations < 0 or not 0 <= elite < population or finalists < 1 or not 0 <= mutation <= 1:
        raise ValueError(f"genetic_widths: population >= 4, generations >= 0, 0 <= elite < population, finalists "
                         f">= 1 and mutation in [0, 1], got {population}, {generations}, {elite}, {finalists}, "
                         f"{mutation}")
    started = time.perf_counter()
    model = cost_model or make_cost_model(graph, kind, latency)
    names = sorted(scores)
    sizes = {g.name: g.size for g in graph.groups}
    grids = {n: width_grid(sizes[n], floor, min_channels, round_to) for n in names}
    target = budget * model.cost({})
    rng = np.random.default_rng(seed)
    seen: dict[tuple, float] = {}
    bar = tqdm(total=len(names) + population * (generations + 1), desc="genetic search", leave=False,
               disable=None if progress else True)

    def fitness(widths: dict) -> float:
        key = tuple(widths[n] for n in names)
        if key not in seen:
            seen[key] = float(evaluate(widths))
        bar.update(1)
        return seen[key]

    sens = sensitivity(graph, budget, lambda w: (bar.update(1), evaluate(w))[1], grids)
    weight = {n: sens[n] / (max(sens.values()) or 1.0) for n in names}   # 0 (insensitive) .. 1

    def repair(widths: dict) -> dict:
        widths = dict(widths)
        while model.cost(widths) > target:
            moves = []
            for n in names:
                k = grids[n].index(widths[n])
                if k == 0:
                    continue
                saved = model.cost(widths) - model.cost({**widths, n: grids[n][k - 1]})
                if saved > 0:
                    moves.append(((weight[n] + 1e-3) / saved, n, grids[n][k - 1]))
            if not moves:
                break
            _, n, w = min(moves)
            widths[n] = w
        while True:  # spend what is left on the most sensitive groups first
            moves = []
            for n in names:
                k = grids[n].index(widths[n])
                if k + 1 < len(grids[n]) and model.cost({**widths, n: grids[n][k + 1]}) <= target:
                    moves.append((-(weight[n] + 1e-3), n, grids[n][k + 1]))
            if not moves:
                return widths
            _, n, w = min(moves)
            widths[n] = w

    common = dict(kind=kind, normalize=normalize, floor=floor, min_channels=min_channels, round_to=round_to,
                  cost_model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        people = [allocate(graph, scores, budget, method=m, **common) for m in ("solver", "uniform", "global")]
        while len(people) < population:
            c = np.exp(rng.uniform(math.log(0.25), math.log(4.0), len(names)))
            people.append(allocate(graph, scores, budget, method="solver", coefficients=dict(zip(names, c)),
                                   **common))
    people = [repair(p) for p in people]
    ranked = sorted(people, key=fitness)
    history = [fitness(ranked[0])]
    for _ in range(generations):
        def pick():
            contenders = rng.choice(len(ranked), size=3, replace=False)
            return ranked[int(min(contenders))]   # `ranked` is sorted: the lowest index is the fittest
        children = [dict(p) for p in ranked[:elite]]
        while len(children) < population:
            a, b = pick(), pick()
            child = {n: (a if rng.random() < 0.5 else b)[n] for n in names}
            for n in names:
                if rng.random() < mutation:
                    k = grids[n].index(child[n])
                    shrink = rng.random() < 0.5 + 0.4 * (0.5 - weight[n])  # insensitive groups shrink more often
                    step = int(rng.integers(1, 3))
                    child[n] = grids[n][max(0, k - step)] if shrink else grids[n][min(len(grids[n]) - 1, k + step)]
            children.append(repair(child))
        ranked = sorted(children, key=fitness)
        history.append(fitness(ranked[0]))
    bar.close()
    unique = []
    for p in ranked:
        if p not in unique:
            unique.append(p)
        if len(unique) == finalists:
            break
    finetuned = getattr(evaluate, "finetuned", None)
    final = sorted(((float(finetuned(p, finetune_steps, held_out=True)) if finetuned else fitness(p), i)
                    for i, p in enumerate(unique)))
    widths = unique[final[0][1]]
    _warn_over(model, widths, budget, kind, "genetic_widths")
    record = {"sensitivity": sens, "best_per_generation": history, "evaluations": len(seen) + len(names) + 1,
              "finalists": [{"widths": unique[i], "score": s} for s, i in final],
              "finalists_scored_on": "held-out batches" if finetuned and getattr(evaluate, "held_out", None) else
              "the scoring batches",
              "seconds": time.perf_counter() - started}
    return widths, record
