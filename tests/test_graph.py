"""ChannelGraph: grouping and physical pruning on real architectures.

Exactness is checked to 1e-5 absolute on float32 outputs of order 1: pruning zeroed channels changes only the
summation order inside the remaining convolutions.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpp_ext import io, models
from gpp_ext.cost import count_flops, count_params
from gpp_ext.pruning import ChannelGraph, surgery


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU, twice, then a classifier."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.bn2 = nn.BatchNorm2d(24)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.pw2 = nn.Conv2d(24, 32, 1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn2(self.pw1(F.relu(self.bn1(self.dw1(x))))))
        x = F.relu(self.pw2(F.relu(self.dw2(x))))
        return self.classifier(x.mean((2, 3)))


class DenseChain(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all earlier outputs."""

    def __init__(self, num_classes=4, growth=6):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, growth, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(8 + growth), nn.ReLU(), nn.Conv2d(8 + growth, growth, 3, padding=1))
        self.l3 = nn.Sequential(nn.BatchNorm2d(8 + 2 * growth), nn.ReLU(), nn.Conv2d(8 + 2 * growth, growth, 1))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Linear((8 + 3 * growth) * 4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = torch.cat([x, self.l3(x)], 1)
        return self.classifier(torch.flatten(self.pool(x), 1))


class ChunkNet(nn.Module):
    """Gated halves (GLU-style): the two chunks of one convolution are pruned at the same positions."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.proj = nn.Conv2d(6, 8, 1)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        a, b = self.bn(self.conv(x)).chunk(2, dim=1)
        return self.classifier(self.proj(a * torch.sigmoid(b)).mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 10, 5, padding=2), nn.BatchNorm1d(10), nn.ReLU(), nn.MaxPool1d(2),
                                  nn.Conv1d(10, 14, 3, stride=2, padding=1), nn.BatchNorm1d(14), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(14 * 4, 16), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))


CASES = {  # name: (factory, input shape)
    "lenet5": (lambda: models.build("lenet5"), (1, 28, 28)),
    "vgg": (lambda: models.build("vgg"), (1, 28, 28)),
    "inception": (lambda: models.build("inception"), (1, 28, 28)),
    "resnet20": (lambda: models.build("resnet20"), (3, 32, 32)),
    "depthwise": (DepthwiseSeparable, (3, 16, 16)),
    "densenet": (DenseChain, (1, 12, 12)),
    "chunk": (ChunkNet, (2, 6, 6)),
    "conv1d": (Conv1dNet, (3, 16)),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    factory, shape = CASES[name]
    model = factory()
    # non-trivial BatchNorm statistics and affine parameters, so that a wrong slice shows in the outputs
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval(), torch.randn(4, *shape)


def zero_channels(graph, drop):
    """Zeroes what produces the dropped channels (weights, biases, norm affine, depthwise filters), through the
    public group-parameter API."""
    for name, channels in drop.items():
        graph.scale_channels(name, channels, 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_pruning_zeroed_channels_is_exact(name):
    model, x = make(name)
    graph = ChannelGraph(model, x)
    assert graph.groups, "nothing prunable"
    g = torch.Generator().manual_seed(1)
    keep, drop = {}, {}
    for group in graph.groups:
        perm = torch.randperm(group.size, generator=g)
        k = max(1, group.size // 2)
        keep[group.name], drop[group.name] = perm[:k].sort().values, perm[k:].sort().values
    zero_channels(graph, drop)
    before = model(x)
    graph.prune(keep)
    after = model(x)
    assert after.shape == before.shape
    assert (after - before).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_each_group_zeroed_through_the_api_equals_it_pruned(name):
    """Group by group: silencing channels with `scale_channels(..., 0)` and cutting them give the same outputs."""
    model, x = make(name, seed=4)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(5)
    for group in ChannelGraph(model, x).groups:
        silenced, _ = make(name, seed=4)
        cut, _ = make(name, seed=4)
        drop = torch.randperm(group.size, generator=g)[: group.size // 2]
        keep = torch.tensor([c for c in range(group.size) if c not in set(drop.tolist())])
        ChannelGraph(silenced, x).scale_channels(group.name, drop, 0.0)
        ChannelGraph(cut, x).prune({group.name: keep})
        assert (silenced(x) - cut(x)).abs().max() < 1e-5, group.name
    assert graph.groups


def _tensors(model):
    return {f"{m}.{a}": t for m, mod in model.named_modules()
            for a, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            if t is not None and t.dim() > 0}


@pytest.mark.parametrize("name", list(CASES))
def test_channel_params_say_exactly_what_pruning_removes(name):
    """For every group: the tensors `channel_params` lists are exactly those pruning changes, and each keeps
    the positions `index` says, in order."""
    model, x = make(name, seed=6)
    g = torch.Generator().manual_seed(7)
    for group in ChannelGraph(model, x).groups:
        trial, _ = make(name, seed=6)
        graph = ChannelGraph(trial, x)
        params = graph.channel_params(group.name)
        assert {p.role for p in params} >= {"producer"}
        assert all(p.index.shape[0] == group.size and p.index.dtype == torch.long for p in params)
        before = {k: t.detach().clone() for k, t in _tensors(trial).items()}
        keep = torch.randperm(group.size, generator=g)[: max(1, group.size // 3)].sort().values
        graph.prune({group.name: keep})
        after = _tensors(trial)
        listed = {f"{p.module}.{p.attr}": p for p in params}
        changed = {k for k in before if after[k].shape != before[k].shape}
        assert changed <= set(listed), changed - set(listed)
        for key, p in listed.items():
            removed = torch.ones(group.size, dtype=torch.bool)
            removed[keep] = False
            gone = set(p.index[removed].reshape(-1).tolist())
            kept = torch.tensor([i for i in range(before[key].shape[p.dim]) if i not in gone])
            assert torch.equal(after[key], before[key].index_select(p.dim, kept)), key


def test_channel_params_roles_on_a_small_net():
    model, x = make("depthwise")
    graph = ChannelGraph(model, x)
    params = {(p.module, p.attr): p for p in graph.channel_params("stem")}
    assert params[("stem", "weight")].role == "producer" and params[("stem", "weight")].dim == 0
    assert params[("bn0", "weight")].role == "norm" and params[("bn0", "running_var")].member == "stem"
    assert params[("dw1", "weight")].role == "depthwise"
    assert params[("pw1", "weight")].role == "consumer" and params[("pw1", "weight")].dim == 1
    assert ("stem", "bias") not in params  # stem has no bias
    flat = {(p.module, p.attr): p for p in ChannelGraph(*make("lenet5")).channel_params("conv2")}
    assert flat[("fc1", "weight")].index.shape == (16, 25)  # each channel is a 5x5 block of fc1's inputs
    chunked = {(p.module, p.attr): p for p in ChannelGraph(*make("chunk")).channel_params("conv")}
    assert chunked[("conv", "weight")].index.tolist()[0] == [0, 6]  # both halves of the output, together
    with pytest.raises(KeyError, match="no group"):
        graph.channel_params("nope")
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        graph.scale_channels("stem", [16], 0.0)
    with pytest.raises(ValueError, match="must have shape"):
        graph.scale_channels("stem", torch.ones(3, dtype=torch.bool), 0.0)


def _layers_agree_with_their_widths(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)


@pytest.mark.parametrize("name", list(CASES))
def test_permutation_leaves_outputs_unchanged(name):
    model, x = make(name, seed=2)
    graph = ChannelGraph(model, x)
    before = model(x)
    graph.prune({group.name: torch.randperm(group.size) for group in graph.groups})
    assert (model(x) - before).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_random_half_runs_counts_and_round_trips(name, tmp_path):
    model, x = make(name, seed=3)
    graph = ChannelGraph(model, x)
    params, flops = count_params(model), count_flops(model, x)
    sizes = {group.name: group.size for group in graph.groups}
    graph.prune({n: torch.randperm(s)[: max(1, s // 2)] for n, s in sizes.items()})
    out = model(x)
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert count_params(model) < params and count_flops(model, x) < flops
    if hasattr(model, "spec"):  # the factory builds the same architecture from the pruned widths
        spec = model.spec()
        assert count_params(models.build(spec["name"], **spec["kwargs"])) == count_params(model)
    assert {g.name: g.size for g in graph.groups} == {n: max(1, s // 2) for n, s in sizes.items()}
    # every layer agrees with its new width
    _layers_agree_with_their_widths(model)
    factory = CASES[name][0]
    io.save(model, tmp_path / "m.pt", spec=model.spec() if hasattr(model, "spec") else None)
    back = io.load(tmp_path / "m.pt", factory=None if hasattr(model, "spec") else factory).eval()
    assert torch.equal(back(x), model(x))
    assert count_params(back) == count_params(model)


@pytest.mark.parametrize("name", list(CASES))
def test_widening_keeps_the_function_and_pruning_the_new_channels_undoes_it(name, tmp_path):
    """`widen` appends channels whose outgoing weights are zero: the outputs are the same (1e-5, as for pruning:
    only summation order changes), every layer agrees with its new width, and keeping the old channels gives
    back the original tensors exactly."""
    model, x = make(name, seed=8)
    original = copy.deepcopy(model)
    graph = ChannelGraph(model, x)
    sizes = {group.name: group.size for group in graph.groups}
    add = {n: 1 + i % 3 for i, n in enumerate(sizes)}
    before, params = model(x), count_params(model)
    graph.widen(add, generator=torch.Generator().manual_seed(9))
    assert {g.name: g.size for g in graph.groups} == {n: s + add[n] for n, s in sizes.items()}
    assert count_params(model) > params
    assert (model(x) - before).abs().max() < 1e-5
    new = {n: ChannelGraph(model, x).channel_params(n) for n in sizes}
    for n, entries in new.items():  # the new channels are live: their producer rows are not zero
        rows = [p for p in entries if p.role == "producer" and p.attr == "weight"]
        assert any(p.tensor.index_select(p.dim, p.index[sizes[n]:].reshape(-1)).abs().sum() > 0 for p in rows)
    _layers_agree_with_their_widths(model)
    ChannelGraph(model, x).prune({n: torch.arange(s) for n, s in sizes.items()})
    back, orig = _tensors(model), _tensors(original)
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    if hasattr(model, "spec"):  # a widened built-in model saves and loads as data, like a pruned one
        ChannelGraph(model, x).widen({next(iter(sizes)): 2})
        io.save(model, tmp_path / "m.pt", spec=model.spec())
        assert torch.equal(io.load(tmp_path / "m.pt").eval()(x), model(x))


@pytest.mark.parametrize("name", list(CASES))
def test_reset_channels_revive_silenced_ones_without_changing_the_output(name):
    """A channel silenced by `scale_channels(..., 0)` computes nothing and, its norm's weight and bias zero too,
    gets no gradient; `reset_channels` gives it `widen`'s new-channel values in place: the outputs stay those of
    the silenced model (1e-5, as for pruning), its producer rows are live again, and it learns."""
    model, x = make(name, seed=6)
    graph = ChannelGraph(model, x)
    g = torch.Generator().manual_seed(7)
    drop = {group.name: torch.randperm(group.size, generator=g)[: max(1, group.size // 2)] for group in graph.groups}
    zero_channels(graph, drop)
    silenced = model(x)
    revived = 0
    for n, channels in drop.items():
        graph.reset_channels(n, channels, generator=g)
        for p in graph.channel_params(n):
            rows = p.tensor.index_select(p.dim, p.index[channels].reshape(-1))
            if p.role == "producer" and p.attr == "weight":
                revived += int(rows.abs().sum() > 0)
            if p.role == "consumer":  # what reads a reset channel reads it with weight 0 (until a later group's
                assert rows.abs().sum() == 0  # reset redraws whole rows of the reading layer, read by no one)
    assert revived
    assert (model(x) - silenced).abs().max() < 1e-5
    model.train()
    model(torch.randn_like(x)).square().sum().backward()
    moved = [p for n, channels in drop.items() for p in graph.channel_params(n)
             if p.role == "consumer" and p.is_parameter and p.tensor.grad is not None
             and p.tensor.grad.index_select(p.dim, p.index[channels].reshape(-1)).abs().sum() > 0]
    assert moved  # the reset channels feed gradient to the columns that read them: they train again
    with pytest.raises(ValueError, match="must lie in"):
        graph.reset_channels(graph.groups[0].name, [graph.groups[0].size])


def test_widening_refuses_what_it_cannot_do_and_changes_nothing():
    model, x = make("vgg")
    graph = ChannelGraph(model, x)
    before = {k: t.clone() for k, t in _tensors(model).items()}
    first = graph.groups[0].name
    with pytest.raises(ValueError, match="unknown group"):
        graph.widen({"nope": 2})
    with pytest.raises(ValueError, match=r"must be an int >= 1"):
        graph.widen({first: 0})
    with pytest.raises(ValueError, match=r"must be an int >= 1"):
        graph.widen({first: 1.5})
    with pytest.raises(TypeError, match="must be a dict"):
        graph.widen([first])
    after = _tensors(model)
    assert all(torch.equal(after[k], before[k]) for k in before)

    normed = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="normalised across channels by 1 \\(LayerNorm\\)"):
        ChannelGraph(normed, torch.randn(2, 6)).widen({"0": 1})


def test_lenet_half_matches_a_narrower_lenet():
    model, x = make("lenet5")
    graph = ChannelGraph(model, x)
    assert [g.name for g in graph.groups] == ["conv1", "conv2", "fc1", "fc2"]
    graph.prune({g.name: torch.arange(g.size // 2) for g in graph.groups})
    narrow = models.build("lenet5", conv1=3, conv2=8, fc1=60, fc2=42)
    assert count_params(model) == count_params(narrow)
    assert count_flops(model, x) == count_flops(narrow, x)


def test_groups_of_resnet_couple_the_residual_stream():
    model, x = make("resnet20")
    graph = ChannelGraph(model, x)
    stems = [g for g in graph.groups if len(g.modules) > 1]
    assert len(stems) == 3  # one residual stream per stage
    assert all(len(g.modules) == 4 for g in stems)  # stem or projection + the blocks' second convs
    assert graph.frozen_groups[0].reason == "model output"


def test_inception_branches_are_independent():
    model, x = make("inception")
    graph = ChannelGraph(model, x)
    assert all(len(g.modules) == 1 for g in graph.groups)
    assert len(graph.groups) == 1 + 2 * 7  # stem + seven convs per module (1, 1-3, 1-3-3, pool-1)


def test_flops_of_a_known_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    # conv: 16 outputs x 8 channels x (2 * 27 + 1); linear: 10 x (2 * 128 + 1)
    assert count_flops(model, torch.randn(2, 3, 4, 4)) == 16 * 8 * 55 + 10 * 257
    assert count_params(model) == 8 * 27 + 8 + 10 * 128 + 10


# ------------------------------------------------------------------------------------------------ refusals

class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.odd = Sorter()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.odd(self.conv(x)).mean((2, 3)))


class Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


def test_unknown_op_is_refused_with_a_way_out():
    model = Unknown()
    with pytest.raises(ValueError, match=r"(?s)cannot handle.*sort.*ignore=\["):
        ChannelGraph(model, torch.randn(1, 1, 6, 6))
    graph = ChannelGraph(model, torch.randn(1, 1, 6, 6), ignore=["odd"])
    assert graph.groups == [] and {g.name for g in graph.frozen_groups} == {"conv", "classifier"}


def test_bad_keep_leaves_the_model_unchanged():
    model, x = make("vgg")
    graph = ChannelGraph(model, x)
    state = copy.deepcopy(model.state_dict())
    name = graph.groups[0].name
    size = graph.groups[0].size
    cases = [
        ({name: torch.tensor([], dtype=torch.long)}, ValueError, "zero channels"),
        ({name: torch.tensor([0, size])}, ValueError, r"indices in \[0, "),
        ({name: torch.tensor([1, 1])}, ValueError, "duplicate"),
        ({name: torch.tensor([0.0])}, TypeError, "integer tensor"),
        ({"nope": torch.tensor([0])}, ValueError, "unknown group"),
        ({"classifier": torch.tensor([0])}, ValueError, "cannot be pruned: model output"),
        ([0, 1], TypeError, "must be a dict"),
    ]
    for keep, error, match in cases:
        # a valid entry first: nothing may change before the bad one is found
        full = {graph.groups[1].name: torch.arange(2)} | keep if isinstance(keep, dict) else keep
        with pytest.raises(error, match=match):
            graph.prune(full)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items())


def test_chunk_parts_are_pruned_together():
    model, x = make("chunk")
    graph = ChannelGraph(model, x)
    assert graph.group_of("conv").size == 6  # one group for both halves, pruned at the same positions
    graph.prune({"conv": torch.tensor([0, 4])})
    assert model.conv.out_channels == 4 and model.proj.in_channels == 2 and model.bn.num_features == 4
    assert model(x).shape == (4, 3)


def test_keyword_arguments_repeated_modules_and_tied_weights():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 6, 1)
            self.b = nn.Conv2d(2, 6, 1)
            self.bn = nn.BatchNorm2d(6)
            self.c = nn.Conv2d(6, 5, 1)
            self.d = nn.Conv2d(6, 5, 1)
            self.d.weight = self.c.weight  # tied
            self.classifier = nn.Linear(10, 2)

        def forward(self, x):
            y = torch.add(self.bn(self.a(x)), other=self.bn(self.b(x)))  # keyword operand, BN used twice
            return self.classifier(torch.cat(tensors=[self.c(y), self.d(y)], dim=1).mean((2, 3)))

    model = Net().eval()
    x = torch.randn(3, 2, 4, 4)
    graph = ChannelGraph(model, x)
    frozen = {g.name: g for g in graph.frozen_groups}
    assert frozen["a"].modules == ["a", "b"]  # coupled through the keyword add
    assert "shares parameters" in frozen["a"].reason and "shares parameters" in frozen["c"].reason
    assert graph.groups == []  # tied layers freeze what they read and write

    model.d.weight = nn.Parameter(model.c.weight.detach().clone())  # untie: now a+b is one prunable group
    graph = ChannelGraph(model, x)
    assert [g.modules for g in graph.groups][0] == ["a", "b"]
    before = model(x)
    graph.prune({"a": torch.randperm(6)})  # the BatchNorm used twice is sliced once, consistently
    assert (model(x) - before).abs().max() < 1e-5


def test_a_failed_prune_undoes_everything(monkeypatch):
    model, x = make("resnet20")
    graph = ChannelGraph(model, x)
    state = copy.deepcopy(model.state_dict())
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def broken(m, index, new=None):
        raise RuntimeError("injected failure while slicing a norm")

    monkeypatch.setattr(surgery, "slice_attached", broken)
    for change in (lambda: graph.prune({g.name: torch.arange(g.size // 2) for g in graph.groups}),
                   lambda: graph.widen({g.name: 2 for g in graph.groups})):
        with pytest.raises(RuntimeError, match="injected"):
            change()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert widths == {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        assert model(x).shape == (4, 10)


def test_pass_through_ops_must_keep_channels():
    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.classifier = nn.Linear(6, 2)

        def forward(self, x):
            return self.classifier(F.pad(self.conv(x), (0, 0, 0, 0, 1, 1)).mean((2, 3)))

    with pytest.raises(ValueError, match="changes the channel dimension"):
        ChannelGraph(PadChannels(), torch.randn(1, 1, 5, 5))


def test_non_affine_group_norm_round_trips(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.gn = nn.GroupNorm(8, 8, affine=False)
            self.classifier = nn.Linear(8, 2)

        def forward(self, x):
            return self.classifier(self.gn(self.conv(x)).mean((2, 3)))

    model = Net().eval()
    x = torch.randn(2, 1, 6, 6)
    ChannelGraph(model, x).prune({"conv": torch.tensor([0, 3, 5])})
    assert model.gn.num_groups == model.gn.num_channels == 3
    io.save(model, tmp_path / "gn.pt")
    back = io.load(tmp_path / "gn.pt", factory=Net).eval()
    assert torch.equal(back(x), model(x))


def test_split_and_grouped_conv_are_frozen_not_fatal():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(4, 6, 1)
            self.classifier = nn.Linear(6 + 4, 3)

        def forward(self, x):
            left, right = torch.chunk(self.g(self.a(x)), 2, dim=1)
            return self.classifier(torch.cat([self.b(left), right], 1).mean((2, 3)))

    graph = ChannelGraph(Net(), torch.randn(1, 2, 5, 5))
    assert [g.name for g in graph.groups] == ["b"]
    reasons = {g.name: g.reason for g in graph.frozen_groups}
    assert "grouped convolution" in reasons["a"]


class LinearOnLastAxis(nn.Module):
    """A Linear over the last axis of [N, C, L] (channels stay on dimension 1), concatenated with a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.lin, self.c = nn.Conv1d(2, 8, 1), nn.Linear(4, 4), nn.Conv1d(2, 6, 1)
        self.d, self.classifier = nn.Conv1d(14, 5, 1), nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(self.d(torch.cat([self.lin(self.a(x)), self.c(x)], 1)).mean(2))


def test_a_linear_on_the_last_axis_keeps_the_channel_count_of_dimension_1():
    """Its output was given out_features channels instead of the C it has on dimension 1, so the consumer columns
    of what was concatenated after it were shifted (criteria read the wrong columns; a prune failed)."""
    torch.manual_seed(0)
    model, x = LinearOnLastAxis(), torch.randn(2, 2, 4)
    graph = ChannelGraph(model, x)
    columns = [p.index.flatten().tolist() for p in graph.channel_params("c") if p.role == "consumer"]
    assert columns == [list(range(8, 14))]
    before = model.d.weight.detach().clone()
    graph.prune({"c": torch.tensor([0, 2, 5])})
    assert model.d.weight.shape == (5, 11, 1) and torch.equal(model.d.weight, before[:, [*range(8), 8, 10, 13]])


class FunctionalLinear(nn.Linear):
    """A Linear subclass whose forward fx traces into F.linear (as timm's are)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_the_cost_model_counts_the_flops_of_a_linear_subclass_traced_into_f_linear():
    from gpp_ext import count_flops
    from gpp_ext.pruning import CostModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), FunctionalLinear(4 * 36, 16), nn.ReLU(),
                          FunctionalLinear(16, 10))
    x = torch.zeros(2, 1, 8, 8)
    graph = ChannelGraph(model, x)
    widths = {g.name: max(1, g.size // 2) for g in graph.groups}
    predicted = CostModel(graph, "flops").cost(widths)
    graph.prune({n: torch.arange(w) for n, w in widths.items()})
    assert predicted == count_flops(model, x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated")
def test_reparametrized_layers_are_frozen_with_a_reason_and_the_rest_prunes():
    """A parametrization's weight setter writes into its original in place, so a failed slice could not be undone
    (spectral_norm left the model raising on every forward); such layers keep their channels."""
    from torch.nn.utils import parametrizations, weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(1, 8, 3)), nn.ReLU(),
                          weight_norm(nn.Conv2d(8, 6, 3)), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 16, 3))
    x = torch.randn(2, 1, 10, 10)
    graph = ChannelGraph(model, x)
    frozen = {g.name: g.reason for g in graph.frozen_groups}
    assert "has a parametrization on its weight" in frozen["0"] and "has WeightNorm on its weight" in frozen["2"]
    graph.prune({"4": torch.tensor([0, 2, 4])})
    assert model(x).shape == (2, 3) and model[4].out_channels == 3


class _Scaled(nn.Module):
    """A block with a layer scale and a read-only width property (a container's, not a layer's)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4))

    @property
    def out_channels(self):
        return self.conv.out_channels

    def forward(self, x):
        return x + self.conv(x) * self.gamma.view(1, -1, 1, 1)


