"""The one training module: fit (cross-entropy, push, penalties; seeded), evaluate, recalibrate_batchnorm."""

import pytest
import torch

from gpp_ext import data, models
from gpp_ext.layers import is_batch_norm
from gpp_ext.push import PushLoss
from gpp_ext.training import evaluate, fit, latency_ms, recalibrate_batchnorm, training_batches


def _vgg(seed=0):
    torch.manual_seed(seed)
    return models.build("vgg", in_channels=1, num_classes=10, widths=[8, "M", 16, "M"], hidden=16)


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


def _gammas(model):
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules() if is_batch_norm(m))


def test_fit_learns_is_seeded_and_takes_a_penalty(splits):
    a = fit(_vgg(), splits.train, 3, lr=3e-3, batch_size=64, seed=5)
    b = fit(_vgg(), splits.train, 3, lr=3e-3, batch_size=64, seed=5)
    assert not a.training and evaluate(a, splits.val) > 0.5
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    slim = fit(_vgg(), splits.train, 3, lr=3e-3, batch_size=64, seed=5,
               penalty=lambda m: 1e-1 * sum(n.weight.abs().sum() for n in m.modules() if is_batch_norm(n)))
    assert _gammas(slim) < 0.8 * _gammas(a)  # the L1 penalty shrinks the BatchNorm scales
    untouched = _vgg()
    assert fit(untouched, splits.train, 0) is untouched


def test_fit_with_push_uses_balanced_batches(splits):
    model = fit(_vgg(), splits.train, 1, lr=3e-3, batch_size=60, seed=1, push=PushLoss(10, 0.3, 0.3, 0.05))
    assert evaluate(model, splits.val) > 0.2
    batch = next(iter(training_batches(splits.train, 60, seed=1, balanced=True)))[1]
    assert torch.equal(torch.bincount(batch, minlength=10), torch.full((10,), 6))


def test_recalibration_and_latency(splits):
    model = fit(_vgg(), splits.train, 1, lr=3e-3, batch_size=64, seed=2)
    bn = next(m for m in model.modules() if is_batch_norm(m))
    bn.running_mean.fill_(100.0)
    recalibrate_batchnorm(model, training_batches(splits.train, 64, seed=3), num_batches=5)
    assert float(bn.running_mean.abs().max()) < 50 and not model.training
    assert latency_ms(model, splits.input_shape, 1, repeats=3) > 0
