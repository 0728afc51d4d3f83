"""Deconvolution tracing of utility, the criteria and their registry, channel selection and the one-call prune."""

import pytest
import torch
import torch.nn as nn

import gpp_ext
from gpp_ext import models
from gpp_ext.pruning import ChannelGraph, CriterionContext, criteria, trace_utility
from gpp_ext.testing import digits


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)
        self.relu2 = nn.ReLU()
        self.classifier = nn.Linear(2, 3)

    def forward(self, x):
        return self.classifier(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def test_trace_equals_a_hand_computation():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    with torch.no_grad():
        net.fc1.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0.5]]))
        net.fc1.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        net.fc2.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 2.0]]))
        net.fc2.bias.zero_()
    x = torch.randn(16, 3)
    graph = ChannelGraph(net, x)
    u = trace_utility(graph, x, torch.tensor([1]))  # keep pre-decision neuron 1 only
    # by hand: z1 = fc1(x), h1 = relu(z1), h2 = relu(fc2(h1)); signal s2 = h2 * [0, 1]
    z1 = x @ net.fc1.weight.T + net.fc1.bias
    h2 = torch.relu(torch.relu(z1) @ net.fc2.weight.T)
    s2 = h2 * torch.tensor([0.0, 1.0])
    s1 = torch.relu(s2 @ net.fc2.weight) * (z1 > 0)  # back through fc2, rectified with the forward mask
    assert torch.allclose(u["fc2"], s2.mean(0).abs().double(), atol=1e-6)
    assert torch.allclose(u["fc1"], s1.mean(0).abs().double(), atol=1e-6)
    deconvnet = trace_utility(graph, x, torch.tensor([1]), rectify="deconvnet")
    assert torch.allclose(deconvnet["fc1"], torch.relu(s2 @ net.fc2.weight).mean(0).abs().double(), atol=1e-6)


def test_trace_reaches_every_group_of_real_architectures():
    for name, shape in (("vgg", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("inception", (1, 28, 28))):
        model = models.build(name).eval()
        graph = ChannelGraph(model, torch.randn(2, *shape))
        width = model.classifier.in_features
        u = trace_utility(graph, torch.randn(6, *shape), torch.ones(width))
        assert set(u) == {g.name for g in graph.groups}
        assert all(v.shape == (graph.group(n).size,) and torch.isfinite(v).all() for n, v in u.items())
        assert all(v.sum() > 0 for v in u.values()), name  # the signal gets everywhere


def test_trace_batchnorm_shortcut_equals_its_vjp(monkeypatch):
    """An eval-mode BatchNorm is traced by its per-channel scale; the generic transpose (autograd's VJP of the
    layer at the recorded input) gives the same, to float32 rounding."""
    from gpp_ext.pruning import trace

    torch.manual_seed(0)
    model = models.build("vgg")
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(-1.5, 1.5)
    model.eval()
    x = torch.randn(6, 1, 28, 28)
    graph = ChannelGraph(model, x[:2])
    fast = trace_utility(graph, x, torch.ones(model.classifier.in_features))
    monkeypatch.setattr(trace, "BATCH_NORMS", ())
    generic = trace_utility(graph, x, torch.ones(model.classifier.in_features))
    assert fast.keys() == generic.keys()
    for name in fast:
        assert torch.allclose(fast[name], generic[name], rtol=1e-5, atol=1e-6 * float(generic[name].abs().max()))


def test_trace_goes_through_chunks_and_repeated_inputs():
    from test_graph import ChunkNet

    torch.manual_seed(0)
    model = ChunkNet().eval()
    graph = ChannelGraph(model, torch.randn(2, 2, 6, 6))
    u = trace_utility(graph, torch.randn(5, 2, 6, 6), torch.ones(8))
    assert u["conv"].shape == (6,) and (u["conv"] > 0).all()  # both halves' signals, folded onto one group
    assert criteria.l1(graph)["conv"].shape == (6,)
    batch = [(torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1]))]
    assert criteria.taylor(graph, CriterionContext(loader=batch))["conv"].shape == (6,)

    class Twice(nn.Module):  # one tensor read twice by one op: both paths carry signal
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 1)
            self.classifier = nn.Linear(6, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.classifier(torch.cat([y, y], 1).mean((2, 3)))

    net = Twice().eval()
    g = ChannelGraph(net, torch.randn(1, 1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    both = trace_utility(g, x, torch.ones(6))["conv"]
    left = trace_utility(g, x, torch.tensor([1.0, 1, 1, 0, 0, 0]))["conv"]
    assert torch.allclose(both, 2 * left)


def test_baselines():
    model = models.build("vgg").eval()
    x = torch.randn(8, 1, 28, 28)
    graph = ChannelGraph(model, x)
    l1 = criteria.l1(graph)
    first = graph.groups[0]
    assert torch.allclose(l1[first.name], model.features[0].weight.abs().sum((1, 2, 3)).double())
    bn = criteria.bn_scale(graph)
    assert torch.allclose(bn[first.name], model.features[1].weight.abs().double())
    taylor = criteria.taylor(graph, CriterionContext(loader=[(x, torch.randint(0, 10, (8,)))]))
    assert set(taylor) == set(l1) and all((v >= 0).all() for v in taylor.values())
    assert model.features[0].weight.grad is None  # no gradients left behind
    r1 = criteria.random(graph, CriterionContext(seed=1))
    r2 = criteria.random(graph, CriterionContext(seed=1))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def _digits_lenet():
    x, y = digits()
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1400], y[:1400]), batch_size=100,
                                         shuffle=True)
    for _ in range(6):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), loader, x, y


