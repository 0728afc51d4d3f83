"""DiscriminantAnalyzer: hooks, streaming statistics, discriminants, utilities, saving and merging.

Tolerances are those of tests/test_ops_scatter.py: streaming merges float64 statistics exactly (Chan), so the
only differences from a one-shot `class_scatter` are round-off of the merge (~eps64 per batch, held to 1e-10) and,
for float32 models, the float32 Gram product of each batch (~sqrt(block)·eps32, held to 2e-5).
"""

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpp_ext import ops
from gpp_ext.analysis import DiscriminantAnalyzer, LayerAnalysis
from gpp_ext.stats import ScatterStats
from gpp_ext.testing import digits, make_features, rel_err

F64_TOL = 1e-10
F32_TOL = 2e-5


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=32, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x))


class ConvNet(nn.Module):
    def __init__(self, channels=4, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def assert_stats_close(a: ScatterStats, b: ScatterStats, tol: float):
    assert torch.equal(a.count, b.count)
    assert rel_err(a.mean, b.mean) < tol
    assert rel_err(a.within, b.within) < tol


def digits_model(dtype):
    x, y = digits(dtype)
    torch.manual_seed(0)
    return MLP().to(dtype), x, y


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_streaming_equals_one_shot(dtype, tol):
    model, x, y = digits_model(dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=37)  # 1797 = 48·37 + 21: uneven last batch
    an = DiscriminantAnalyzer(model, 10).run(loader, progress=False)
    with torch.no_grad():
        oracle = ops.class_scatter(model.body(x), y, 10)
    assert an.layers == ["classifier:input"]
    assert an.num_samples == len(x)
    s = an.stats()
    assert s.within.dtype == torch.float64 and s.dim == 32
    assert_stats_close(s, oracle, tol)
    assert_stats_close(an.stats("classifier:input"), oracle, tol)


def test_run_max_batches_and_device():
    model, x, y = digits_model(torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=37)
    an = DiscriminantAnalyzer(model, 10).run(loader, max_batches=2, progress=False, device="cpu")
    assert an.num_samples == 74
    with torch.no_grad():
        assert_stats_close(an.stats(), ops.class_scatter(model.body(x[:74]), y[:74], 10), F64_TOL)
    assert DiscriminantAnalyzer(model, 10).run(loader, max_batches=0, progress=False).num_samples == 0


def planted_case(num_classes=3, d=8, planted=3, n=600):
    """Inputs where only feature `planted` depends on the class; a net whose hidden layer copies its input."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 10.0  # positive: the ReLU passes it unchanged
    x[:, planted] += 3.0 * y
    hidden = nn.Linear(d, d).double()
    with torch.no_grad():
        hidden.weight.copy_(torch.eye(d))
        hidden.bias.zero_()
    model = nn.Sequential(hidden, nn.ReLU(), nn.Linear(d, num_classes).double())
    return model, x, y


@pytest.mark.parametrize("kind", ["lda", "fisher"])
def test_utility_ranks_planted_neuron_first(kind):
    model, x, y = planted_case()
    an = DiscriminantAnalyzer(model, 3).update(x, y)  # no `classifier` attribute: the last Linear, "2"
    assert an.layers == ["2:input"]
    u = an.utility(kind=kind)
    assert u.shape == (8,)
    assert int(u.argmax()) == 3
    others = torch.cat([u[:3], u[4:]])
    assert float(u[3]) > 10 * float(others.max())


def test_utility_k_and_kind_validation():
    model, x, y = planted_case()
    an = DiscriminantAnalyzer(model, 3).update(x, y)
    values, vectors = an.discriminants()
    assert values.shape == (8,) and vectors.shape == (8, 8)
    # the rank-aware solve (ops.discriminants) against the full one: equal to rounding (1e-9 of the largest)
    full = ops.discriminant_utility(values, vectors, 2)
    assert torch.allclose(an.utility(k=2), full, rtol=0, atol=1e-9 * float(full.max()))
    assert torch.allclose(an.utility(), an.utility(k=2))
    with pytest.raises(ValueError, match="kind"):
        an.utility(kind="magnitude")
    with pytest.raises(ValueError, match="k must be"):
        an.utility(k=9)


@pytest.mark.parametrize("mode", ["mean", "max", "spatial"])
def test_conv_reduction_matches_hand_computation(mode):
    torch.manual_seed(0)
    model = ConvNet().double()
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(60) % 3
    kwargs = {"spatial_samples": True} if mode == "spatial" else {"reduce": mode}
    an = DiscriminantAnalyzer(model, 3, layers=["features"], **kwargs)
    an.update(x[:25], y[:25]).update(x[25:], y[25:])
    with torch.no_grad():
        f = model.features(x)  # [60, 4, 6, 6]
    if mode == "mean":
        feats, labels = f.mean((2, 3)), y
    elif mode == "max":
        feats, labels = f.amax((2, 3)), y
    else:
        feats, labels = f.permute(0, 2, 3, 1).reshape(-1, 4), y.repeat_interleave(36)
    assert an.num_samples == 60
    assert_stats_close(an.stats("features"), ops.class_scatter(feats, labels, 3), F64_TOL)


def test_the_spatial_mean_of_float32_maps_with_a_large_offset_keeps_float64_precision():
    """Feature maps at 3e4 +- 0.3 in float32: the spatial mean is taken in float64, so S_w matches the float64
    oracle of the same float32 values to the Gram product's tolerance (2e-5; in float32 the mean alone cost 1e-2)."""
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Identity()
            self.classifier = nn.Linear(4, 3)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    g = torch.Generator().manual_seed(0)
    x = (3e4 + 0.3 * torch.randn(400, 4, 16, 16, generator=g, dtype=torch.float64)).float()
    y = torch.arange(400) % 3
    an = DiscriminantAnalyzer(Offset(), 3, layers=["features"])
    an.update(x, y)
    oracle = ops.class_scatter(x.double().mean((2, 3)), y, 3)
    assert rel_err(an.stats("features").within, oracle.within) < F32_TOL


def test_default_layer_of_conv_net_is_pooled_features():
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = torch.randn(40, 1, 8, 8, dtype=torch.float64), torch.arange(40) % 3
    with DiscriminantAnalyzer(model, 3) as default, DiscriminantAnalyzer(model, 3, layers="features") as pooled:
        default.update(x, y)
        pooled.update(x, y)
        assert default.layers == ["classifier:input"]
        assert_stats_close(default.stats(), pooled.stats(), F64_TOL)


def test_two_named_layers():
    model, x, y = digits_model(torch.float64)
    an = DiscriminantAnalyzer(model, 10, layers=["body.0", "body.1"]).update(x[:900], y[:900])
    an.update(x[900:], y[900:])
    with torch.no_grad():
        pre = model.body[0](x)
    assert an.layers == ["body.0", "body.1"]
    assert_stats_close(an.stats("body.0"), ops.class_scatter(pre, y, 10), F64_TOL)
    assert_stats_close(an.stats("body.1"), ops.class_scatter(pre.relu(), y, 10), F64_TOL)
    assert an.stats() is an.stats("body.0")
    results = an.results()
    assert list(results) == ["body.0", "body.1"]
    r = results["body.1"]
    assert isinstance(r, LayerAnalysis)
    assert r.eigenvalues.shape == (32,) and r.eigenvectors.shape == (32, 32)
    assert torch.allclose(r.lda_utility, an.utility("body.1"))
    assert torch.equal(r.fisher_utility, an.utility("body.1", kind="fisher"))
    assert set(r.diagonality) == {"within", "between"}
    with pytest.raises(ValueError, match="layer must be one of"):
        an.stats("classifier")


def test_layer_errors():
    with pytest.raises(ValueError, match="layers="):
        DiscriminantAnalyzer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), 2)
    with pytest.raises(ValueError, match=r"out_features=10.*layers="):
        DiscriminantAnalyzer(MLP(), 5)
    with pytest.raises(ValueError, match=r"'body\.0'"):  # unknown name: lists valid ones
        DiscriminantAnalyzer(MLP(), 10, layers=["body.7"])
    with pytest.raises(ValueError, match="num_classes"):
        DiscriminantAnalyzer(MLP(), 0)
    with pytest.raises(ValueError, match="reduce"):
        DiscriminantAnalyzer(MLP(), 10, reduce="median")
    with pytest.raises(TypeError, match="model"):
        DiscriminantAnalyzer(lambda x: x, 10)


