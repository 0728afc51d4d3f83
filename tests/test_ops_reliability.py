"""Reliability: every bad input fails early with a clear message. One regression test per fix; each failed on
the ops as they were before it (silently wrong results, a symmetrised asymmetric input, a truncated index,
garbage read from another device, or an unhelpful error).

A second device is simulated with "meta" tensors, which have no data: before the device checks an op mixing
them with CPU tensors ran its CPU kernel on the meta tensor's missing storage and returned garbage.
"""

import re

import numpy as np
import pytest
import scipy.linalg
import torch

from gpp_ext import ScatterStats, _checks, ops, reference
from gpp_ext.testing import make_scatter_pair

CUDA = torch.cuda.is_available()
META = torch.device("meta")
f64 = dict(dtype=torch.float64)


def example_pair():
    """The issue's example: a symmetric `a` and `b = diag(1, 1e-16, 1, 1, 1)` (cond 1e16)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 5, generator=g, **f64)
    return f @ f.T, torch.diag(torch.tensor([1, 1e-16, 1, 1, 1], **f64))


# ---------------------------------------------------------------------------------- 1. generalized_eigh

def test_ill_conditioned_b_raises_and_names_the_ridge(impl):
    """Before: eigenvalues 10-100% off scipy's, without a word."""
    a, b = example_pair()
    with pytest.raises(ValueError, match=r"(?s)b \(\+ ridge\) is ill-conditioned: condition number ~1\.0e\+16.*"
                                         r"cond <= 4\.5e\+12 for torch\.float64.*Pass ridge=1e-6"):
        impl.generalized_eigh(a, b)
    # the suggested ridge works, and the answer is scipy's
    values, _ = impl.generalized_eigh(a, b, 1e-6)
    shift = 1e-6 * float(b.diagonal().sum()) / 5
    w = scipy.linalg.eigh(a.numpy(), (b + shift * torch.eye(5, **f64)).numpy(), eigvals_only=True)[::-1]
    assert np.allclose(values.numpy(), w, rtol=1e-8, atol=0)


def test_ill_conditioned_batch_names_the_worst_entry(impl):
    a, bad = example_pair()
    b = torch.eye(5, **f64).repeat(2, 3, 1, 1)
    b[1, 2] = bad
    b[0, 1] = torch.diag(torch.tensor([1, 1e-14, 1, 1, 1], **f64))  # bad too, but less so
    with pytest.raises(ValueError, match=r"ill-conditioned \(batch entry \(1, 2\)\): condition number ~1\.0e\+16"):
        impl.generalized_eigh(a.expand(2, 3, 5, 5), b)
    with pytest.raises(ValueError, match=r"ill-conditioned \(batch entry 5\)"):
        impl.generalized_eigh(a.expand(6, 5, 5), b.reshape(6, 5, 5))


def test_float32_b_has_a_float32_limit(impl):
    """float32 b is only known to eps32: cond 1e5 leaves its eigenvalues ~1e-2 uncertain, past 1e-3."""
    a, _ = example_pair()
    b = torch.diag(torch.tensor([1, 1e-5, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"(?s)cond <= 8\.4e\+03 for torch\.float32.*Pass ridge=1e-2.*float64"):
        impl.generalized_eigh(a.float(), b)
    impl.generalized_eigh(a.float(), b, 1e-2)
    impl.generalized_eigh(a, b.double())  # the same b, in float64: fine


def test_not_positive_definite_says_ridge(impl):
    """Without a ridge: pass one. With one that is not enough (b not PSD): say so, not just "pass ridge > 0"."""
    a, _ = example_pair()
    with pytest.raises(ValueError, match=r"not positive definite.*Pass ridge > 0 \(ridge=1e-6"):
        impl.generalized_eigh(a, torch.diag(torch.tensor([1, 0, 1, 1, 1], **f64)))
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], **f64)  # positive diagonal, eigenvalue -1
    with pytest.raises(ValueError, match=r"not positive definite on its non-dead dimensions even with "
                                         r"ridge=0\.001: b has a negative eigenvalue.*pass ridge > 0\.001"):
        impl.generalized_eigh(torch.eye(2, **f64), indefinite, 1e-3)
    with pytest.raises(ValueError, match=r"not positive definite.*\(batch entry 1\)"):
        impl.generalized_eigh(torch.eye(2, **f64).expand(2, 2, 2), torch.stack([torch.eye(2, **f64), indefinite]))


