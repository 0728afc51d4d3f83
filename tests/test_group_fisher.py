"""Group Fisher (Liu et al., ICML 2021): the mask gradient is the true derivative of the loss with respect to a
channel's mask (checked by finite differences on a plain CNN, a BatchNorm CNN and a residual network whose
coupled groups share one mask), the importance is its square accumulated over batches per unit of cost saved,
and the criterion prunes from the API and the command line."""

import copy
import math
import json
import subprocess
import sys

import pytest
import torch

from gpp_ext import data, models, prune
from gpp_ext.pruning import ChannelGraph, CostModel, criteria
from gpp_ext.pruning.group_fisher import mask_fisher, mask_gradients
from gpp_ext.training import fit


def _batch(shape, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loss_with_mask(model, example, name, channel, factor, x, y):
    """The loss with channel `channel` of group `name` multiplied by `factor` where consumers read it: the
    group's norm weights and biases (or, with no norm, its producers' weights and biases)."""
    trial = copy.deepcopy(model).eval()
    graph = ChannelGraph(trial, example)
    params = [p for p in graph.channel_params(name) if p.role != "consumer" and not p.attr.startswith("running_")]
    norms = [p for p in params if p.role == "norm"]
    for p in norms or [p for p in params if p.role == "producer"]:
        with torch.no_grad():
            positions = p.index[channel]
            p.tensor.index_copy_(p.dim, positions, p.tensor.index_select(p.dim, positions) * factor)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(trial(x).double(), y))


@pytest.mark.parametrize("name, kwargs, shape", [
    ("lenet5", {"input_size": 12}, (1, 12, 12)),
    ("vgg", {}, (1, 16, 16)),
    ("resnet20", {"widths": (8, 16, 16)}, (1, 12, 12)),
])
def test_mask_gradient_is_the_derivative_of_the_loss(name, kwargs, shape):
    torch.manual_seed(0)
    model = models.build(name, in_channels=1, num_classes=10, **kwargs).double().eval()
    x, y = _batch(shape)
    x = x.double()
    example = torch.zeros(2, *shape, dtype=torch.float64)
    graph = ChannelGraph(model, example)
    grads = next(iter(mask_gradients(graph, [(x, y)])))
    eps = 1e-5
    checked = 0
    for group in graph.groups:
        for channel in (0, group.size - 1):
            fd = (_loss_with_mask(model, example, group.name, channel, 1 + eps, x, y)
                  - _loss_with_mask(model, example, group.name, channel, 1 - eps, x, y)) / (2 * eps)
            # float64 central differences: truncation ~eps^2, rounding ~1e-16/eps; 1e-6 absolute is ample
            assert grads[group.name].sum(0)[channel] == pytest.approx(fd, rel=1e-4, abs=1e-6), (group.name, channel)
            # a sample's part: the derivative of its own loss, over the batch size (the loss is the batch mean)
            one = (_loss_with_mask(model, example, group.name, channel, 1 + eps, x[:1], y[:1])
                   - _loss_with_mask(model, example, group.name, channel, 1 - eps, x[:1], y[:1])) / (2 * eps)
            assert len(x) * grads[group.name][0, channel] == pytest.approx(one, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 4


def test_fisher_sums_squared_per_sample_gradients_and_is_divided_by_the_cost_saved():
    torch.manual_seed(0)
    model = models.build("vgg", in_channels=1, num_classes=10).eval()
    example = torch.zeros(2, 1, 16, 16)
    graph = ChannelGraph(model, example)
    batches = [_batch((1, 16, 16), seed=s) for s in range(3)]
    per_batch = list(mask_gradients(graph, batches))
    fisher = mask_fisher(graph, batches)
    for group in graph.groups:
        expected = sum(g[group.name].square().sum(0) for g in per_batch)   # squared per sample, then summed
        assert torch.allclose(fisher[group.name], expected, rtol=1e-12, atol=0)
    context = criteria.CriterionContext(loader=batches, cost_kind="flops")
    scores = criteria.get("group_fisher")(graph, context)
    costs = CostModel(graph, "flops")
    for group in graph.groups:
        saved = costs.cost({}) - costs.cost({group.name: group.size - 1})
        assert torch.allclose(scores[group.name], fisher[group.name] / saved, rtol=1e-12, atol=0)
    params = criteria.get("group_fisher")(graph, criteria.CriterionContext(loader=batches, cost_kind="params"))
    assert not torch.allclose(params[graph.groups[0].name], scores[graph.groups[0].name], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no batches"):
        mask_fisher(graph, [])


def test_silencing_the_lowest_fisher_channels_costs_less_loss_than_the_highest():
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = fit(models.build("lenet5", input_size=8), splits.train, 4, lr=4e-3, seed=0).eval()
    batches = list(torch.utils.data.DataLoader(splits.train, batch_size=256))
    graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    fisher = mask_fisher(graph, batches)

    def loss_without(name, channels):
        trial = copy.deepcopy(model)
        ChannelGraph(trial, torch.zeros(2, 1, 8, 8)).scale_channels(name, channels, 0.0)
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(trial(x), y, reduction="sum")) for x, y in batches)

    for group in graph.groups:
        order = torch.argsort(fisher[group.name])
        k = max(1, group.size // 4)
        assert loss_without(group.name, order[:k]) < loss_without(group.name, order[-k:]), group.name


def test_group_fisher_prunes_to_a_budget_from_the_api():
    splits = data.load_dataset("digits", seed=0)
    model = models.build("vgg", in_channels=1, num_classes=10)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64)
    for kind in ("flops", "params"):
        pruned, report = prune(model, loader, torch.zeros(2, 1, 8, 8), criterion="group_fisher", budget=0.4,
                               budget_kind=kind, allocation="global", normalize="none", max_batches=4,
                               progress=False)
        before, after = report.to_dict()[kind]
        assert after <= 0.4 * before and report.criterion == "group_fisher"


