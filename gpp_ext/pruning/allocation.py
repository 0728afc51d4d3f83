"""How many channels each group keeps (its width), decided apart from which channels (docs/design.md §2.5).

    widths = allocate(graph, scores, budget=0.1, kind="flops", method="solver")
    keep = keep_top(scores, widths)          # the criterion picks the channels inside each width

The criterion's scores are compared across groups only after normalisation: each group's scores divided by
their mean (`normalize="mean"`, so every layer's channels average 1), or as they are (`"none"`, for a
criterion whose scale is comparable across layers). A group's *value* at width `w` is the sum of its `w` best
normalised scores. Methods:

- `"uniform"`: every group keeps the same fraction of its channels (the scores only pick which);
- `"global"`: one threshold on the normalised scores (a channel stays when it is worth at least `t` times its
  layer's average), found by bisection on the budget;
- `"solver"`: the widths of greatest total value whose cost meets the budget, a group's value being the log of
  the share of its normalised score it keeps (so no group is starved; `group_values`), scaled by the group's
  coefficient (1 by default). Cost-aware: on a FLOP budget a hidden-layer neuron that costs almost nothing is
  kept, a costly convolution channel has to be worth it. Exact dynamic programming over the width grid where
  the groups form a chain coupled only pairwise (a plain CNN: each layer's cost is bilinear in its own width and
  its input's); elsewhere (residual groups, concatenations) a greedy that removes, one grid step at a time, the
  step that loses the least value per unit of cost saved, then spends what is left of the budget back;
- `"fisher"` (`fisher_widths`): the solver with each group's coefficient measured on data instead of 1: the
  group's share of the loss's sensitivity, the mask Fisher information summed over its channels (the quantity
  Group Fisher ranks single channels by, `group_fisher.mask_fisher`) relative to the mean over groups, to the
  power `FISHER_POWER`. With log values the solver spends on each group in proportion to its coefficient, so
  equal coefficients give every group an equal share of the budget whatever it does for the loss; the Fisher
  coefficients move the budget to the groups the loss depends on (docs/design.md §2.5);
- `"search"` (`search_widths`): per-group coefficients of the solver searched by the loss of each candidate,
  cut and BatchNorm-recalibrated (`CandidateEvaluator`);
- `"genetic"` (`genetic.genetic_widths`): a genetic search over the widths guided by per-group sensitivity,
  on the same evaluator, finalists re-scored after a short fine-tune.

Every method keeps each group on its *width grid*: multiples of a step that grows with the group's size (1 up to
16 channels, 4 up to 64, 8 up to 256, 16 beyond: CPU kernels in oneDNN and ONNX Runtime work on blocks of 8 or
16 channels, and an odd width can make a smaller model slower), or of `round_to` when given, and at least
`floor` of its channels (and `min_channels`); the full width is always on the grid. Every allocation meets the
budget by the exact `CostModel` (a latency budget: by the measured `costs.LatencyModel`), or is the smallest
the grid allows, with a warning.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .costs import KINDS, cost_model as make_cost_model
from .graph import ChannelGraph

__all__ = ["allocate", "keep_top", "width_grid", "group_values", "ALLOCATIONS", "ON_DATA", "CandidateEvaluator",
           "fisher_coefficients", "fisher_widths", "search_widths", "evaluator_from",
           "held_out_batches"]

ALLOCATIONS = ("uniform", "global", "solver", "fisher", "search", "genetic")
# the allocations that need data: an evaluator (`CandidateEvaluator`), whose fixed training slice "fisher" measures
# its coefficients on and the searches score their candidates on
ON_DATA = ("fisher", "search", "genetic")
# the exponent of the "fisher" allocation's coefficients: 0 is the plain solver, 1 spends in proportion to the
# Fisher share itself; 1/2 was chosen on validation (docs/design.md §2.5)
FISHER_POWER = 0.5
_DP_BUCKETS = 2000  # cost resolution of the chain DP: costs are rounded up, so a solution never exceeds the budget


def width_step(size: int) -> int:
    """The grid step of a group of `size` channels: 1 up to 16, 4 up to 64, 8 up to 256, 16 beyond."""
    return 1 if size <= 16 else 4 if size <= 64 else 8 if size <= 256 else 16


def width_grid(size: int, floor: float = 0.0, min_channels: int = 1, round_to: int | None = None) -> list:
    """The widths a group of `size` channels may keep, ascending: multiples of the step (`round_to`, else
    `width_step(size)`) from the floor (`max(min_channels, ceil(floor * size))`, rounded up to the step) to
    `size`, and `size` itself."""
    step = round_to if round_to else width_step(size)
    low = min(size, max(1, min_channels, math.ceil(floor * size - 1e-9)))
    low = min(size, math.ceil(low / step) * step)
    return sorted(set(range(low, size + 1, step)) | {size})


def _normalised(scores: dict, normalize: str) -> dict:
    if normalize not in ("mean", "none"):
        raise ValueError(f"allocate: normalize must be 'mean' or 'none', got {normalize!r}")
    scores = {n: u.detach().double().cpu() for n, u in scores.items()}
    return {n: u / u.mean().clamp_min(1e-300) if normalize == "mean" else u for n, u in scores.items()}


VALUES = ("log", "sum")


def group_values(scores: dict, normalize: str = "mean", value: str = "log") -> dict:
    """`{group: [size + 1] values}` for every width `w`, from `U(w)`, the sum of the group's `w` best normalised
    scores: `value="log"`, `log(U(w) / U(size))`, the log of the share of the group's score it keeps (summed over
    groups, a product of shares: no group can be starved, as its log falls without bound); `"sum"`, `U(w)`
    itself (channels of every group interchangeable at their normalised worth)."""
    if value not in VALUES:
        raise ValueError(f"allocate: value must be one of {VALUES}, got {value!r}")
    out = {}
    for name, u in _normalised(scores, normalize).items():
        ranked = torch.sort(u, descending=True).values
        kept = np.concatenate([[0.0], np.cumsum(ranked.numpy())])
        if value == "log":
            total = max(kept[-1], 1e-300)
            kept = np.log(np.maximum(kept / total, 1e-12))
        out[name] = kept
    return out


def keep_top(scores: dict, widths: dict) -> dict:
    """`{group: kept indices}`: the `widths[group]` highest-scoring channels of each group, in their order."""
    keep = {}
    for name, u in scores.items():
        order = torch.sort(u.detach().double().cpu(), descending=True, stable=True).indices
        keep[name] = order[:int(widths[name])].sort().values
    return keep


def check_scores(graph: ChannelGraph, scores: dict, where: str = "allocate", arg: str = "scores") -> None:
    """`ValueError` (from `where`, naming `arg`) unless `scores` maps prunable groups of `graph` to finite,
    non-negative tensors of the group's size."""
    groups = {g.name: g for g in graph.groups}
    unknown = set(scores) - set(groups)
    if unknown:
        raise ValueError(f"{where}: {arg} name groups that are not prunable: {sorted(unknown)}")
    for name, u in scores.items():
        if not isinstance(u, torch.Tensor) or u.shape != (groups[name].size,):
            raise ValueError(f"{where}: {arg}[{name!r}] must be a tensor of shape [{groups[name].size}], got "
                             f"{getattr(u, 'shape', type(u).__name__)}")
        if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
            raise ValueError(f"{where}: {arg}[{name!r}] must be finite and >= 0")


