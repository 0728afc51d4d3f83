"""Width allocation as its own step: every method meets the budget exactly on the width grid, the chain DP is the
exact optimum, the greedy serves residual and concatenated groups, the Fisher-weighted solver follows the loss's
sensitivity, the calibrated search is reproducible, and the fade keeps the widths of its first selection."""

import itertools

import numpy as np
import pytest
import torch

from gpp_ext import data, models, prune
from gpp_ext.fade import RemovalFade
from gpp_ext.pruning import ChannelGraph, CostModel
from gpp_ext.pruning.allocation import (CandidateEvaluator, _chain, _greedy, allocate, evaluator_from,
                                        fisher_coefficients, fisher_widths, group_values, keep_top, search_widths,
                                        width_grid)
from gpp_ext.training import fit, training_batches

NETS = {
    "lenet5": (lambda: models.build("lenet5", in_channels=1, num_classes=10, input_size=28), (2, 1, 28, 28)),
    "vgg": (lambda: models.build("vgg"), (2, 1, 28, 28)),
    "resnet20": (lambda: models.build("resnet20", in_channels=1), (2, 1, 28, 28)),
    "inception": (lambda: models.build("inception"), (2, 1, 28, 28)),
}


def graph_and_scores(name, seed=0):
    build, shape = NETS[name]
    torch.manual_seed(seed)
    graph = ChannelGraph(build(), torch.zeros(shape))
    g = torch.Generator().manual_seed(seed)
    return graph, {grp.name: torch.rand(grp.size, generator=g) for grp in graph.groups}


def test_width_grid_is_hardware_friendly_and_floored():
    assert width_grid(6) == [1, 2, 3, 4, 5, 6]
    assert width_grid(32) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert width_grid(128, floor=0.1) == [16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128]
    assert width_grid(1000)[:2] == [16, 32] and width_grid(1000)[-2:] == [992, 1000]  # full width always on it
    assert width_grid(20, round_to=8) == [8, 16, 20]


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("method", ["uniform", "global", "solver"])
def test_every_allocation_meets_the_budget_exactly_on_the_grid(name, kind, method):
    graph, scores = graph_and_scores(name)
    cost = CostModel(graph, kind)
    sizes = {g.name: g.size for g in graph.groups}
    for budget in (0.5, 0.15):
        widths = allocate(graph, scores, budget, kind, method, floor=0.05)
        assert cost.cost(widths) <= budget * cost.cost({})
        for n, w in widths.items():
            assert w in width_grid(sizes[n], floor=0.05), (n, w)
        # by a real cut, not only by the cost model
        keep = keep_top(scores, widths)
        model = graph.model
        import copy

        trial = copy.deepcopy(model)
        ChannelGraph(trial, graph.example_inputs).prune(keep)
        from gpp_ext.cost import count_flops, count_params

        real = count_params(trial) if kind == "params" else count_flops(trial, graph.example_inputs)
        assert real == cost.cost(widths)


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("value", ["log", "sum"])
def test_the_chain_dp_finds_the_exact_optimum(kind, value):
    graph, scores = graph_and_scores("lenet5", seed=3)
    cost = CostModel(graph, kind)
    values = group_values(scores, value=value)
    names = sorted(scores)
    sizes = {g.name: g.size for g in graph.groups}
    grids = {n: width_grid(sizes[n]) for n in names}
    assert _chain(names, [(g, None) for g, _ in cost.terms()[1]]) is not None  # LeNet-5 is a chain
    for budget in (0.3, 0.08):
        target = budget * cost.cost({})
        best = max(sum(values[n][w] for n, w in zip(names, combo))
                   for combo in itertools.product(*(grids[n] for n in names))
                   if cost.cost(dict(zip(names, combo))) <= target)
        widths = allocate(graph, scores, budget, kind, "solver", value=value)
        assert cost.cost(widths) <= target
        assert sum(values[n][widths[n]] for n in names) == pytest.approx(best, rel=1e-12, abs=1e-12)
        greedy = _greedy(cost, grids, values, target)  # the greedy is a heuristic: never better than the optimum
        assert sum(values[n][greedy[n]] for n in names) <= best + 1e-9


def test_residual_and_concatenated_groups_go_to_the_greedy():
    for name in ("resnet20", "inception"):
        graph, scores = graph_and_scores(name)
        assert _chain(sorted(scores), [(g, None) for g, _ in CostModel(graph, "params").terms()[1]]) is None