def test_asymmetric_input_is_refused_and_near_symmetric_is_symmetrised(impl):
    """Before: any matrix was silently replaced by (m + m^T)/2."""
    a, b = make_scatter_pair(6, seed=1)
    skew = torch.zeros(6, 6, **f64)
    skew[0, 3] = 1e-6 * a.abs().max()
    with pytest.raises(ValueError, match=r"generalized_eigh: a must be symmetric, got max\|a - a\^T\| = 1\.00e-06 "
                                         r"x max\|a\|, above the 2\.3e-13"):
        impl.generalized_eigh(a + skew, b)
    with pytest.raises(ValueError, match=r"b must be symmetric.*\(batch entry 1\)"):
        impl.generalized_eigh(a.expand(2, 6, 6), torch.stack([b, b + 1e-6 * b.abs().max() / a.abs().max() * skew]))
    # within the tolerance (rounding): symmetrised, the result of (m + m^T)/2
    tiny = a + 1e-14 * skew / 1e-6
    got = impl.generalized_eigh(tiny, b)
    assert torch.equal(got[0], impl.generalized_eigh(0.5 * (tiny + tiny.T), b)[0])
    # float32 has its own tolerance (1024 eps32 = 1.2e-4)
    with pytest.raises(ValueError, match=r"above the 1\.2e-04 that rounding explains for torch\.float32"):
        impl.generalized_eigh((a + 1e3 * skew).float(), b.float())
    impl.generalized_eigh((a + 1e-2 * skew).float(), b.float())


def test_the_checks_run_on_the_gradient_path_too():
    """With a gradient to compute, ops runs the reference: the same checks."""
    a, b = example_pair()
    with pytest.raises(ValueError, match="ill-conditioned"):
        ops.generalized_eigh(a.requires_grad_(True), b)


def test_an_overflowing_ridge_is_named():
    """Before: "b is singular ... pass ridge > 0", for a ridge of 1e308."""
    for impl in (ops, reference):
        with pytest.raises(ValueError, match=r"overflows float64 \(ridge=1e\+308\); pass a smaller ridge"):
            impl.generalized_eigh(torch.eye(3, **f64), 10 * torch.eye(3, **f64), 1e308)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_checks_run_on_cuda():
    a, b = example_pair()
    with pytest.raises(ValueError, match=r"ill-conditioned.*Pass ridge=1e-6"):
        ops.generalized_eigh(a.cuda(), b.cuda())
    with pytest.raises(ValueError, match="a must be symmetric"):
        ops.generalized_eigh(a.cuda() + torch.eye(5, **f64, device="cuda").roll(1, 0), torch.eye(5, **f64).cuda())
    values, _ = ops.generalized_eigh(a.cuda(), b.cuda(), 1e-6)
    assert torch.allclose(values.cpu(), reference.generalized_eigh(a, b, 1e-6)[0], rtol=1e-8)
    with ops.data_checks(False):  # no read-back: the kernel's own answer (documented)
        ops.generalized_eigh(a.cuda(), b.cuda())


def test_limits_are_the_documented_ones():
    assert _checks.max_condition(torch.float64) == pytest.approx(4.5e12, rel=0.01)
    assert _checks.max_condition(torch.float32) == pytest.approx(8.4e3, rel=0.01)
    assert _checks.symmetry_tolerance(torch.float64) == pytest.approx(2.3e-13, rel=0.02)
    assert _checks.symmetry_tolerance(torch.float32) == pytest.approx(1.2e-4, rel=0.02)
    assert "1024·eps" in ops.generalized_eigh.__doc__ and "1e-3/eps(b.dtype)" in ops.generalized_eigh.__doc__


# --------------------------------------------------------------------------------------------- 2. others

@pytest.mark.parametrize("index,kind", [([0.7, 2.0], "float"), ([1, True], "bool"), ([np.float64(1.0)], "float64"),
                                        ([torch.tensor(1.0)], "Tensor")])
def test_slice_channels_refuses_float_and_bool_entries(impl, index, kind):
    """Before: [0.7, 2.0] sliced positions [0, 2] and [1, True] positions [1, 1]."""
    with pytest.raises(TypeError, match=rf"slice_channels: index must hold ints \(positions along dim\), got "
                                        rf".* \({kind}\): it would be"):
        impl.slice_channels(torch.arange(5.0), 0, index)
    with pytest.raises(TypeError, match="slice_channels: index must be an integer tensor"):
        impl.slice_channels(torch.arange(5.0), 0, torch.tensor([0.0, 2.0]))  # a float tensor index (as before)
    assert torch.equal(impl.slice_channels(torch.arange(5.0), 0, [np.int64(3), torch.tensor(1), 4]),
                       torch.tensor([3.0, 1.0, 4.0]))  # int-like entries are fine


def _mixed_device_calls():
    eye, meta_eye = torch.eye(3, **f64), torch.eye(3, **f64, device=META)
    return {
        "generalized_eigh": (lambda m: m.generalized_eigh(eye, meta_eye), "a and b", "a on cpu and b on meta"),
        "merge_scatter": (lambda m: m.merge_scatter(ScatterStats.empty(2, 3), ScatterStats.empty(2, 3, META)),
                          "a and b", "a on cpu and b on meta"),
        "discriminant_utility": (lambda m: m.discriminant_utility(torch.ones(3, device=META), torch.eye(3)),
                                 "eigenvalues and eigenvectors", "eigenvalues on meta and eigenvectors on cpu"),
        "deconv_backproject": (lambda m: m.deconv_backproject(torch.ones(2, 4, 5, 5), torch.ones(4, 3, 3, 3,
                                                                                                   device=META)),
                               "signal and weight", "signal on cpu and weight on meta"),
        "deconv_backproject (linear)": (lambda m: m.deconv_backproject(torch.ones(2, 4), torch.ones(4, 3, device=META)),
                                        "signal and weight", "signal on cpu and weight on meta"),
        "slice_channels": (lambda m: m.slice_channels(torch.ones(4, 3), 0, torch.tensor([0, 1], device=META)),
                           "t and index", "t on cpu and index on meta"),
    }