def test_a_failed_change_is_undone_even_around_read_only_container_properties(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _Scaled(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.randn(2, 1, 8, 8)
    graph = ChannelGraph(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = ChannelGraph._build, []

    def fail_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(ChannelGraph, "_build", fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        graph.prune({graph.groups[0].name: torch.tensor([0, 1])})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and model(x).shape == (2, 2)


class SpatialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.att, self.classifier = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 1, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.classifier((y * torch.sigmoid(self.att(y))).mean((2, 3)))


def test_a_one_channel_map_broadcast_onto_many_is_refused_widening_up_front():
    """An attention map of one channel multiplies every channel of another tensor: given more channels it would
    no longer broadcast (before: a ShapeProp error from deep inside the re-trace)."""
    from gpp_ext.planting import plantable_groups

    model, x = SpatialAttention(), torch.randn(2, 1, 8, 8)
    graph = ChannelGraph(model, x)
    with pytest.raises(ValueError, match=r"group 'att' is one channel broadcast onto a wider tensor"):
        graph.widen({"att": 2})
    graph.widen({"conv": 2})   # the channels it is broadcast onto may grow
    assert model(x).shape == (2, 3) and "att" not in plantable_groups(model, x)


class SpatialSplit(nn.Module):
    """Splits that cut space, not channels: chunk on the height, sizes on the width, unbind of a time axis, and a
    channels-last split of the tokens; each part still carries the producer's channels."""

    def __init__(self, how):
        super().__init__()
        self.how, self.conv, self.bn = how, nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.lin = nn.Linear(6, 5)
        self.classifier = nn.Linear(6 if how != "tokens" else 5, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))                      # [N, 6, 4, 4]
        if self.how == "chunk":
            top, bottom = y.chunk(2, dim=2)
            z = torch.cat([top * 2, bottom], 2)
        elif self.how == "split":
            left, right = torch.split(y, [1, 3], dim=-1)
            z = left.mean(3, keepdim=True) + right
        elif self.how == "unbind":
            rows = torch.unbind(y, dim=3)                          # 4 x [N, 6, 4]
            z = rows[0] + rows[3]
        else:                                                      # channels last: [N, 4, 4, 6] split on rows
            first, rest = y.permute(0, 2, 3, 1).split([1, 3], dim=1)
            z = self.lin(first + rest.mean(1, keepdim=True))       # [N, 1, 4, 5]
            return self.classifier(z.permute(0, 3, 1, 2).mean((2, 3)))
        return self.classifier(z.mean((2,) if self.how == "unbind" else (2, 3)))


@pytest.mark.parametrize("how", ["chunk", "split", "unbind", "tokens"])
def test_a_split_along_space_keeps_the_producer_prunable(how):
    """Each part carries every channel: the producer stays one group, pruned in every part alike (it was frozen as
    a split 'into fixed-size parts')."""
    torch.manual_seed(0)
    model, x = SpatialSplit(how).eval(), torch.randn(3, 2, 4, 4)
    graph = ChannelGraph(model, x)
    assert "conv" in [g.name for g in graph.groups] and graph.group_of("conv").size == 6, graph.frozen_groups
    keep = torch.tensor([0, 2, 5])
    reference = copy.deepcopy(model)
    for m in (reference.conv, reference.bn):   # the reference zeroes the removed channels instead
        dropped = torch.ones(6, dtype=torch.bool)
        dropped[keep] = False
        with torch.no_grad():
            m.weight[dropped] = 0
            m.bias[dropped] = 0
    reference.bn.running_mean[dropped] = 0
    graph.prune({"conv": keep})
    assert model.conv.out_channels == 3
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