def test_the_solver_is_cost_aware_and_starves_no_group():
    graph, scores = graph_and_scores("vgg")
    sizes = {g.name: g.size for g in graph.groups}
    by_params = allocate(graph, scores, 0.1, "params", "solver")
    by_flops = allocate(graph, scores, 0.1, "flops", "solver")
    head = [n for n in sizes if n.startswith("classifier") or "fc" in n or sizes[n] == 256]
    # the hidden layer costs almost no FLOPs: a FLOP budget keeps more of it than a parameter budget does
    assert all(by_flops[n] >= by_params[n] for n in head) and any(by_flops[n] > by_params[n] for n in head)
    raw = allocate(graph, scores, 0.1, "params", "solver", value="sum")  # channels interchangeable: extremes
    share = lambda w: min(w[n] / sizes[n] for n in w)  # noqa: E731
    assert share(by_params) > share(raw)
    assert share(by_params) >= 0.5 * min(w / sizes[n] for n, w in allocate(graph, scores, 0.1, "params",
                                                                         "uniform").items())


def test_the_search_is_reproducible_meets_the_budget_and_beats_the_plain_solver_on_its_own_score():
    graph, scores = graph_and_scores("vgg")
    cost = CostModel(graph, "flops")
    sizes = {g.name: g.size for g in graph.groups}
    wanted = {n: s // 3 for n, s in sizes.items()}  # an objective the plain solver does not know

    def evaluate(widths):
        return sum(abs(widths[n] - wanted[n]) / sizes[n] for n in widths)

    plain = allocate(graph, scores, 0.2, "flops", "solver")
    first, record = search_widths(graph, scores, 0.2, evaluate, "flops", starts=12, rounds=12, seed=7)
    again, _ = search_widths(graph, scores, 0.2, evaluate, "flops", starts=12, rounds=12, seed=7)
    assert first == again
    assert cost.cost(first) <= 0.2 * cost.cost({})
    assert evaluate(first) <= evaluate(plain)
    assert 3 <= record["evaluations"] <= 26 and record["seconds"] >= 0 and record["finalists"]


@pytest.fixture(scope="module")
def trained_lenet():
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    return fit(model, splits.train, 4, lr=3e-3, seed=0), splits


def test_the_candidate_evaluator_scores_real_cuts(trained_lenet):
    model, splits = trained_lenet
    x = torch.zeros(2, 1, 8, 8)
    graph = ChannelGraph(model, x)
    scores = {g.name: torch.rand(g.size) for g in graph.groups}
    evaluate = evaluator_from(model, x, scores, training_batches(splits.train, 64, 0))
    full = {g.name: g.size for g in graph.groups}
    assert evaluate(full) == pytest.approx(0.0, abs=1e-9)  # the unpruned model: no KL to itself
    small = {n: max(1, s // 4) for n, s in full.items()}
    assert evaluate(small) > evaluate({n: max(1, s // 2) for n, s in full.items()}) > 0
    assert evaluate.evaluations == 3 and isinstance(evaluate, CandidateEvaluator)
    assert {g.name: g.size for g in ChannelGraph(model, x).groups} == full


def test_fisher_coefficients_weight_each_group_by_the_loss_sensitivity_it_carries(trained_lenet):
    import copy

    model, splits = trained_lenet
    x = torch.zeros(2, 1, 8, 8)
    batches = list(itertools.islice(training_batches(splits.train, 64, 0), 4))
    graph = ChannelGraph(model, x)
    one = fisher_coefficients(graph, batches, power=1.0)
    half = fisher_coefficients(graph, batches, power=0.5)
    assert set(one) == {g.name for g in graph.groups}
    assert np.mean(list(one.values())) == pytest.approx(1.0)  # shares of the mean
    assert all(half[n] == pytest.approx(one[n] ** 0.5) for n in one) and len(set(one.values())) > 1
    assert all(v == 1.0 for v in fisher_coefficients(graph, batches, power=0).values())  # the plain solver
    # a group the loss cannot see (conv2 reads nothing of conv1) carries no Fisher information: coefficient 0,
    # and the solver keeps it at the bottom of its grid while the plain solver does not
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind.conv2.weight.zero_()
    graph = ChannelGraph(blind, x)
    coefficients = fisher_coefficients(graph, batches)
    assert coefficients["conv1"] == 0.0 and all(v > 0 for n, v in coefficients.items() if n != "conv1")
    scores = {g.name: torch.ones(g.size) for g in graph.groups}
    evaluate = evaluator_from(blind, x, scores, training_batches(splits.train, 64, 0), batches=2, calibration=2)
    widths, record = fisher_widths(graph, scores, 0.3, evaluate, "params")
    assert record["coefficients"] == pytest.approx(fisher_coefficients(graph, evaluate.calibration + evaluate.batches))
    assert widths["conv1"] == width_grid(6)[0] < allocate(graph, scores, 0.3, "params", "solver")["conv1"]
    assert CostModel(graph, "params").cost(widths) <= 0.3 * CostModel(graph, "params").cost({})
    with pytest.raises(ValueError, match="power"):
        fisher_coefficients(graph, batches, power=-1)
    with pytest.raises(ValueError, match="fisher_widths"):
        allocate(graph, scores, 0.3, "params", "fisher")


@pytest.mark.parametrize("allocation", ["solver", "fisher", "search"])
def test_prune_with_an_allocation_meets_the_budget(trained_lenet, allocation):
    model, splits = trained_lenet
    loader = training_batches(splits.train, 64, 0)
    compact, report = prune(model, loader, torch.zeros(2, 1, 8, 8), budget=0.3, allocation=allocation, floor=0.1,
                            progress=False)
    assert report.params[1] <= 0.3 * report.params[0]
    assert all(after >= max(1, int(np.ceil(0.1 * before))) for before, after in report.widths.values())


def test_the_fade_keeps_the_widths_of_its_first_selection(trained_lenet):
    model, splits = trained_lenet
    import copy

    model = copy.deepcopy(model)
    loader = training_batches(splits.train, 64, 0)
    fade = RemovalFade(model, torch.zeros(2, 1, 8, 8), loader, 0.3, criterion="random", reselect=4,
                       allocation="solver", max_batches=2)
    widths = dict(fade.widths)
    fit(model, splits.train, 1, lr=1e-3, after_step=fade.step)
    keep = fade.finish()
    sizes = {g.name: g.size for g in fade.graph.groups}
    assert {n: int(keep[n].numel()) if n in keep else sizes[n] for n in widths} == widths
    assert len(fade.history) == 4 and all(h["removed"] == fade.history[0]["removed"] for h in fade.history)


def test_half_faded_channels_come_back_only_when_ranked_in_the_top_half(trained_lenet):
    model, splits = trained_lenet
    import copy

    fade = RemovalFade(copy.deepcopy(model), torch.zeros(2, 1, 8, 8), training_batches(splits.train, 64, 0), 0.3,
                       criterion="l1", allocation="uniform", max_batches=2)
    name = max(fade.widths, key=lambda n: fade.widths[n])
    width = fade.widths[name]
    removed = fade.removed[name]
    scores = {n: torch.zeros(size) for n, size in ((g.name, g.size) for g in fade.graph.groups) if n in fade.widths}
    # the removed channels now score best: ranked in the top half they come back even when faded ...
    scores[name] = torch.zeros(scores[name].numel())
    scores[name][removed] = 1.0 + torch.arange(removed.numel(), dtype=torch.float)
    back = fade._keep_at_widths(scores, 0.1, fade.widths)[name]
    top_half = removed.flip(0)[:width // 2]
    assert set(top_half.tolist()) <= set(back.tolist())
    # ... but beyond the top half a channel faded past half stays out; barely faded, it may return
    scores[name] = torch.zeros(scores[name].numel())
    scores[name][removed] = 1.0  # all tie above the rest; ranks among them follow the index order
    faded = fade._keep_at_widths(scores, 0.1, fade.widths)[name]
    fresh = fade._keep_at_widths(scores, 0.9, fade.widths)[name]
    assert len(set(removed.tolist()) & set(faded.tolist())) <= width // 2
    assert len(set(removed.tolist()) & set(fresh.tolist())) == min(width, removed.numel())
    assert faded.numel() == fresh.numel() == width


def test_the_searches_on_data_check_their_arguments_before_any_evaluation():
    from gpp_ext.pruning.genetic import genetic_widths

    graph, scores = graph_and_scores("lenet5")

    def evaluate(widths):
        raise AssertionError("a candidate was evaluated before the arguments were checked")

    evaluate.calibration, evaluate.batches, evaluate.device = [], [], "cpu"
    for bad in (dict(floor=1.5), dict(min_channels=0), dict(round_to=0), dict(normalize="max")):
        for search in (search_widths, genetic_widths, fisher_widths):
            with pytest.raises(ValueError, match="allocate: (floor|normalize)"):
                search(graph, scores, 0.3, evaluate, "flops", **bad)
    with pytest.raises(ValueError, match="mutation in"):
        genetic_widths(graph, scores, 0.3, evaluate, "flops", mutation=1.5)


def test_the_search_ranks_diverged_candidates_last_and_says_when_all_diverged():
    graph, scores = graph_and_scores("vgg")
    sizes = {g.name: g.size for g in graph.groups}
    first = sorted(sizes)[0]

    def some_diverge(widths):  # the narrower the first group, the better, unless it is narrower than half
        return float("nan") if widths[first] < sizes[first] // 2 else widths[first] / sizes[first]

    widths, record = search_widths(graph, scores, 0.3, some_diverge, "flops", starts=8, rounds=4, seed=0)
    assert widths[first] >= sizes[first] // 2 and np.isfinite(record["finalists"][0]["score"])
    with pytest.raises(ValueError, match="no candidate of the 4 starts has a finite loss"):
        search_widths(graph, scores, 0.3, lambda w: float("nan"), "flops", starts=4, rounds=2)


def test_the_search_warns_when_the_grid_cannot_meet_the_budget():
    graph, scores = graph_and_scores("lenet5")
    with pytest.warns(RuntimeWarning, match="search_widths: a flops budget of 1.0% cannot be met"):
        search_widths(graph, scores, 0.01, lambda w: sum(w.values()), "flops", floor=0.5, starts=2, rounds=0)