@pytest.mark.parametrize("criterion", ["lda", "fisher", "l1", "bn_scale", "taylor", "random"])
def test_prune_one_call(criterion, tmp_path):
    model, loader, x, y = _digits_lenet()
    small, report = gpp_ext.prune(model, loader, x[:4], criterion=criterion, method="ratio", ratio=0.5,
                                  progress=False)
    assert small is not model and gpp_ext.count_params(model) == report.params[0]
    assert report.params[1] < report.params[0] and report.flops[1] < report.flops[0]
    assert report.widths["fc1"] == (120, 60)
    assert small(x[:5]).shape == (5, 10)
    assert "params" in str(report) and report.to_dict()["criterion"] == criterion
    # where the time went, phase by phase (the discriminant criteria report their analysis, solve and trace)
    phases = {"graph", "scores", "selection", "cut", "recalibration", "counting"}
    if criterion in ("lda", "fisher"):
        phases |= {"analysis", "solve", "trace"}
    assert set(report.seconds) == phases and all(v >= 0 for v in report.seconds.values())
    assert "seconds: graph" in str(report) and report.to_dict()["seconds"] == report.seconds
    gpp_ext.io.save(small, tmp_path / "small.pt")
    back = gpp_ext.io.load(tmp_path / "small.pt").eval()
    assert torch.equal(back(x[:5]), small.eval()(x[:5]))


def test_prune_budget_and_errors():
    model, loader, x, y = _digits_lenet()
    small, report = gpp_ext.prune(model, loader, x[:4], method="budget", budget=0.25, progress=False)
    assert report.params[1] <= 0.25 * report.params[0]
    with pytest.raises(ValueError, match="criterion must be one of"):
        gpp_ext.prune(model, loader, x[:4], criterion="magic", progress=False)
    with pytest.raises(ValueError, match="neurons must keep between 1 and 84"):
        gpp_ext.prune(model, loader, x[:4], neurons=500, progress=False)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, graph, context):
        """Prefers the last channels of every group (a toy criterion for the registry tests)."""
        self.calls.append(context)
        return {g.name: torch.arange(g.size, dtype=torch.float64) + 1 for g in graph.groups}


def test_a_registered_criterion_prunes_by_name_and_as_a_callable():
    model, loader, x, y = _digits_lenet()
    mine = _Recorder()
    criteria.register("last_channels", mine)
    try:
        assert "last_channels" in criteria.names()
        assert criteria.describe()["last_channels"].startswith("Prefers the last channels")
        small, report = gpp_ext.prune(model, loader, x[:4], criterion="last_channels", method="ratio", ratio=0.5,
                                      progress=False, seed=7)
        assert report.criterion == "last_channels" and report.widths["fc1"] == (120, 60)
        context = mine.calls[-1]
        assert context.loader is loader and context.classifier == "classifier" and context.num_classes == 10
        assert context.seed == 7
        # the kept channels are the last half: fc1's surviving weights are the original rows 60..119
        # the kept channels are the last half of every group: fc1 keeps rows 60..119, fc2 rows 42..83
        assert torch.equal(small.fc2.weight, model.fc2.weight[42:, 60:])
        assert torch.equal(small.classifier.weight, model.classifier.weight[:, 42:])
        by_callable, report2 = gpp_ext.prune(model, loader, x[:4], criterion=mine, method="ratio", ratio=0.5,
                                             progress=False)
        assert report2.criterion == "_Recorder"
        assert torch.equal(by_callable(x[:5]), small(x[:5]))
        with pytest.raises(ValueError, match="registered already"):
            criteria.register("last_channels", lambda graph, context: {})
        with pytest.raises(ValueError, match="without spaces"):
            criteria.register("two words", mine)
        with pytest.raises(TypeError, match="must be callable"):
            criteria.register("not_callable", 3)
    finally:
        criteria.unregister("last_channels")
    assert "last_channels" not in criteria.names()


