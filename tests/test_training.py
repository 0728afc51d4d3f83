"""The one training module: fit (cross-entropy, push, penalties; seeded), evaluate, recalibrate_batchnorm."""

import copy

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


def _layouts(model):
    return {n: p.is_contiguous() for n, p in model.named_parameters()}


def test_fit_trains_convolutions_channels_last_on_cpu_and_hands_the_model_back_as_it_was(splits, monkeypatch):
    """`memory_format="auto"` runs the convolutions channels-last (oneDNN's fast layout) and converts back: the
    same training as the default layout up to rounding, and the model's parameters contiguous again afterwards.
    Tolerance: logits within 1% (relative norm) after one AdamW step; each convolution sums in another order,
    and AdamW's first step, lr times the gradient's sign, turns that rounding into a change of up to lr in a
    weight whose gradient is near zero (measured: 0.03-0.24% on VGG-BN, ResNet-20, the Inception net). Over
    many steps the two trainings drift apart as two thread counts do (training amplifies rounding)."""
    seen = []
    conv = models.build("vgg", in_channels=1, num_classes=10).features[0].__class__
    original = conv.forward

    def spy(self, x):
        if self.in_channels > 1:  # with one channel both layouts are the same
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return original(self, x)

    monkeypatch.setattr(conv, "forward", spy)
    a = fit(_vgg(), splits.train, 20 * 128 / len(splits.train), seed=1, memory_format="auto")
    assert seen and all(seen)
    seen.clear()
    b = fit(_vgg(), splits.train, 20 * 128 / len(splits.train), seed=1, memory_format="contiguous")
    assert seen and not any(seen)
    assert all(_layouts(a).values()) and all(_layouts(b).values())
    one = [fit(_vgg(), splits.train, 128 / len(splits.train), seed=1, memory_format=f)
           for f in ("auto", "contiguous")]
    x = torch.stack([splits.val[i][0] for i in range(64)])
    with torch.no_grad():
        assert float((one[0](x) - one[1](x)).norm() / one[1](x).norm()) < 1e-2


def test_fit_keeps_the_default_layout_for_a_model_that_needs_it(splits):
    """A `.view` over a convolution's output needs the default layout: "auto" trains such a model in it, and
    "channels_last" says why it cannot."""
    class Viewing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 6 * 6, 10)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], -1))

    torch.manual_seed(0)
    model = fit(Viewing(), splits.train, 3, memory_format="auto")
    assert evaluate(model, splits.val) > 0.5 and all(_layouts(model).values())
    with pytest.raises(ValueError, match="cannot run in that layout"):
        fit(Viewing(), splits.train, 0.1, memory_format="channels_last")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        fit(Viewing(), splits.train, 0.1, memory_format="nhwc")


SHORTCUT_ON_ONE_THREAD = """
import torch
from gpp_ext import data, models
from gpp_ext.training import fit
torch.set_num_threads(1)
splits = data.load_dataset("digits", seed=0)
torch.manual_seed(0)
net = models.build("resnet20", in_channels=1, num_classes=10, widths=[3, 6, 12])
fit(net, splits.train, 2, seed=0)
print("trained")
"""