def test_data_errors():
    model, x, y = digits_model(torch.float32)
    an = DiscriminantAnalyzer(model, 10)
    with pytest.raises(RuntimeError, match="no data analysed yet"):
        an.discriminants()
    with pytest.raises(RuntimeError, match="no data analysed yet"):
        an.utility(kind="fisher")
    with pytest.raises(ValueError, match="labels"):
        an.update(x[:10], y[:9])
    with pytest.raises(ValueError, match="labels"):
        an.update(x[:10], y[:10, None])
    with pytest.raises(ValueError, match=r"num_classes\)"):
        an.update(x[:10], y[:10] + 10)
    assert an.num_samples == 0  # failed updates change nothing
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        DiscriminantAnalyzer(twice, 4, layers=["0"]).update(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_close_and_context_manager():
    model, x, y = digits_model(torch.float32)
    with DiscriminantAnalyzer(model, 10) as an:
        assert len(model.classifier._forward_pre_hooks) == 1
        an.update(x[:50], y[:50])
        model(x)  # hooks record only inside update
        assert an.num_samples == 50
    assert len(model.classifier._forward_pre_hooks) == 0
    assert an.stats().num_samples == 50  # statistics outlive the hooks
    with pytest.raises(RuntimeError, match="closed"):
        an.update(x[:50], y[:50])
    an.close()  # idempotent


def test_state_dict_round_trip_and_merge():
    model, x, y = digits_model(torch.float64)
    whole = DiscriminantAnalyzer(model, 10, layers=["body.0", "classifier:input"]).update(x, y)
    first = DiscriminantAnalyzer(model, 10, layers=["body.0", "classifier:input"]).update(x[:700], y[:700])
    second = DiscriminantAnalyzer(model, 10, layers=["body.0", "classifier:input"]).update(x[700:], y[700:])

    buffer = io.BytesIO()
    torch.save(second.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["num_classes"] == 10 and set(state["layers"]) == {"body.0", "classifier:input"}
    restored = DiscriminantAnalyzer(model, 10, layers=["body.0", "classifier:input"]).load_state_dict(state)
    assert restored.num_samples == second.num_samples
    for name in restored.layers:
        a, b = restored.stats(name), second.stats(name)
        assert all(torch.equal(u, v) for u, v in zip((a.count, a.mean, a.within), (b.count, b.mean, b.within)))

    first.merge(restored)
    assert first.num_samples == len(x)
    for name in whole.layers:
        assert_stats_close(first.stats(name), whole.stats(name), F64_TOL)
    assert rel_err(first.utility("body.0"), whole.utility("body.0")) < 1e-8

    with pytest.raises(ValueError, match="layers"):
        first.merge(DiscriminantAnalyzer(model, 10, layers=["body.0"]))
    with pytest.raises(ValueError, match="num_classes"):
        first.load_state_dict({**state, "num_classes": 3})
    with pytest.raises(ValueError, match="layers"):
        DiscriminantAnalyzer(model, 10, layers=["body.0"]).load_state_dict(state)


def features_model(d, num_classes):
    """A model whose classifier sees the inputs themselves, so the analysed features are the data."""
    model = nn.Module()
    model.classifier = nn.Linear(d, num_classes).double()
    model.forward = lambda x: model.classifier(x)
    return model


def test_diagonality():
    d, n = 4, 4000
    g = torch.Generator().manual_seed(2)
    # Independent: centres ±5·e_j (2d classes, grand mean 0, S_b diagonal), unit isotropic noise.
    centres = torch.cat([5 * torch.eye(d), -5 * torch.eye(d)]).double()
    y = torch.arange(n) % (2 * d)
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    independent = DiscriminantAnalyzer(features_model(d, 2 * d), 2 * d).update(x, y).diagonality()
    assert independent["within"] < 0.05 and independent["between"] < 0.05
    assert DiscriminantAnalyzer(features_model(d, 2 * d), 2 * d).update(x, y).utility(kind="fisher").min() > 1

    # Correlated: one shared noise and one shared class direction dominate every feature.
    y = torch.arange(n) % 3
    shared = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = 2.0 * y[:, None] + shared + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    correlated = DiscriminantAnalyzer(features_model(d, 3), 3).update(x, y).diagonality()
    assert correlated["within"] > 0.9 and correlated["between"] > 0.9

    one = DiscriminantAnalyzer(features_model(1, 2), 2).update(*make_features(50, 1, 2, dtype=torch.float64))
    assert one.diagonality() == {"within": 0.0, "between": 0.0}


def test_mode_restored_and_no_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.9), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # mixed modes must come back as they were
    before = [m.training for m in model.modules()]
    running = model[2].running_mean.clone()
    x, y = make_features(90, 6, 3)
    x.requires_grad_(True)
    with torch.enable_grad():
        an = DiscriminantAnalyzer(model, 3).update(x, y)
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[2].running_mean, running)  # eval mode: BatchNorm statistics untouched
    s = an.stats()
    assert not (s.mean.requires_grad or s.within.requires_grad)
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    with torch.no_grad():  # eval-mode pass: Dropout off, so the hand computation is deterministic
        model.eval()
        feats = model[2](model[1](model[0](x)))
    assert_stats_close(s, ops.class_scatter(feats, y, 3), F32_TOL)
