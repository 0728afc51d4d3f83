"""Hierarchical group-sparse regularisation and loss-increase selection (Mitsuno & Kurita 2020): the penalty is
the nested group lasso written out by hand, it shrinks channels when trained with, the loss-increase scores are
the losses of silenced copies and leave the model as it was, and the recipe runs from the command line."""

import copy
import warnings

import pytest
import torch

from gpp_ext import data, models, recipes
from gpp_ext.pruning import ChannelGraph, criteria, hgs
from gpp_ext.pruning.hgs import hierarchical_penalty
from gpp_ext.training import fit


def _lenet():
    torch.manual_seed(0)
    return models.build("lenet5", input_size=8)


def test_penalty_is_the_nested_group_lasso_written_out():
    model = _lenet()
    graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    lam = 0.01
    value = float(hierarchical_penalty(graph, lam)(model).detach())
    expected = 0.0
    for group in graph.groups:
        params = graph.channel_params(group.name)
        producers = [p for p in params if p.role != "consumer" and not p.attr.startswith("running_")]
        consumers = [p for p in params if p.role == "consumer"]
        for c in range(group.size):
            neuron, filters, column = 0.0, 0.0, 0.0
            for p in producers:
                rows = p.tensor.detach().movedim(p.dim, 0)[p.index[c]]
                neuron += float(rows.square().sum())
                if p.role == "producer" and rows.dim() > 2:  # a convolution's filters, one per input channel
                    filters += float(rows.flatten(2).norm(dim=2).sum())
            for p in consumers:
                column += float(p.tensor.detach().movedim(p.dim, 0)[p.index[c]].square().sum())
            expected += neuron ** 0.5 + filters + column ** 0.5
    assert value == pytest.approx(lam * expected, rel=1e-5)


def test_training_with_the_penalty_shrinks_channels_toward_zero():
    splits = data.load_dataset("digits", seed=0)
    norms = {}
    for lam in (0.0, 3e-3):
        model = _lenet()
        graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
        fit(model, splits.train, 2, lr=4e-3, seed=0, weight_decay=0.0, penalty=hierarchical_penalty(graph, lam))
        norms[lam] = float(hierarchical_penalty(graph, 1.0)(model).detach())
    assert norms[3e-3] < 0.8 * norms[0.0]


def test_loss_increase_scores_are_the_losses_of_silenced_copies_and_change_nothing():
    splits = data.load_dataset("digits", seed=0)
    model = fit(_lenet(), splits.train, 2, lr=4e-3, seed=0).eval()
    before = copy.deepcopy(model.state_dict())
    loader = list(torch.utils.data.DataLoader(splits.train, batch_size=600))
    graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    context = criteria.CriterionContext(loader=loader, seed=3)
    scores = criteria.get("loss_increase")(graph, context)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
    # recompute one channel's score on the same samples by hand
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))[:512]
    group = graph.groups[0]
    trial = copy.deepcopy(model)
    ChannelGraph(trial, torch.zeros(2, 1, 8, 8)).scale_channels(group.name, [1], 0.0)
    with torch.no_grad():
        f = torch.nn.functional.cross_entropy
        rise = float(f(trial(x[pick]), y[pick])) - float(f(model(x[pick]), y[pick]))
    assert float(scores[group.name][1]) == pytest.approx(max(rise, 0.0), abs=1e-5)
    assert all((s >= 0).all() for s in scores.values()) and any((s > 0).any() for s in scores.values())


