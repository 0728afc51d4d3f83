"""Deconvolution tracing of utility, the baseline criteria, channel selection and the one-call prune."""

import pytest
import torch
import torch.nn as nn

import gpp_ext
from gpp_ext import importance, models
from gpp_ext.graph import ChannelGraph
from gpp_ext.selection import select_channels
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
    u = importance.trace_utility(graph, x, torch.tensor([1]))  # keep pre-decision neuron 1 only
    # by hand: z1 = fc1(x), h1 = relu(z1), h2 = relu(fc2(h1)); signal s2 = h2 * [0, 1]
    z1 = x @ net.fc1.weight.T + net.fc1.bias
    h2 = torch.relu(torch.relu(z1) @ net.fc2.weight.T)
    s2 = h2 * torch.tensor([0.0, 1.0])
    s1 = torch.relu(s2 @ net.fc2.weight) * (z1 > 0)  # back through fc2, rectified with the forward mask
    assert torch.allclose(u["fc2"], s2.mean(0).abs().double(), atol=1e-6)
    assert torch.allclose(u["fc1"], s1.mean(0).abs().double(), atol=1e-6)
    deconvnet = importance.trace_utility(graph, x, torch.tensor([1]), rectify="deconvnet")
    assert torch.allclose(deconvnet["fc1"], torch.relu(s2 @ net.fc2.weight).mean(0).abs().double(), atol=1e-6)


def test_trace_reaches_every_group_of_real_architectures():
    for name, shape in (("vgg", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("inception", (1, 28, 28))):
        model = models.build(name).eval()
        graph = ChannelGraph(model, torch.randn(2, *shape))
        width = model.classifier.in_features
        u = importance.trace_utility(graph, torch.randn(6, *shape), torch.ones(width))
        assert set(u) == {g.name for g in graph.groups}
        assert all(v.shape == (graph.group(n).size,) and torch.isfinite(v).all() for n, v in u.items())
        assert all(v.sum() > 0 for v in u.values()), name  # the signal gets everywhere


def test_trace_goes_through_chunks_and_repeated_inputs():
    from test_graph import ChunkNet

    torch.manual_seed(0)
    model = ChunkNet().eval()
    graph = ChannelGraph(model, torch.randn(2, 2, 6, 6))
    u = importance.trace_utility(graph, torch.randn(5, 2, 6, 6), torch.ones(8))
    assert u["conv"].shape == (6,) and (u["conv"] > 0).all()  # both halves' signals, folded onto one group
    assert importance.l1_importance(graph)["conv"].shape == (6,)
    assert importance.taylor_importance(graph, torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1]))["conv"].shape \
        == (6,)

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
    both = importance.trace_utility(g, x, torch.ones(6))["conv"]
    left = importance.trace_utility(g, x, torch.tensor([1.0, 1, 1, 0, 0, 0]))["conv"]
    assert torch.allclose(both, 2 * left)


def test_baselines():
    model = models.build("vgg").eval()
    x = torch.randn(8, 1, 28, 28)
    graph = ChannelGraph(model, x)
    l1 = importance.l1_importance(graph)
    first = graph.groups[0]
    assert torch.allclose(l1[first.name], model.features[0].weight.abs().sum((1, 2, 3)).double())
    bn = importance.bn_scale_importance(graph)
    assert torch.allclose(bn[first.name], model.features[1].weight.abs().double())
    taylor = importance.taylor_importance(graph, x, torch.randint(0, 10, (8,)))
    assert set(taylor) == set(l1) and all((v >= 0).all() for v in taylor.values())
    assert model.features[0].weight.grad is None  # no gradients left behind
    r1 = importance.random_importance(graph, torch.Generator().manual_seed(1))
    r2 = importance.random_importance(graph, torch.Generator().manual_seed(1))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


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