def test_a_criterion_returning_nonsense_is_refused():
    model, loader, x, y = _digits_lenet()
    with pytest.raises(TypeError, match="must return a dict"):
        gpp_ext.prune(model, loader, x[:4], criterion=lambda graph, context: [1, 2], progress=False)
    with pytest.raises(ValueError, match=r"must be a tensor of shape \[6\]"):
        gpp_ext.prune(model, loader, x[:4], criterion=lambda graph, context: {"conv1": torch.ones(2)},
                      progress=False)
    with pytest.raises(TypeError, match="registered name"):
        gpp_ext.prune(model, loader, x[:4], criterion=3, progress=False)


def test_the_context_caches_the_analysis_and_says_what_is_missing():
    model, loader, x, y = _digits_lenet()
    graph = ChannelGraph(model, x[:2])
    context = CriterionContext(loader=loader)
    first = context.analysis(graph)
    assert context.analysis(graph) is first and first.lda_utility.shape == (84,)
    assert torch.equal(context.utility(graph, "fisher"), first.fisher_utility)
    assert context.tracing_images(graph).shape == (40, 1, 8, 8)  # 4 per class
    with pytest.raises(ValueError, match="needs training data"):
        criteria.lda(graph, CriterionContext())


def test_cli_lists_the_registered_criteria():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "criteria"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert listed == criteria.names()
    from gpp_ext import recipes

    marked = [line.split()[0] for line in out.stdout.splitlines() if "(default)" in line]
    assert marked == [recipes.build("gpp").criterion]


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt-style block: the pointwise layers are `nn.Linear`s acting on the last axis of [N, H, W, C]."""

    def __init__(self, inplace=False):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.Hardswish(inplace=inplace), nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(self.act(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.classifier((x + y).mean((2, 3)))


def test_taylor_finds_the_channel_axis_of_channels_last_linears_and_survives_in_place_activations():
    x, y = torch.randn(6, 1, 9, 9), torch.randint(0, 10, (6,))
    torch.manual_seed(0)
    model = ChannelsLastBlock()
    graph = ChannelGraph(model, x[:2])
    scores = criteria.taylor(graph, CriterionContext(loader=[(x, y)]))
    hidden = next(g for g in graph.groups if "fc1" in g.modules)
    assert scores[hidden.name].shape == (16,)
    out = {}

    def keep(module, args, o):
        o.retain_grad()
        out["o"] = o

    model.fc1.register_forward_hook(keep)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = (out["o"] * out["o"].grad).sum((1, 2)).abs().mean(0).double()   # over H and W, per channel
    assert torch.allclose(scores[hidden.name], expected, rtol=1e-5, atol=1e-12)
    torch.manual_seed(0)
    inplace = ChannelsLastBlock(inplace=True)
    again = criteria.taylor(ChannelGraph(inplace, x[:2]), CriterionContext(loader=[(x, y)]))
    assert all(torch.equal(again[k], scores[k]) for k in scores)


@pytest.mark.parametrize("size", [4, 8, 32])
def test_traced_utility_reads_the_channel_axis_of_channels_last_linears(size):
    """The traced utility took dimension 1 as the channels: on [N, H, W, C] it crashed (H = 4, 8) or silently
    scored the rows (H = 32). Each group now gets one score per channel, and the LDA criterion runs."""
    torch.manual_seed(0)
    model = ChannelsLastBlock()
    x = torch.randn(40, 1, size, size)
    y = torch.arange(40) % 10
    graph = ChannelGraph(model, x[:2])
    scores = criteria.get("lda")(graph, CriterionContext(loader=[(x, y)], num_classes=10, classifier="classifier"))
    sizes = {g.name: g.size for g in graph.groups}
    hidden = next(g for g in graph.groups if "fc1" in g.modules)
    assert hidden.name in scores and all(scores[n].shape == (sizes[n],) for n in scores)