def test_gpp_compress_runs_with_the_group_fisher_criterion(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--model", "lenet5", "--data", "digits",
                          "--epochs", "1", "--criterion", "group_fisher", "--target-params", "0.5", "--quiet",
                          "--threads", "1", "--no-onnx-latency", "--out", str(tmp_path / "gf")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "gf" / "report.json").read_text())
    assert report["config"]["criterion"] == "group_fisher" and report["target_reached"]


def test_fisher_removal_removes_while_training_until_the_budget_and_the_cut_changes_nothing():
    from gpp_ext.pruning.group_fisher import FisherRemoval

    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("vgg", in_channels=1, num_classes=10)
    example = torch.zeros(2, 1, 8, 8)
    removal = FisherRemoval(model, example, budget=0.3, budget_kind="flops", removals=4, share=0.5,
                            floor=0.1).attach()
    fit(model, splits.train, 1, lr=4e-3, seed=0, after_step=removal.step)
    keep = removal.finish()
    shares = [h["cost_share"] for h in removal.history]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True) and shares[-1] <= 0.3
    assert all(h["removed"] > 0 for h in removal.history)
    for group in removal.graph.groups:  # the floor holds
        assert removal.widths()[group.name] >= max(1, math.ceil(0.1 * group.size))
    model.eval()
    x = torch.stack([splits.val[i][0] for i in range(32)])
    with torch.no_grad():
        before = model(x)
    graph = ChannelGraph(model, example)
    flops = CostModel(graph, "flops").cost({})
    graph.prune(keep)
    with torch.no_grad():
        after = model(x)
    # the removed channels were silenced after every step: the cut removes zeros (float32 sums reordered)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    from gpp_ext import count_flops

    assert count_flops(model, example) <= 0.3 * flops * 1.0001
    # by default a removal every `interval` steps of the removal window (a few channels each), as the paper
    # removes channels every few iterations
    torch.manual_seed(0)
    model = models.build("vgg", in_channels=1, num_classes=10)
    steps = []
    removal = FisherRemoval(model, example, budget=0.3, budget_kind="flops", share=0.5, interval=2).attach()
    fit(model, splits.train, 2, lr=4e-3, seed=0, batch_size=64,
        after_step=lambda step, total: (removal.step(step, total), steps.append(total)))
    removal.finish()
    assert removal.removals == int(0.5 * steps[0]) // 2 > 4 and len(removal.history) == removal.removals
    assert removal.history[-1]["cost_share"] <= 0.3


