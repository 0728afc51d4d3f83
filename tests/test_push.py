"""PushLoss: each term moves what it claims, on digits, against cross-entropy alone from the same start."""

import pytest
import torch
import torch.nn as nn

from gpp_ext import ops
from gpp_ext.data import digits
from gpp_ext.push import ClassBalancedSampler, PreDecisionTap, PushLoss


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.relu(self.hidden(x.flatten(1))))


def features_of(model, x):
    with torch.no_grad():
        return model.relu(model.hidden(x.flatten(1)))


def train(loss_fn, steps=150, seed=0):
    x, y = digits().tensors
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sampler = ClassBalancedSampler(y, 100, seed=seed)
    with PreDecisionTap(model) as tap:
        done = 0
        while done < steps:
            for batch in sampler:
                opt.zero_grad()
                logits = model(x[batch])
                loss_fn(logits, tap.features, y[batch]).backward()
                opt.step()
                done += 1
                if done == steps:
                    break
    return model, features_of(model, x), y


def metrics(h, y):
    s = ops.class_scatter(h.double(), y, 10)
    w, b = s.within.diagonal(), s.between().diagonal()
    fisher = b / (w + 1e-6 * (w.sum() + b.sum()) / w.numel())
    live = w > 0
    std = w.clamp_min(1e-12).sqrt()
    corr = (s.within / (std[:, None] * std[None, :]))[live][:, live]
    off = (corr - torch.diag_embed(corr.diagonal())).abs().sum() / (live.sum() * (live.sum() - 1))
    top = fisher.sort(descending=True).values
    return {"separation": float(fisher.mean()), "offdiag": float(off), "top_quarter": float(top[:8].sum() / top.sum())}


@pytest.fixture(scope="module")
def baseline():
    _, h, y = train(PushLoss(10, alpha=0, beta=0, gamma=0))
    return metrics(h, y)


def test_separation_term_raises_separation(baseline):
    _, h, y = train(PushLoss(10, alpha=0.5, beta=0, gamma=0))
    assert metrics(h, y)["separation"] > 1.2 * baseline["separation"]


def test_covariance_term_lowers_correlation(baseline):
    _, h, y = train(PushLoss(10, alpha=0, beta=5.0, gamma=0))
    assert metrics(h, y)["offdiag"] < 0.8 * baseline["offdiag"]


def test_compact_term_concentrates_utility(baseline):
    _, h, y = train(PushLoss(10, alpha=0, beta=0, gamma=5.0))
    assert metrics(h, y)["top_quarter"] > baseline["top_quarter"] + 0.05
    _, h, y = train(PushLoss(10, alpha=0, beta=0, gamma=5.0, compact="outside", keep=8))
    assert metrics(h, y)["top_quarter"] > baseline["top_quarter"] + 0.05


def test_lda_form_and_moving_average_run_and_differentiate():
    x, y = digits().tensors
    torch.manual_seed(1)
    model = MLP()
    push = PushLoss(10, separation="lda", ema=0.9)
    with PreDecisionTap(model) as tap:
        for batch in list(ClassBalancedSampler(y, 50))[:3]:
            model.zero_grad()
            loss = push(model(x[batch]), tap.features, y[batch])
            loss.backward()
            assert torch.isfinite(loss) and model.hidden.weight.grad.abs().sum() > 0
    assert set(push.terms) == {"ce", "sep", "cov", "compact", "total"}
    assert push._running is not None and push._running.num_samples > 50  # earlier batches are remembered
    push.reset()
    assert push._running is None


def test_sampler_balances_classes():
    y = torch.arange(103) % 10
    batches = list(ClassBalancedSampler(y, 40, seed=0))
    assert len(batches) == 2
    for batch in batches:
        assert torch.bincount(y[batch], minlength=10).tolist() == [4] * 10
    with pytest.raises(ValueError, match="at least the number of classes"):
        ClassBalancedSampler(y, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="separation must be"):
        PushLoss(10, separation="mystery")
    with pytest.raises(ValueError, match="needs keep"):
        PushLoss(10, compact="outside")
    with pytest.raises(ValueError, match="ema must be"):
        PushLoss(10, ema=1.0)
    with pytest.raises(ValueError, match=r"features must be \[B, D\]"):
        PushLoss(10)(torch.randn(4, 10), torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long))
