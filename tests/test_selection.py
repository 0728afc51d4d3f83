"""Channel selection: the methods and their guards, the cost model behind the budget search (exact against a
real cut on every architecture the graph tests cover), and a budget search that cuts only once."""

import warnings

import pytest
import torch

import gpp_ext
from gpp_ext import models
from gpp_ext.cost import count_flops, count_params
from gpp_ext.pruning import ChannelGraph, CostModel, select_channels, surgery
from test_graph import CASES, make


def test_selection_methods_and_guards():
    model = models.build("lenet5").eval()
    graph = ChannelGraph(model, torch.randn(2, 1, 28, 28))
    u = {g.name: torch.linspace(0, 1, g.size, dtype=torch.float64) for g in graph.groups}
    keep = select_channels(graph, u, method="ratio", ratio=0.5)
    assert {n: k.numel() for n, k in keep.items()} == {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 42}
    assert torch.equal(keep["conv1"], torch.tensor([3, 4, 5]))  # the best, in their original order
    keep = select_channels(graph, u, method="ratio", ratio=0.9, min_channels=2, round_to=4)
    assert all(k.numel() % 4 == 0 or k.numel() == graph.group(n).size for n, k in keep.items())
    assert all(k.numel() >= 2 for k in keep.values())
    zeros = {n: torch.zeros_like(v) for n, v in u.items()}
    keep = select_channels(graph, zeros, method="eta", eta=0.5)
    assert all(k.numel() == 1 for k in keep.values())  # min_channels: never below one channel
    keep = select_channels(graph, u, method="eta", eta=0.0)
    assert all(k.numel() == graph.group(n).size - 1 for n, k in keep.items())  # only the zero-utility channel
    keep = select_channels(graph, u, method="budget", budget=0.3)
    trial = models.build("lenet5")
    ChannelGraph(trial, torch.randn(2, 1, 28, 28)).prune(keep)
    assert gpp_ext.count_params(trial) <= 0.3 * gpp_ext.count_params(model)
    with pytest.raises(ValueError, match="budget must be in"):
        select_channels(graph, u, method="budget", budget=1.5)
    with pytest.raises(ValueError, match=r"must be a tensor of shape \[6\]"):
        select_channels(graph, {"conv1": torch.ones(3)})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        select_channels(graph, {"conv1": torch.tensor([1.0, float("nan"), 0, 0, 0, 0])})
    with pytest.warns(RuntimeWarning, match="cannot be met"):
        select_channels(graph, u, method="budget", budget=0.001)
    with pytest.raises(ValueError, match="not prunable"):
        select_channels(graph, {"classifier": torch.ones(10)})


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("name", list(CASES))
def test_cost_model_equals_a_real_cut(name, kind):
    model, x = make(name, seed=8)
    graph = ChannelGraph(model, x)
    cost = CostModel(graph, kind)
    measure = count_params if kind == "params" else (lambda m: count_flops(m, x))
    assert cost.cost({}) == measure(model)
    g = torch.Generator().manual_seed(9)
    for trial in range(3):
        copy, _ = make(name, seed=8)
        widths = {grp.name: int(torch.randint(1, grp.size + 1, (1,), generator=g)) for grp in graph.groups}
        ChannelGraph(copy, x).prune({n: torch.randperm(graph.group(n).size, generator=g)[:k]
                                     for n, k in widths.items()})
        assert cost.cost(widths) == measure(copy), (trial, widths)


def test_cost_model_refuses_unknown_groups():
    model, x = make("lenet5")
    with pytest.raises(ValueError, match="not prunable"):
        CostModel(ChannelGraph(model, x)).cost({"classifier": 3})
    with pytest.raises(ValueError, match="kind must be"):
        CostModel(ChannelGraph(model, x), "latency")


@pytest.mark.parametrize("name", ["lenet5", "vgg", "resnet20", "inception", "densenet"])
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_search_cuts_once_and_chooses_what_cutting_every_candidate_chose(name, kind, monkeypatch):
    model, x = make(name, seed=10)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(11)
    utilities = {grp.name: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in graph.groups}
    cuts = []
    real_prune = surgery.prune

    def counting(graph_, keep):
        cuts.append(keep)
        return real_prune(graph_, keep)

    monkeypatch.setattr(surgery, "prune", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cost model must agree with the check cut
        keep = select_channels(graph, utilities, method="budget", budget=0.3, budget_kind=kind)
    assert len(cuts) == 1  # the one check of the final choice
    monkeypatch.setattr(surgery, "prune", real_prune)
    slow = select_channels(graph, utilities, method="budget", budget=0.3, budget_kind=kind, search="cuts")
    assert {n: k.tolist() for n, k in keep.items()} == {n: k.tolist() for n, k in slow.items()}
    trial, _ = make(name, seed=10)
    ChannelGraph(trial, x).prune(keep)
    measure = count_params(trial) if kind == "params" else count_flops(trial, x)
    assert measure <= 0.3 * (count_params(model) if kind == "params" else count_flops(model, x))


@pytest.mark.filterwarnings("ignore:.*cannot be met:RuntimeWarning")
def test_a_wrong_cost_model_falls_back_to_real_cuts(monkeypatch):
    model, x = make("lenet5")
    graph = ChannelGraph(model, x)
    u = {grp.name: torch.linspace(0.1, 1, grp.size, dtype=torch.float64) for grp in graph.groups}
    expected = select_channels(graph, u, method="budget", budget=0.3)
    monkeypatch.setattr(CostModel, "cost", lambda self, widths: 1)  # claims every choice is free
    with pytest.warns(RuntimeWarning, match="cost model predicted"):
        keep = select_channels(graph, u, method="budget", budget=0.3)
    with pytest.raises(ValueError, match="search must be"):
        select_channels(graph, u, method="budget", budget=0.3, search="guess")
    assert {n: k.tolist() for n, k in keep.items()} == {n: k.tolist() for n, k in expected.items()}


@pytest.mark.parametrize("name", ["vgg", "resnet20"])
def test_uniform_allocation_keeps_the_same_share_of_every_group(name):
    model, x = make(name, seed=12)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(13)
    u = {grp.name: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in graph.groups}
    keep = select_channels(graph, u, method="budget", budget=0.3, allocation="uniform")
    shares = [keep[grp.name].numel() / grp.size for grp in graph.groups]
    assert max(shares) - min(shares) <= max(1 / grp.size for grp in graph.groups) + 1e-9  # rounding only
    assert CostModel(graph).cost({n: k.numel() for n, k in keep.items()}) <= 0.3 * count_params(model)
    first = graph.groups[0]  # within a group the highest utilities stay
    assert set(keep[first.name].tolist()) == set(u[first.name].topk(keep[first.name].numel()).indices.tolist())
    with pytest.raises(ValueError, match="allocation must be"):
        select_channels(graph, u, method="budget", budget=0.3, allocation="greedy")