def test_fisher_removal_keeps_no_activation_alive_after_its_step():
    """The gradient hook must not close over the output it hooks: that is a cycle through autograd the collector
    cannot free, and every step's activations and graphs stayed alive (a VGG-BN epoch grew to 23 GB)."""
    import gc
    import weakref

    from gpp_ext.pruning.group_fisher import FisherRemoval

    torch.manual_seed(0)
    model = models.build("vgg", in_channels=1, num_classes=10)
    x, y = _batch((1, 8, 8), n=8)
    removal = FisherRemoval(model, torch.zeros(2, 1, 8, 8), budget=0.5, budget_kind="params").attach()
    seen = []
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(weakref.ref(out)))
    for step in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        removal.step(step, 100)
    handle.remove()
    gc.collect()
    assert len(seen) == 3 and all(ref() is None for ref in seen)
    assert any(bool(f.any()) for f in removal.fisher.values())   # and the hook still accumulated


def test_the_group_fisher_recipe_runs_from_the_command_line_and_needs_push_epochs(tmp_path):
    from gpp_ext import recipes

    with pytest.raises(ValueError, match="needs push epochs"):
        recipes.build("group-fisher", push_epochs=0)
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--recipe", "group-fisher", "--model",
                          "lenet5", "--data", "digits", "--epochs", "1", "--push-epochs", "0.5", "--finetune-epochs",
                          "0.5", "--target-params", "0.4", "--quiet", "--threads", "1", "--no-onnx-latency",
                          "--out", str(tmp_path / "gfr")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "gfr" / "report.json").read_text())
    assert report["config"]["push"] == "group_fisher" and report["target_reached"]
    first = report["iterations"][0]
    # the cut removed only silenced channels: accuracy right after it is the push's
    assert first["val_accuracy_after_prune"] == pytest.approx(first["val_accuracy_end_of_push"], abs=1e-9)


class _Block(torch.nn.Module):
    """conv -> BatchNorm -> activation -> conv -> pool -> linear; `hidden` adds 1 to the BatchNorm's output in
    place through a detached view, which the trace cannot show."""

    def __init__(self, act, hidden=False):
        super().__init__()
        self.conv, self.bn, self.act = torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), act
        self.conv2, self.fc, self.hidden = torch.nn.Conv2d(6, 4, 3), torch.nn.Linear(4, 10), hidden

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.hidden:
            y.detach().add_(1.0)
        return self.fc(self.conv2(self.act(y)).mean((2, 3)))


def test_an_in_place_activation_after_a_masked_output_does_not_change_the_fisher():
    """The activation overwrites the norm's output the Fisher multiplies by its gradient: a copy is kept."""
    from gpp_ext.pruning.group_fisher import FisherRemoval

    x, y = _batch((1, 8, 8))
    example = torch.zeros(2, 1, 8, 8)
    scores = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = _Block(torch.nn.Hardswish(inplace=inplace))
        graph = ChannelGraph(model, example)
        fisher = mask_fisher(graph, [(x, y)])
        removal = FisherRemoval(model, example, budget=0.5, removals=1).attach()
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        removal.step(0, 10)   # accumulates, removes nothing yet
        scores.append((fisher, {n: f.clone() for n, f in removal.fisher.items()}))
    for a, b in zip(*scores):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    torch.manual_seed(0)
    hidden = _Block(torch.nn.ReLU(), hidden=True)
    with pytest.raises(RuntimeError, match="'bn' was changed in place"):
        mask_fisher(ChannelGraph(hidden, example), [(x, y)])