def _check(graph: ChannelGraph, scores: dict, budget: float, kind: str, normalize: str = "mean",
           floor: float = 0.0, min_channels: int = 1, round_to: int | None = None) -> None:
    """Every argument an allocation reads, checked before any work (the allocations on data evaluate
    candidates first, so a bad grid argument must not wait for `allocate`)."""
    check_scores(graph, scores)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"allocate: budget must be in (0, 1] (the fraction of the cost to keep), got {budget!r}")
    if kind not in KINDS:
        raise ValueError(f"allocate: kind must be one of {KINDS}, got {kind!r}")
    if normalize not in ("mean", "none"):
        raise ValueError(f"allocate: normalize must be 'mean' or 'none', got {normalize!r}")
    if not 0 <= floor < 1 or min_channels < 1 or (round_to is not None and round_to < 1):
        raise ValueError(f"allocate: floor must be in [0, 1), min_channels >= 1, round_to >= 1 or None, got "
                         f"{floor}, {min_channels}, {round_to}")


def _warn_over(model, widths: dict, budget: float, kind: str, where: str) -> None:
    """The warning `allocate` gives when the grid's smallest widths cannot meet the budget, for the searches that
    silence `allocate`'s own while they try candidates."""
    share = model.cost(widths) / model.cost({})
    if share > budget * (1 + 1e-12):
        warnings.warn(f"{where}: a {kind} budget of {budget:.1%} cannot be met on the width grid; the widths found "
                      f"keep {share:.1%}", RuntimeWarning, stacklevel=3)