class _AddsInPlace(torch.nn.Module):
    """A residual branch added in place to a tensor computed before the group's layers (`x.add_(branch)`)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv0, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        y = x.add_(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("build", [
    lambda: models.build("vgg", widths=(8, 8, "M", 16, "M"), hidden=32),
    lambda: models.build("resnet20", in_channels=1, widths=(8, 16, 16)),
    lambda: models.build("inception", stem=8, stages=(((4, 4, 6, 2, 3, 2),), ((8, 8, 12, 4, 6, 4),))),
    _AddsInPlace], ids=["vgg", "resnet20", "inception", "adds-in-place"])
def test_loss_increase_reruns_only_the_layers_after_a_group_and_scores_as_whole_passes_do(build, monkeypatch):
    torch.manual_seed(0)
    model = build().eval()
    x, y = torch.randn(40, 1, 16, 16), torch.randint(0, 10, (40,))
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so silencing a channel moves the loss
        model.train()
        model(x * 2 + 0.5)
        model.eval()
    graph = ChannelGraph(model, torch.zeros(2, 1, 16, 16))
    context = criteria.CriterionContext(loader=[(x, y)], seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shortcut agrees with the whole pass in every group
        fast = criteria.get("loss_increase")(graph, context)
    shortcut, calls = hgs._Suffix, []

    class Whole(hgs._Suffix):  # every channel scored by whole passes, as before the shortcut
        def __init__(self, *args):
            super().__init__(*args)
            self.complete = False

        def summed(self, *args):
            calls.append(args)
            return 0.0

    monkeypatch.setattr(hgs, "_Suffix", Whole)
    whole = criteria.get("loss_increase")(graph, context)
    assert not calls and set(fast) == set(whole) == {g.name for g in graph.groups}
    for group in graph.groups:
        assert torch.allclose(fast[group.name], whole[group.name], rtol=1e-5, atol=1e-7), group.name
    assert sum(bool((s > 0).any()) for s in fast.values()) >= len(fast) / 2  # not a comparison of zeros
    # every group has a rerun, and the last group's is shorter than the first's
    suffixes = [shortcut(graph, {f"{p.module}.{p.attr}" for p in graph.channel_params(g.name)
                                 if p.role != "consumer"}) for g in graph.groups]
    assert all(s.complete for s in suffixes) and len(suffixes[-1].nodes) < len(suffixes[0].nodes)


def test_a_channel_silenced_for_a_measurement_that_fails_is_restored():
    model = _lenet()
    before = copy.deepcopy(model.state_dict())
    graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    group = graph.groups[1].name
    params = [p for p in graph.channel_params(group) if p.role != "consumer" and not p.attr.startswith("running_")]

    def fails():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hgs._silenced(graph, group, params, [p.tensor.detach().clone() for p in params], 2, fails)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_hgs_recipe_runs_from_the_command_line(compress_cli):
    assert recipes.build("hgs").criterion == "loss_increase"
    with pytest.raises(ValueError, match="sparsity"):
        recipes.build("hgs", sparsity=-1.0)
    out, report, _ = compress_cli("hgs", "--recipe", "hgs", "--model", "lenet5", "--epochs", "1", "--push-epochs",
                                  "0.5", "--finetune-epochs", "0.5", "--sparsity", "1e-3", "--target-params", "0.4")
    assert out.returncode == 0, out.stderr
    assert report["config"]["push"] == "hgs" and report["config"]["sparsity"] == 1e-3 and report["target_reached"]


def test_the_push_trains_its_penalty_with_its_own_optimiser(monkeypatch):
    """Under AdamW a group-lasso gradient is rescaled per coordinate; `push_optimizer`/`push_lr` let the push train
    it as the paper does (SGD), while every other phase keeps the loop's optimiser."""
    from gpp_ext import pushes, training
    from gpp_ext.loop import LoopConfig

    splits = data.load_dataset("digits", seed=0)
    seen = []

    def spy(model, dataset, epochs, **kwargs):
        seen.append((kwargs["optimizer"], kwargs["lr"], kwargs.get("penalty") is not None))
        return model

    monkeypatch.setattr(training, "fit", spy)
    for own, expected in ((dict(), ("adamw", 4e-3, True)), (dict(push_optimizer="sgd", push_lr=0.01),
                                                             ("sgd", 0.01, True))):
        config = recipes.build("hgs", **own)
        context = pushes.PushContext(_lenet(), splits, config, 0, "cpu", 1.0, 0.5, None,
                                     fit_kwargs=dict(lr=config.lr, optimizer=config.optimizer))
        pushes.get("hgs")(context)
        assert seen[-1] == expected
    with pytest.raises(ValueError, match="push_optimizer"):
        LoopConfig(push_optimizer="adam").validate()