@pytest.mark.parametrize("name", list(_mixed_device_calls()))
def test_every_op_checks_its_tensors_share_a_device(impl, name):
    """Before: garbage (a CPU kernel reading a meta tensor) or an error from deep inside torch."""
    call, names, devices = _mixed_device_calls()[name]
    op = name.split()[0]
    with pytest.raises(ValueError, match=rf"^{op}: {names} must be on the same device, got {devices}; move one"
                                         if op != "slice_channels" else rf"^{op}: {names} must be on the same "
                                                                        rf"device, got {devices}; move index"):
        call(impl)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_device_checks_on_cuda():
    with pytest.raises(ValueError, match=r"a and b must be on the same device, got a on cuda:0 and b on cpu"):
        ops.generalized_eigh(torch.eye(3, device="cuda"), torch.eye(3))
    with pytest.raises(ValueError, match=r"t and index must be on the same device, got t on cuda:0"):
        ops.slice_channels(torch.ones(3, device="cuda"), 0, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"signal and weight must be on the same device"):
        ops.deconv_backproject(torch.ones(2, 4, device="cuda"), torch.ones(4, 3))


def test_other_unchecked_arguments(impl):
    """deconv_backproject's output_size as an int (before: "'int' object is not iterable"), and an index entry
    beyond int64 (before: torch's "Overflow when unpacking long long", naming no op)."""
    signal, weight = torch.randn(1, 2, 4), torch.randn(2, 3, 3)
    assert torch.equal(impl.deconv_backproject(signal, weight, stride=2, output_size=10),
                       impl.deconv_backproject(signal, weight, stride=2, output_size=[10]))
    with pytest.raises(TypeError, match=re.escape("deconv_backproject: output_size must be an int or a non-empty "
                                                  "sequence of ints, got 'ten'")):
        impl.deconv_backproject(signal, weight, output_size="ten")
    with pytest.raises(ValueError, match=r"slice_channels: index must hold int64 positions, got 18446744073709551616"):
        impl.slice_channels(torch.ones(3), 0, [0, 2 ** 64])


@pytest.mark.skipif(not ops.extension_available(), reason="the compiled ops' fake kernels")
def test_meta_tensors_take_the_fake_kernels_for_shape_inference():
    """The fake (meta) kernels were registered after the dispatch table was read, so meta tensors went to the
    reference, which reads values and failed ("Tensor.item() cannot be called on meta tensors")."""
    x, y = torch.randn(4, 3, device=META), torch.zeros(4, dtype=torch.long, device=META)
    assert ops.has_kernel("class_scatter", "meta")
    stats = ops.class_scatter(x, y, 2)
    assert stats.count.shape == (2,) and stats.within.shape == (3, 3) and stats.within.device == META
    assert ops.slice_channels(torch.randn(3, 5, device=META), 1, torch.tensor([0, 2], device=META)).shape == (3, 2)


def test_second_order_gradients_through_class_scatter_match_the_reference():
    """The compiled backward had no autograd formula of its own (`mm_out`), so a gradient of the gradient failed.
    Tolerance 1e-9 relative: float64 throughout, the two paths differ in summation order only."""
    x = torch.randn(20, 4, **f64, requires_grad=True)
    y = torch.arange(20) % 3

    def second(scatter):
        s = scatter(x, y, 3)
        g, = torch.autograd.grad((s.within ** 2).sum() + (s.mean ** 3).sum(), x, create_graph=True)
        h, = torch.autograd.grad((g ** 2).sum(), x)
        return g.detach(), h

    (g1, h1), (g2, h2) = second(ops.class_scatter), second(reference.class_scatter)
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12) and torch.allclose(h1, h2, rtol=1e-9, atol=1e-9)


def test_negative_or_non_finite_counts_are_refused_by_both_paths():
    """The compiled discriminants read max(count, 0), the reference the count itself: they disagreed silently."""
    stats = ops.class_scatter(torch.randn(30, 4, **f64), torch.arange(30) % 3, 3)
    for count in ([7.0, -7.0, 6.0], [7.0, float("nan"), 6.0]):
        bad = ScatterStats(torch.tensor(count, **f64), stats.mean, stats.within)
        for path in (ops, reference):
            with pytest.raises(ValueError, match=r"stats\.count must hold finite sample counts >= 0"):
                path.discriminants(bad, 2)
            with pytest.raises(ValueError, match=r"stats\.count must hold finite sample counts >= 0"):
                path.fisher_utility(bad)


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_quantized_tensors_are_sliced_by_the_reference():
    q = torch.quantize_per_tensor(torch.randn(3, 5), 0.1, 0, torch.qint8)
    out = ops.slice_channels(q, 1, torch.tensor([0, 2]))
    assert out.is_quantized and torch.equal(out.dequantize(), q.dequantize()[:, [0, 2]])