def allocate(graph: ChannelGraph, scores: dict, budget: float, kind: str = "params", method: str = "solver",
             normalize: str = "mean", floor: float = 0.0, min_channels: int = 1, round_to: int | None = None,
             coefficients: dict | None = None, value: str = "log", cost_model=None, latency=None) -> dict:
    """`{group: width}` for the groups in `scores`, meeting `budget` (a fraction of the model's cost in `kind`
    units: "params", "flops", or "latency" with `latency` a `gpp_ext.latency.LatencyTable`; or the cost of a
    `cost_model` given). See the module's doc for `method` ("uniform", "global", "solver"; "search"
    needs data: `search_widths`), `normalize`, the grid (`floor`, `min_channels`, `round_to`). The solver
    maximises the sum of the groups' values (`group_values(value=...)`), each scaled by its `coefficients`
    entry (default 1). Groups not in `scores` stay whole."""
    _check(graph, scores, budget, kind, normalize, floor, min_channels, round_to)
    if method not in ALLOCATIONS or method in ON_DATA:
        raise ValueError(f"allocate: method must be 'uniform', 'global' or 'solver' (the allocations on data are "
                         f"fisher_widths, search_widths and genetic.genetic_widths), got {method!r}")
    model = cost_model or make_cost_model(graph, kind, latency)
    sizes = {g.name: g.size for g in graph.groups}
    grids = {n: width_grid(sizes[n], floor, min_channels, round_to) for n in scores}
    target = budget * model.cost({})
    if method == "solver":
        values = group_values(scores, normalize, value)
        coefficients = coefficients or {}
        values = {n: v * float(coefficients.get(n, 1.0)) for n, v in values.items()}
        widths = _solve(model, grids, values, target)
    else:
        widths = _bisected(model, grids, _normalised(scores, normalize), target, method)
    cost = model.cost(widths)
    if cost > target * (1 + 1e-12):
        warnings.warn(f"allocate: a {kind} budget of {budget:.1%} cannot be met on the width grid (floor {floor}, "
                      f"min_channels {min_channels}, round_to {round_to}); returning the smallest widths it allows "
                      f"({cost / model.cost({}):.1%})", RuntimeWarning, stacklevel=2)
    return widths


def _snap(grid: list, count: int) -> int:
    """The smallest grid width holding at least `count` channels."""
    return next((w for w in grid if w >= count), grid[-1])