def test_auto_layout_trains_a_narrow_strided_shortcut_on_one_thread_without_corrupting_the_heap():
    """torch 2.13 on the CPU corrupts the heap training a strided 1x1 convolution of 3 input channels in
    channels-last on one thread (a ResNet shortcut; the process aborts with `double free or corruption`):
    "auto" must keep such a model in the default layout. In a child process, since an abort would end pytest."""
    import os
    import subprocess
    import sys

    from gpp_ext.training import _unsafe_in_channels_last

    assert _unsafe_in_channels_last(models.build("resnet20", in_channels=1, num_classes=10, widths=[3, 6, 12]))
    assert not _unsafe_in_channels_last(models.build("resnet20", in_channels=1, num_classes=10))
    done = subprocess.run([sys.executable, "-c", SHORTCUT_ON_ONE_THREAD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]


def test_auto_layout_warns_on_one_thread_when_a_model_is_already_channels_last_with_a_narrow_shortcut():
    """A model the user already put in channels-last is used as given ("auto" converts nothing back), so with
    the unsafe shortcut on one thread `fast_layout` says so and how to avoid it; nothing is trained here, since
    that could abort pytest. On two threads, with a safe model, or in blocks that only run forward passes
    (evaluation, BatchNorm recalibration), it stays quiet."""
    import warnings

    from gpp_ext.training import evaluate, fast_layout, recalibrate_batchnorm

    narrow = models.build("resnet20", in_channels=1, num_classes=10, widths=[3, 6, 12])
    narrow.to(memory_format=torch.channels_last)
    sample = torch.zeros(1, 16, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.warns(RuntimeWarning, match="contiguous_format"):
            with fast_layout(narrow, sample) as layout:
                assert layout is None
        wide = models.build("resnet20", in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            default = models.build("resnet20", in_channels=1, num_classes=10, widths=[3, 6, 12])
            with fast_layout(default, sample) as layout:   # kept in the default layout: nothing to warn about
                assert layout is None
            with fast_layout(wide, sample) as layout:
                assert layout is torch.channels_last
            with fast_layout(narrow, sample, training=False) as layout:
                assert layout is None
            data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.arange(8) % 10)
            evaluate(narrow, data, batch_size=4)
            recalibrate_batchnorm(narrow, torch.utils.data.DataLoader(data, batch_size=4), num_batches=2)
            torch.set_num_threads(2)
            with fast_layout(narrow, sample):
                pass
    finally:
        torch.set_num_threads(threads)


def test_fit_leaves_a_channels_last_model_so_and_restores_the_layout_when_training_fails(splits):
    model = _vgg().to(memory_format=torch.channels_last)
    fit(model, splits.train, 0.1)
    assert not any(p.is_contiguous() for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)

    def fails(step, total):
        raise RuntimeError("stop here")

    model = _vgg()
    with pytest.raises(RuntimeError, match="stop here"):
        fit(model, splits.train, 0.1, after_step=fails)
    assert all(_layouts(model).values())  # converted back although training stopped


def test_evaluation_and_recalibration_in_the_fast_layout_match_the_default_one(splits):
    """`evaluate` and `recalibrate_batchnorm` run channels-last on the CPU: the same accuracy and the same
    BatchNorm statistics as in the default layout (1e-5 relative: a different summation order in each
    convolution), and the model handed back in its own layout."""
    model = fit(_vgg(), splits.train, 1)
    from gpp_ext.training import fast_layout

    with fast_layout(model, splits.val[0][0]) as layout:
        assert layout is torch.channels_last and not all(_layouts(model).values())
    assert all(_layouts(model).values())
    with fast_layout(model, splits.val[0][0], memory_format="contiguous") as layout:
        assert layout is None and all(_layouts(model).values())
    assert evaluate(model, splits.val) == evaluate(model, splits.val, memory_format="contiguous")
    batches = [(x, y) for x, y in training_batches(splits.train, 64, seed=0)][:5]
    fast = recalibrate_batchnorm(copy.deepcopy(model), batches)
    plain = recalibrate_batchnorm(copy.deepcopy(model), batches, memory_format="contiguous")
    for a, b in zip(fast.modules(), plain.modules()):
        if is_batch_norm(a):
            assert torch.allclose(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    assert all(_layouts(fast).values())


def test_the_fast_layout_hands_back_the_default_strides_even_for_one_by_one_convolutions(splits):
    """A 1x1 convolution's weight is contiguous in both layouts, so `.to(contiguous_format)` would leave it with
    channels-last strides (and later passes would take the channels-last path): every tensor must come back
    with the default strides."""
    from gpp_ext.training import _standard_strides, fast_layout

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10))
    with fast_layout(model, splits.val[0][0]) as layout:
        assert layout is torch.channels_last and model[3].weight.stride() != _standard_strides((16, 8, 1, 1))
    assert all(t.stride() == _standard_strides(t.shape) for t in model.state_dict().values())
    fit(model, splits.train, 0.2)
    assert all(t.stride() == _standard_strides(t.shape) for t in model.state_dict().values())