class _Augmented(torch.nn.Module):
    """conv -> 1 added (out of place, or as `y += 1`) -> ReLU -> conv -> pool -> linear, without a norm: Taylor
    and the Fisher both read the first conv's output."""

    def __init__(self, augmented):
        super().__init__()
        self.conv, self.conv2, self.fc, self.augmented = (torch.nn.Conv2d(1, 6, 3), torch.nn.Conv2d(6, 4, 3),
                                                           torch.nn.Linear(4, 10), augmented)

    def forward(self, x):
        y = self.conv(x)
        if self.augmented:
            y += 1.0
        else:
            y = y + 1.0
        return self.fc(self.conv2(torch.relu(y)).mean((2, 3)))


@pytest.mark.parametrize("score", ["fisher", "taylor"])
def test_an_augmented_assignment_after_a_tapped_output_scores_as_its_out_of_place_form(score):
    """`y += 1` after a tapped layer (a residual block's `out += identity`) is traced as `y + 1`: the tap copies
    the output there, so the scores are those of `y = y + 1` instead of an error."""
    from gpp_ext.pruning.criteria import CriterionContext

    x, y = _batch((1, 8, 8))
    example = torch.zeros(2, 1, 8, 8)
    scores = []
    for augmented in (False, True):
        torch.manual_seed(0)
        graph = ChannelGraph(_Augmented(augmented), example)
        if score == "fisher":
            scores.append(mask_fisher(graph, [(x, y)]))
        else:
            scores.append(criteria.taylor(graph, CriterionContext(loader=[(x, y)])))
    assert scores[0] and scores[0].keys() == scores[1].keys()
    assert all(torch.equal(scores[0][k], scores[1][k]) for k in scores[0])


class _Concat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Conv2d(1, 2, 3, padding=1)
        self.bn, self.fc = torch.nn.BatchNorm2d(5), torch.nn.Linear(5, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


def test_a_norm_over_a_concatenation_masks_each_channel_once():
    """Both branches feed the norm: the mask sits after it only, and the mask gradient is the loss's derivative."""
    from gpp_ext.pruning.group_fisher import _masked_outputs

    torch.manual_seed(0)
    model = _Concat().double().eval()
    example = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    graph = ChannelGraph(model, example)
    assert set(_masked_outputs(graph)) == {"bn"}
    x, y = _batch((1, 6, 6))
    x = x.double()
    grads = next(iter(mask_gradients(graph, [(x, y)])))
    assert {g.name for g in graph.groups} == {"a", "b"}   # each branch's channels, normalised by one norm
    for group in graph.groups:
        for channel in range(group.size):
            eps = 1e-5
            fd = (_loss_with_mask(model, example, group.name, channel, 1 + eps, x, y)
                  - _loss_with_mask(model, example, group.name, channel, 1 - eps, x, y)) / (2 * eps)
            assert grads[group.name].sum(0)[channel] == pytest.approx(fd, rel=1e-4, abs=1e-6), (group.name, channel)


def test_removals_due_at_once_are_one_removal_on_the_gathered_fisher():
    """A step that passes several removal goals removes to the last one on the Fisher gathered so far, not a
    removal per goal on accumulators the first one restarted (which would rank by zeros, in index order)."""
    from gpp_ext.pruning.group_fisher import FisherRemoval

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    removal = FisherRemoval(model, torch.zeros(2, 8), budget=0.3, budget_kind="params", removals=4).attach()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    fisher = {n: g.square().sum(0) for n, g in removal._grads.items()}
    removal.step(1, 2)   # share 0.5 of 2 steps: all 4 removals are due after step 1
    assert len(removal.history) == 1 and removal.history[0]["goal"] == pytest.approx(0.3)
    for name, gone in removal.removed.items():
        if gone.any() and (~gone).any():  # within a group, what goes scores no higher than what stays
            assert float(fisher[name][gone].max()) <= float(fisher[name][~gone].min()), name
    removal.finish()
    with pytest.raises(ValueError, match="min_channels must be an int >= 1"):
        FisherRemoval(model, torch.zeros(2, 8), budget=0.3, min_channels=0)