def _bisected(model, grids: dict, normalised: dict, target: float, method: str) -> dict:
    """Uniform fraction or global threshold, the smallest knob whose widths meet `target`."""
    if method == "global":
        def widths_at(t):
            return {n: _snap(grids[n], int((u >= t).sum())) for n, u in normalised.items()}
        lo, hi = 0.0, max(float(u.max()) for u in normalised.values()) + 1e-9
    else:
        def widths_at(t):
            return {n: _snap(grids[n], int(math.ceil(u.numel() * (1 - t) - 1e-9))) for n, u in normalised.items()}
        lo, hi = 0.0, 1.0
    if model.cost(widths_at(lo)) <= target:
        return widths_at(lo)
    if model.cost(widths_at(hi)) > target:
        return widths_at(hi)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if model.cost(widths_at(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return widths_at(hi)


# --------------------------------------------------------------------------------------------- the solver

def _chain(names: list, terms: list) -> list | None:
    """The groups in chain order when every cost term couples at most two groups and those couplings form
    paths (no group coupled to three others, no cycle); else None."""
    edges = {n: set() for n in names}
    for groups, _ in terms:
        inside = [g for g in groups if g in edges]
        if len(inside) > 2:
            return None
        if len(inside) == 2 and inside[0] != inside[1]:
            edges[inside[0]].add(inside[1])
            edges[inside[1]].add(inside[0])
    if any(len(e) > 2 for e in edges.values()):
        return None
    order, seen = [], set()
    for start in [n for n in names if len(edges[n]) <= 1] + names:
        if start in seen:
            continue
        if len(edges[start]) == 2:  # every node of this component has two neighbours: a cycle
            return None
        node, previous = start, None
        while node is not None:
            order.append(node)
            seen.add(node)
            nxt = [m for m in edges[node] if m != previous and m not in seen]
            previous, node = node, (nxt[0] if nxt else None)
    return order if len(order) == len(names) else None


def _solve(model, grids: dict, values: dict, target: float) -> dict:
    constant, terms = model.terms()
    names = list(grids)
    sizes = model.sizes
    full = {n: sizes[n] for n in sizes}
    # Terms that do not involve the groups being allocated are constant too (groups left whole).
    free = set(names)
    fixed = [(g, f) for g, f in terms if not set(g) & free]
    moving = [(tuple(x for x in g if x in free), g, f) for g, f in terms if set(g) & free]
    constant += sum(f(full) for _, f in fixed)
    order = _chain(names, [(inside, None) for inside, _, _ in moving])
    if order is not None:
        widths = _chain_dp(order, grids, values, moving, full, target - constant)
        if widths is not None:
            return _fill(model, grids, values, widths, target)
    return _greedy(model, grids, values, target)


def _chain_dp(order: list, grids: dict, values: dict, moving: list, full: dict, room: float) -> dict | None:
    """Exact (up to cost buckets rounded up) maximum of the summed values over a chain of groups."""
    if room <= 0:
        return None
    unit = room / _DP_BUCKETS
    position = {n: i for i, n in enumerate(order)}
    unary = {n: np.zeros(len(grids[n])) for n in order}
    pair = {}  # (i, i+1) -> [len(grid_i), len(grid_i+1)] costs
    for inside, groups, cost_of in moving:
        if len(inside) == 1:
            n = inside[0]
            for k, w in enumerate(grids[n]):
                unary[n][k] += cost_of({**full, n: w})
        else:
            a, b = sorted(inside, key=position.get)
            table = pair.setdefault((a, b), np.zeros((len(grids[a]), len(grids[b]))))
            for i, wa in enumerate(grids[a]):
                for j, wb in enumerate(grids[b]):
                    table[i, j] += cost_of({**full, a: wa, b: wb})
    buckets = _DP_BUCKETS + 1
    neg = -np.inf
    first = order[0]
    dp = np.full((len(grids[first]), buckets), neg)
    for k in range(len(grids[first])):
        c = int(math.ceil(unary[first][k] / unit - 1e-9))
        if c < buckets:
            dp[k, c] = values[first][grids[first][k]]
    back = []
    for prev, cur in zip(order, order[1:]):
        table = pair.get((prev, cur))
        new = np.full((len(grids[cur]), buckets), neg)
        arg = np.zeros((len(grids[cur]), buckets), dtype=np.int32)
        for j, wb in enumerate(grids[cur]):
            for i in range(len(grids[prev])):
                c = int(math.ceil((unary[cur][j] + (table[i, j] if table is not None else 0.0)) / unit - 1e-9))
                if c >= buckets:
                    continue
                shifted = np.full(buckets, neg)
                shifted[c:] = dp[i, :buckets - c]
                better = shifted > new[j]
                new[j][better] = shifted[better]
                arg[j][better] = i
            new[j] += values[cur][wb]
        back.append(arg)
        dp = new
    if not np.isfinite(dp).any():
        return None
    j, k = np.unravel_index(int(np.argmax(dp)), dp.shape)
    widths = {}
    for step in range(len(order) - 1, -1, -1):
        name = order[step]
        widths[name] = grids[name][j]
        if step == 0:
            break
        prev = order[step - 1]
        i = int(back[step - 1][j, k])
        table = pair.get((prev, name))
        k -= int(math.ceil((unary[name][j] + (table[i, j] if table is not None else 0.0)) / unit - 1e-9))
        j = i
    return widths


def _ratio_steps(model, grids, values, widths, direction: int):
    """Candidate one-step moves: (value change per unit of cost change, group, new width, new cost)."""
    base = model.cost(widths)
    for n, grid in grids.items():
        k = grid.index(widths[n]) + direction
        if not 0 <= k < len(grid):
            continue
        trial = {**widths, n: grid[k]}
        cost = model.cost(trial)
        dc, dv = abs(base - cost), abs(values[n][widths[n]] - values[n][grid[k]])
        yield (dv / dc if dc > 0 else math.inf), n, grid[k], cost


def _greedy(model, grids: dict, values: dict, target: float) -> dict:
    """From full widths, the step losing the least value per cost saved, until the budget is met; then `_fill`."""
    widths = {n: grid[-1] for n, grid in grids.items()}
    while model.cost(widths) > target:
        steps = [s for s in _ratio_steps(model, grids, values, widths, -1) if s[0] < math.inf]
        if not steps:
            break
        _, n, w, _ = min(steps, key=lambda s: (s[0], s[1]))
        widths[n] = w
    return _fill(model, grids, values, widths, target)


def _fill(model, grids: dict, values: dict, widths: dict, target: float) -> dict:
    """Spends what is left of the budget: adds the grid step gaining the most value per cost that still fits."""
    widths = dict(widths)
    while True:
        steps = [s for s in _ratio_steps(model, grids, values, widths, +1) if s[3] <= target]
        if not steps:
            return widths
        _, n, w, _ = max(steps, key=lambda s: (s[0], s[1]))
        widths[n] = w


# ----------------------------------------------------------------------------------- the calibrated search

class CandidateEvaluator:
    """Scores width vectors on data: each candidate is cut from a copy of `model` (the `widths[g]`
    highest-scoring channels of every group), its BatchNorm statistics re-estimated on `calibration` batches,
    and its loss measured on `batches` (a fixed list of `(inputs, labels)`, the same for every candidate):
    cross-entropy, or with `teacher_logits=True` the KL divergence to the unpruned model's outputs. Lower is
    better. Counts its evaluations and their time (`evaluations`, `seconds`). Reusable by any search over
    widths (the calibrated solver here; a genetic search). `held_out` batches (optional) are kept apart for a
    search to re-score its finalists on data that did not rank them (`finetuned(..., held_out=True)`)."""

    def __init__(self, model, example_inputs, scores: dict, batches: list, calibration: list | None = None,
                 loss: str = "kl", ignore=(), device="cpu", held_out: list | None = None):
        import copy

        if loss not in ("kl", "ce"):
            raise ValueError(f"CandidateEvaluator: loss must be 'kl' or 'ce', got {loss!r}")
        if not batches:
            raise ValueError("CandidateEvaluator: batches must hold at least one (inputs, labels) batch")
        self.model, self.example, self.scores, self.ignore = model, example_inputs, scores, tuple(ignore)
        self.batches, self.calibration, self.loss, self.device = batches, calibration or batches, loss, device
        self.held_out = list(held_out or ())
        self.evaluations, self.seconds = 0, 0.0
        self._copy = copy.deepcopy
        self.reference = None
        if loss == "kl":
            was = model.training
            model.eval()
            with torch.no_grad():
                self.reference = [torch.log_softmax(model(x.to(device)).double(), 1) for x, _ in batches]
            model.train(was)

    def _candidate(self, widths: dict):
        candidate = self._copy(self.model)
        graph = ChannelGraph(candidate, self.example, ignore=self.ignore)
        graph.prune(keep_top(self.scores, widths))
        return candidate

    def finetuned(self, widths: dict, steps: int = 8, lr: float = 1e-3, held_out: bool = False) -> float:
        """The candidate's loss after a short fine-tune: `steps` AdamW steps of cross-entropy on the calibration
        batches (cycled), then BatchNorm recalibration and the same measurement as a call; with `held_out` (and
        held-out batches given) the cross-entropy on the held-out batches instead, so that candidates ranked on
        the scoring batches are compared on data that did not rank them."""
        import time

        import torch.nn.functional as F

        started = time.perf_counter()
        candidate = self._candidate(widths)
        candidate.train()
        optimizer = torch.optim.AdamW(candidate.parameters(), lr=lr, weight_decay=0.0)
        for step in range(steps):
            x, y = self.calibration[step % len(self.calibration)]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(candidate(x.to(self.device)), y.to(self.device)).backward()
            optimizer.step()
        return self._measure(candidate, self.held_out if held_out and self.held_out else None, started)

    def __call__(self, widths: dict, batches: list | None = None) -> float:
        import time

        started = time.perf_counter()
        return self._measure(self._candidate(widths), batches, started)

    def _measure(self, candidate, batches, started) -> float:
        import time

        import torch.nn.functional as F

        from ..training import recalibrate_batchnorm

        recalibrate_batchnorm(candidate, self.calibration, device=self.device)
        candidate.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b, (x, y) in enumerate(batches or self.batches):
                logits = candidate(x.to(self.device)).double()
                if self.loss == "ce" or batches is not None:
                    total += float(F.cross_entropy(logits, y.to(self.device), reduction="sum"))
                else:
                    total += float(F.kl_div(torch.log_softmax(logits, 1), self.reference[b], log_target=True,
                                            reduction="sum"))
                count += x.shape[0]
        self.evaluations += 1
        self.seconds += time.perf_counter() - started
        return total / max(count, 1)


def fisher_coefficients(graph: ChannelGraph, batches, groups=None, power: float = FISHER_POWER,
                        device=None) -> dict:
    """`{group: coefficient}` for the solver (`allocate(coefficients=...)`): each group's mask Fisher information
    summed over its channels (`group_fisher.mask_fisher` on `batches` of `(inputs, labels)`, moved to `device`),
    divided by the mean over `groups` (default: every prunable group), to the power `power`. A model whose loss
    does not move on these batches (every total zero) gets equal coefficients: the plain solver."""
    from .group_fisher import mask_fisher

    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power <= 4:
        raise ValueError(f"fisher_coefficients: power must be a number in [0, 4], got {power!r}")
    names = list(groups) if groups is not None else [g.name for g in graph.groups]
    known = {g.name for g in graph.groups}
    if not names or set(names) - known:
        raise ValueError(f"fisher_coefficients: groups must name prunable groups of the graph, got "
                         f"{sorted(set(names) - known) or names}")
    if device is None:
        device = next((p.device for p in graph.model.parameters()), torch.device("cpu"))
    fisher = mask_fisher(graph, [(x.to(device), y.to(device)) for x, y in batches])
    totals = {n: float(fisher[n].sum()) for n in names}
    mean = sum(totals.values()) / len(totals)
    if not math.isfinite(mean):
        raise ValueError("fisher_coefficients: the mask Fisher information is not finite (a diverged model?)")
    if mean <= 0:
        return {n: 1.0 for n in names}
    return {n: (t / mean) ** power for n, t in totals.items()}


def fisher_widths(graph: ChannelGraph, scores: dict, budget: float, evaluate, kind: str = "params",
                  normalize: str = "mean", floor: float = 0.0, min_channels: int = 1, round_to: int | None = None,
                  value: str = "log", power: float = FISHER_POWER, cost_model=None, latency=None) -> tuple:
    """The `"fisher"` allocation: `(widths, record)`, the solver's widths (`allocate(method="solver")`) with the
    groups' coefficients from `fisher_coefficients` on the fixed training slice of `evaluate` (a
    `CandidateEvaluator`: its calibration and scoring batches). `record` holds the coefficients and the seconds
    (one backward pass per batch; no candidate is cut)."""
    import time

    _check(graph, scores, budget, kind, normalize, floor, min_channels, round_to)
    started = time.perf_counter()
    batches = list(evaluate.calibration)
    if evaluate.batches is not evaluate.calibration:
        batches += list(evaluate.batches)
    coefficients = fisher_coefficients(graph, batches, groups=list(scores), power=power, device=evaluate.device)
    widths = allocate(graph, scores, budget, kind, "solver", normalize=normalize, floor=floor,
                      min_channels=min_channels, round_to=round_to, coefficients=coefficients, value=value,
                      cost_model=cost_model, latency=latency)
    return widths, {"coefficients": coefficients, "power": power, "evaluations": 0,
                    "seconds": time.perf_counter() - started}


def search_widths(graph: ChannelGraph, scores: dict, budget: float, evaluate, kind: str = "params",
                  normalize: str = "mean", floor: float = 0.0, min_channels: int = 1, round_to: int | None = None,
                  value: str = "log",
                  starts: int = 24, rounds: int = 24, finalists: int = 4, rescore=None, seed: int = 0,
                  progress: bool = False, cost_model=None, latency=None) -> tuple:
    """The calibrated search: `(widths, record)`.

    Per-group coefficients `c` (log-uniform in [1/4, 4]) scale the solver's values; each coefficient vector
    gives one allocation meeting the budget exactly (`allocate(method="solver")`), scored by `evaluate(widths)`
    (a `CandidateEvaluator`; lower is better). `starts` random vectors (the first is all ones: the plain
    solver; uniform and global widths are scored too), then `rounds` of local search around the best (each
    round resamples a shrinking share of the coefficients), identical width vectors scored once. The
    `finalists` best are re-scored by `rescore` (e.g. the evaluator on more data) when given. Same seed, same
    widths. `record` holds the evaluations, the seconds and the scores of the finalists. The budget is in
    `kind` units, counted by `cost_model` when given (else `costs.cost_model(graph, kind, latency)`).
    """
    import time

    from tqdm.auto import tqdm

    _check(graph, scores, budget, kind, normalize, floor, min_channels, round_to)
    if starts < 1 or rounds < 0 or finalists < 1:
        raise ValueError(f"search_widths: starts >= 1, rounds >= 0 and finalists >= 1, got {starts}, {rounds}, "
                         f"{finalists}")
    started = time.perf_counter()
    model = cost_model or make_cost_model(graph, kind, latency)
    names = sorted(scores)
    rng = np.random.default_rng(seed)
    common = dict(kind=kind, normalize=normalize, floor=floor, min_channels=min_channels, round_to=round_to,
                  cost_model=model)
    seen = {}

    bar = tqdm(total=starts + rounds + 2, desc="width search", leave=False, disable=None if progress else True)

    def score(widths):
        key = tuple(widths[n] for n in names)
        if key not in seen:
            loss = float(evaluate(widths))
            seen[key] = loss if math.isfinite(loss) else math.inf   # a diverged candidate ranks last
        bar.update(1)
        return seen[key], key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        candidates = [allocate(graph, scores, budget, method=m, **common) for m in ("uniform", "global")]
        for widths in candidates:
            score(widths)
        best_c, best = None, math.inf
        for s in range(starts):
            c = np.ones(len(names)) if s == 0 else np.exp(rng.uniform(math.log(0.25), math.log(4.0), len(names)))
            got, _ = score(allocate(graph, scores, budget, method="solver", value=value,
                                    coefficients=dict(zip(names, c)), **common))
            if got < best:
                best_c, best = c, got
        if best_c is None:
            raise ValueError(f"search_widths: no candidate of the {starts} starts has a finite loss (the evaluator "
                             f"returned NaN or inf for all: a diverged model, or an evaluator that fails)")
        for r in range(rounds):
            share = max(1, int(round(len(names) * 0.5 * (1 - r / max(rounds, 1)))))
            c = best_c.copy()
            which = rng.choice(len(names), size=share, replace=False)
            c[which] *= np.exp(rng.normal(0.0, 0.5, size=share))
            c = np.clip(c, 0.25, 4.0)
            got, _ = score(allocate(graph, scores, budget, method="solver", value=value,
                                    coefficients=dict(zip(names, c)), **common))
            if got < best:
                best_c, best = c, got
    bar.close()
    ranked = sorted(seen.items(), key=lambda kv: (kv[1], kv[0]))[:finalists]
    if rescore is not None:
        final = sorted(((float(rescore(dict(zip(names, key)))), key) for key, _ in ranked))
    else:
        final = [(value, key) for key, value in ranked]
    widths = dict(zip(names, final[0][1]))
    _warn_over(model, widths, budget, kind, "search_widths")
    record = {"evaluations": len(seen) + (len(ranked) if rescore is not None else 0),
              "seconds": time.perf_counter() - started,
              "finalists": [{"widths": dict(zip(names, key)), "score": value} for value, key in final]}
    return widths, record


def held_out_batches(allocation: str) -> int:
    """How many held-out batches `allocation`'s evaluator keeps: 8 for the genetic search, which re-scores its
    finalists on them; none for the others."""
    return 8 if allocation == "genetic" else 0


def evaluator_from(model, example_inputs, scores: dict, loader, ignore=(), device="cpu", batches: int = 8,
                   calibration: int = 8, max_batches: int | None = None, loss: str = "kl",
                   held_out: int = 0) -> CandidateEvaluator:
    """A `CandidateEvaluator` on the first batches of `loader` (the same fixed batches for every candidate):
    `calibration` batches re-estimate BatchNorm, the `batches` after them (or the same ones when the loader is
    shorter) measure the loss, and the `held_out` after those (as many as the loader and `max_batches` leave)
    are kept for re-scoring a search's finalists (`held_out_batches(allocation)`: only the allocations that
    re-score read them, so no other reads more of the loader than it uses)."""
    from ..training import labelled_batches

    wanted = calibration + batches + held_out
    limit = wanted if max_batches is None else min(max_batches, wanted)
    taken = [(x.cpu(), y.cpu()) for x, y in labelled_batches(loader, "cpu", limit=limit)]
    if not taken:
        raise ValueError("allocation search: the loader yields no batches")
    calib = taken[:calibration]
    scored = taken[calibration:calibration + batches] or calib
    return CandidateEvaluator(model, example_inputs, scores, scored, calibration=calib, loss=loss, ignore=ignore,
                              device=device, held_out=taken[calibration + batches:])
