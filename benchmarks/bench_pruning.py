"""Pruning benchmarks: the budget search of `select_channels` with the cost model (`cost_model`) against the
search it replaced, which cuts a copy of the model for every candidate threshold (`reference`:
`search="cuts"`), on the same graph and utilities; one whole `gpp_ext.prune` call per model (criteria `l1`
and `lda`) for its wall time; and, when torchvision is installed, `prune` on ResNet-50 and MobileNetV2 with its
phases (graph, analysis, solve, trace, selection, cut, recalibration) beside Torch-Pruning's magnitude step and
one forward pass of the analysis data.

Rows share a group per model and budget so pytest-benchmark prints them side by side, and each checks that
its choice meets the budget (the two searches must choose the same channels) before it is timed.
"""

import functools
import os

import pytest
import torch

import gpp_ext
from gpp_ext import models
from gpp_ext.pruning import ChannelGraph, CostModel, select_channels

FULL = os.environ.get("GPP_EXT_BENCH", "full") == "full"  # validated in conftest.py
ROUNDS = 5 if FULL else 1
MODELS = {"resnet20": (3, 32, 32), "vgg": (1, 28, 28)} if FULL else {"lenet5": (1, 28, 28)}


@functools.lru_cache(maxsize=4)
def case(name):
    torch.manual_seed(0)
    model = models.build(name).eval()
    x = torch.randn(2, *MODELS[name])
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(1)
    utilities = {grp.name: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in graph.groups}
    return model, x, graph, utilities


@pytest.mark.parametrize("impl", ["cost_model", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_budget_search(benchmark, impl, name):
    model, x, graph, utilities = case(name)
    benchmark.group = f"select_channels[cpu] {name} budget=0.3"
    search = "cost_model" if impl == "cost_model" else "cuts"
    keep = benchmark.pedantic(lambda: select_channels(graph, utilities, method="budget", budget=0.3, search=search),
                              rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)
    assert CostModel(graph).cost({n: k.numel() for n, k in keep.items()}) <= 0.3 * gpp_ext.count_params(model)
    other = select_channels(graph, utilities, method="budget", budget=0.3,
                            search="cuts" if impl == "cost_model" else "cost_model")
    assert {n: k.tolist() for n, k in keep.items()} == {n: k.tolist() for n, k in other.items()}


@pytest.mark.parametrize("impl", ["l1", "lda"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_call(benchmark, impl, name):
    model, x, _, _ = case(name)
    benchmark.group = f"prune[cpu] {name} budget=0.3"
    torch.manual_seed(2)
    data = torch.randn(512 if FULL else 64, *MODELS[name])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.arange(len(data)) % 10),
                                         batch_size=128)
    small, report = benchmark.pedantic(
        lambda: gpp_ext.prune(model, loader, x, criterion=impl, method="budget", budget=0.3, progress=False),
        rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)
    assert report.params[1] <= 0.3 * report.params[0] and small(x).shape == (2, 10)


# ------------------------------------------------------------------------ large models against Torch-Pruning

ZOO = ("resnet50", "mobilenet_v2") if FULL else ("resnet18",)
ZOO_IMPLS = ["lda", "l1", "torch_pruning", "forward"]


@functools.lru_cache(maxsize=1)
def zoo_case(name):
    """A torchvision model with random weights and its analysis data: 64 images of 64x64 (the issue's case)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    data = torch.randn(64 if FULL else 16, 3, 64, 64)
    return model, [(data, torch.arange(len(data)) % 10)], data[:1]


@pytest.mark.parametrize("impl", ZOO_IMPLS)
@pytest.mark.parametrize("name", ZOO)
def test_prune_large_model(benchmark, impl, name):
    """One `prune` call on a torchvision model (half the parameters), its phases in `extra_info["seconds"]`,
    beside Torch-Pruning's magnitude step on the same model and one forward pass of the analysis data."""
    model, loader, example = zoo_case(name)
    benchmark.group = f"prune[cpu] {name} 64x64x64"
    rounds = dict(rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)
    if impl == "forward":
        with torch.no_grad():
            out = benchmark.pedantic(lambda: model(loader[0][0]), **rounds)
        assert out.shape == (len(loader[0][0]), 10)
        return
    if impl == "torch_pruning":
        tp = pytest.importorskip("torch_pruning")
        import copy

        def step():
            m = copy.deepcopy(model)
            head = m.fc if hasattr(m, "fc") else m.classifier[-1]
            pruner = tp.pruner.MagnitudePruner(m, example, tp.importance.MagnitudeImportance(p=2),
                                               pruning_ratio=0.3, ignored_layers=[head])
            pruner.step()
            return m
        small = benchmark.pedantic(step, **rounds)
        assert gpp_ext.count_params(small) < 0.7 * gpp_ext.count_params(model)
        return
    small, report = benchmark.pedantic(
        lambda: gpp_ext.prune(model, loader, example, criterion=impl, method="budget", budget=0.5, progress=False),
        **rounds)
    benchmark.extra_info["seconds"] = {k: round(v, 4) for k, v in report.seconds.items()}
    assert report.params[1] <= 0.51 * report.params[0] and small(example).shape == (1, 10)
