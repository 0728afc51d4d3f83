"""class_scatter, merge_scatter and ScatterStats.

Tolerances. The float64 oracle is numpy/torch float64 on the same inputs, whose own error is ~N·eps64
relative (<1e-11 here), so float64 inputs are held to 1e-10. For float32 inputs the kernel rounds centred rows
to float32 and multiplies them in float32 over blocks of 4096 rows (accumulated in float64): the expected
relative error is ~sqrt(4096)·eps32 ≈ 4e-6, so float32 results are held to 2e-5 (and the 1e-4 contract).
"""

import random

import numpy as np
import pytest
import torch

from gpp_ext import ScatterStats, ops, reference
from gpp_ext.testing import digits, make_features, rel_err


F64_TOL = 1e-10
F32_TOL = 2e-5


def numpy_scatter(x, y, c):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    count = np.bincount(y, minlength=c).astype(np.float64)
    mean = np.zeros((c, x.shape[1]))
    within = np.zeros((x.shape[1], x.shape[1]))
    for k in range(c):
        xk = x[y == k]
        if len(xk):
            mean[k] = xk.mean(0)
            within += (xk - mean[k]).T @ (xk - mean[k])
    return count, mean, within


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,c", [(1000, 17, 5), (9000, 64, 10), (300, 40, 100)])
def test_matches_numpy_float64(impl, device, dtype, n, d, c):
    x, y = make_features(n, d, c, dtype=dtype, device=device, seed=n + d)
    s = impl.class_scatter(x, y, c)
    count, mean, within = numpy_scatter(x.cpu(), y.cpu(), c)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert s.count.dtype == s.mean.dtype == s.within.dtype == torch.float64
    assert np.array_equal(s.count.cpu().numpy(), count)
    assert rel_err(s.mean, mean) < F64_TOL  # means are float64 sums of the exact inputs in every path
    assert rel_err(s.within, within) < tol
    assert torch.equal(s.within, s.within.T)


def test_ops_matches_reference_on_digits():
    x, y = digits()
    a, b = ops.class_scatter(x, y, 10), reference.class_scatter(x, y, 10)
    assert torch.equal(a.count, b.count)
    assert rel_err(a.mean, b.mean) < F64_TOL
    assert rel_err(a.within, b.within) < F32_TOL
    assert rel_err(ops.class_scatter(x.double(), y, 10).within, b.within) < F64_TOL


def test_sklearn_lda_on_digits():
    """scikit-learn's LDA is an independent oracle: covariance_ = S_w / N, means_ = class means, and its
    eigen solver's explained variance ratios are the normalised generalized eigenvalues of (S_b, S_w)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = digits(torch.float64)
    live = x.std(0) > 0  # digits has constant pixels, which make sklearn's S_w singular
    x = x[:, live]
    lda = LinearDiscriminantAnalysis(solver="eigen", store_covariance=True).fit(x.numpy(), y.numpy())
    s = ops.class_scatter(x, y, 10)
    n = x.shape[0]
    assert rel_err(s.within / n, lda.covariance_) < F64_TOL
    assert rel_err(s.mean, lda.means_) < F64_TOL
    values, _ = ops.generalized_eigh(s.between(), s.within)
    ratio = values[:9] / values.sum()
    assert np.allclose(ratio.numpy(), lda.explained_variance_ratio_, rtol=1e-7, atol=1e-12)


def test_large_mean_float32_stays_accurate(impl):
    """float32 features with mean 1e4 and unit variance: S_w within 1e-4 of a float64 reference."""
    x, y = make_features(20000, 32, 10, mean=1e4, spread=0.5, dtype=torch.float32, seed=3)
    s = impl.class_scatter(x, y, 10)
    _, _, within = numpy_scatter(x, y, 10)
    assert rel_err(s.within, within) < 1e-4
    # the naive one-pass formula X^T X - n mu mu^T in float32 is what this guards against
    naive = (x.T @ x).double() - sum(
        (y == k).sum() * torch.outer(x[y == k].mean(0), x[y == k].mean(0)).double() for k in range(10))
    assert rel_err(naive, within) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_equals_one_shot(dtype):
    """Any split into batches (empty ones, ones missing classes) merged in any order gives the one-shot
    statistics."""
    x, y = make_features(5000, 24, 7, mean=50.0, dtype=dtype, seed=11)
    full = ops.class_scatter(x, y, 7)
    rng = random.Random(0)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    for trial in range(4):
        # random cuts, a few 1-3 row batches (which miss most classes) and a repeated cut (an empty batch)
        tiny = [c + k for c in rng.sample(range(10, 4990), 3) for k in (0, 1, 3)]
        cuts = sorted(set(rng.sample(range(1, 5000), 6) + tiny)) + [5000, 5000]
        parts, start = [], 0
        for stop in cuts:
            parts.append(ops.class_scatter(x[start:stop], y[start:stop], 7))
            start = stop
        assert any((p.count == 0).any() and p.count.sum() > 0 for p in parts)
        parts.append(ScatterStats.empty(7, 24))
        rng.shuffle(parts)
        if trial % 2:  # left fold
            merged = parts[0]
            for p in parts[1:]:
                merged = ops.merge_scatter(merged, p)
        else:  # pairwise tree, as an all-reduce would do
            while len(parts) > 1:
                parts = [ops.merge_scatter(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                         for i in range(0, len(parts), 2)]
            merged = parts[0]
        assert torch.equal(merged.count, full.count)
        assert rel_err(merged.mean, full.mean) < F64_TOL
        assert rel_err(merged.within, full.within) < tol


def test_merge_matches_reference_and_is_associative():
    x, y = make_features(3000, 16, 5, dtype=torch.float64, seed=5)
    a, b, c = (ops.class_scatter(x[i::3], y[i::3], 5) for i in range(3))
    for merge in (ops.merge_scatter, reference.merge_scatter):
        left, right = merge(merge(a, b), c), merge(a, merge(b, c))
        assert rel_err(left.within, right.within) < F64_TOL
    assert rel_err(ops.merge_scatter(a, b).within, reference.merge_scatter(a, b).within) < F64_TOL
    assert rel_err((a + b).within, ops.merge_scatter(b, a).within) < F64_TOL


def test_between_and_total():
    x, y = make_features(2000, 12, 6, dtype=torch.float64, seed=2)
    s = ops.class_scatter(x, y, 6)
    xc = x - x.mean(0)
    assert rel_err(s.total(), xc.T @ xc) < F64_TOL
    mu = x.mean(0)
    between = sum((y == k).sum() * torch.outer(x[y == k].mean(0) - mu, x[y == k].mean(0) - mu) for k in range(6))
    assert rel_err(s.between(), between) < F64_TOL


# ------------------------------------------------------------------------------------------------ edge cases

def test_empty_batch(impl):
    s = impl.class_scatter(torch.empty(0, 5), torch.empty(0, dtype=torch.long), 3)
    assert s.count.shape == (3,) and s.mean.shape == (3, 5) and s.within.shape == (5, 5)
    assert not s.count.any() and not s.mean.any() and not s.within.any()


def test_absent_class_and_one_sample_per_class(impl):
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, -1.0]])
    y = torch.tensor([0, 2, 3])
    s = impl.class_scatter(x, y, 5)
    assert s.count.tolist() == [1, 0, 1, 1, 0]
    assert torch.equal(s.mean[1], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(s.mean[[0, 2, 3]], x.double())
    assert not s.within.any()  # one sample per class: no within-class spread


def test_more_dims_than_samples(impl):
    x, y = make_features(20, 50, 4, dtype=torch.float64, seed=8)
    s = impl.class_scatter(x, y, 4)
    _, _, within = numpy_scatter(x, y, 4)
    assert rel_err(s.within, within) < F64_TOL
    assert torch.linalg.matrix_rank(s.within) <= 16


def test_non_contiguous_inputs(impl):
    x, y = make_features(600, 30, 6, dtype=torch.float64, seed=4)
    xt = x.T.contiguous().T  # column-major
    yy = torch.stack([y, y], 1)[:, 0]  # strided
    assert not xt.is_contiguous() and not yy.is_contiguous()
    a, b = impl.class_scatter(xt, yy, 6), impl.class_scatter(x, y, 6)
    assert rel_err(a.within, b.within) < F64_TOL
    sub = x[::2, 5:20]
    strided = impl.class_scatter(sub, y[::2], 6).within
    assert rel_err(strided, impl.class_scatter(sub.contiguous(), y[::2], 6).within) < F64_TOL


def test_half_precision_and_int32_labels(impl):
    x, y = make_features(500, 8, 3, dtype=torch.float32, seed=1)
    s = impl.class_scatter(x.to(torch.bfloat16), y.int(), 3)
    ref = impl.class_scatter(x.to(torch.bfloat16).float(), y, 3)
    assert rel_err(s.within, ref.within) < F32_TOL


_DETERMINISM = """
import torch
from gpp_ext import ops
from gpp_ext.testing import make_features
x, y = make_features(20000, 96, 10, dtype=torch.float32, seed=9)
torch.set_num_threads(1)
one = ops.class_scatter(x, y, 10)
torch.set_num_threads(2)
many = ops.class_scatter(x, y, 10)
print(torch.equal(one.mean, many.mean), torch.equal(one.within, many.within))
"""


def test_deterministic_across_thread_counts():
    """Our kernel's own parallelism never changes a result (fixed blocks, sequential sums per element). The GEMM
    is the BLAS's: MKL on Intel CPUs changes its summation order with its thread count (the last bits of S_w
    move by ~1e-9 relative) unless its conditional numerical reproducibility is on, so the check runs with
    MKL_CBWR=COMPATIBLE, which makes MKL's GEMM deterministic (and is harmless elsewhere)."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DETERMINISM], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MKL_CBWR="COMPATIBLE"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "True"], out.stdout


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(impl, bad):
    x, y = make_features(100, 4, 2)
    x[17, 2] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        impl.class_scatter(x, y, 2)


@pytest.mark.parametrize("label", [-1, 3, 100])
def test_labels_out_of_range(impl, label):
    x, y = make_features(100, 4, 3)
    y[50] = label
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, num_classes\)"):
        impl.class_scatter(x, y, 3)


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(10), torch.zeros(10, dtype=torch.long), 2), ValueError, "x must be 2-D"),
    ((torch.randn(10, 3), torch.zeros(10, 1, dtype=torch.long), 2), ValueError, "y must be 1-D"),
    ((torch.randn(10, 3), torch.zeros(9, dtype=torch.long), 2), ValueError, "one label per row"),
    ((torch.ones(10, 3, dtype=torch.long), torch.zeros(10, dtype=torch.long), 2), TypeError, "x must be a floating"),
    ((torch.randn(10, 3), torch.zeros(10), 2), TypeError, "y must be an integer"),
    ((torch.randn(10, 3), torch.zeros(10, dtype=torch.bool), 2), TypeError, "y must be an integer"),
    ((torch.randn(10, 3), torch.zeros(10, dtype=torch.long), 0), ValueError, "num_classes must be >= 1"),
    ((torch.randn(10, 3), torch.zeros(10, dtype=torch.long), 2.0), TypeError, "num_classes must be an int"),
    ((np.ones((10, 3)), torch.zeros(10, dtype=torch.long), 2), TypeError, "x must be a torch.Tensor"),
])
def test_bad_arguments(impl, args, error, match):
    with pytest.raises(error, match=match):
        impl.class_scatter(*args)


def test_kernel_checks_its_own_arguments():
    """Direct torch.ops calls (e.g. from C++ or TorchScript users) get the same errors as the wrapper."""
    if not ops.has_kernel("class_scatter", "cpu"):
        pytest.skip("extension not built")
    with pytest.raises(TypeError, match="y must be int64"):
        torch.ops.gpp_ext.class_scatter(torch.randn(4, 2), torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="y must hold labels"):
        torch.ops.gpp_ext.class_scatter(torch.randn(4, 2), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(ValueError, match="count_b"):
        a = ops.class_scatter(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 2)
        torch.ops.gpp_ext.merge_scatter(a.count, a.mean, a.within, a.count[:1], a.mean, a.within)


def test_float32_overflow_is_reported(impl):
    x = torch.tensor([[3e19, 0.0], [-3e19, 1.0], [1.0, 2.0]], dtype=torch.float32)
    y = torch.tensor([0, 0, 1])
    if impl is ops:
        with pytest.raises(ValueError, match="overflowed float32; pass x as float64"):
            impl.class_scatter(x, y, 2)
    assert torch.isfinite(impl.class_scatter(x.double(), y, 2).within).all()


def test_backward_kernel_checks_its_arguments():
    if not ops.has_kernel("class_scatter_backward", "cpu"):
        pytest.skip("extension not built")
    x, y = make_features(10, 3, 2, dtype=torch.float64)
    s = ops.class_scatter(x, y, 2)
    g_mean, g_within = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    bad = y.clone()
    bad[4] = 7
    with pytest.raises(ValueError, match="class_scatter_backward: y must hold labels"):
        torch.ops.gpp_ext.class_scatter_backward(g_mean, g_within, x, bad, s.count, s.mean)
    with pytest.raises(ValueError, match="class_scatter_backward: grad_mean must have shape"):
        torch.ops.gpp_ext.class_scatter_backward(g_mean[:1], g_within, x, y, s.count, s.mean)


def test_scatter_stats_validates_its_tensors():
    s = ScatterStats.empty(2, 3)
    with pytest.raises(TypeError, match="must be float64"):
        ScatterStats(s.count.float(), s.mean, s.within)
    with pytest.raises(ValueError, match=r"expected count \[C\], mean \[C, D\]"):
        ScatterStats(s.count, s.mean[:1], s.within)
    assert s.to("cpu").within.dtype == torch.float64


def test_merge_rejects_mismatched_statistics(impl):
    a = ScatterStats.empty(3, 4)
    with pytest.raises(ValueError, match="same number of classes"):
        impl.merge_scatter(a, ScatterStats.empty(2, 4))
    with pytest.raises(TypeError, match="b must be a ScatterStats"):
        impl.merge_scatter(a, (a.count, a.mean, a.within))


def test_state_dict_round_trip(tmp_path):
    x, y = make_features(200, 6, 3, dtype=torch.float64)
    s = ops.class_scatter(x, y, 3)
    torch.save(s.state_dict(), tmp_path / "s.pt")
    back = ScatterStats.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(back.within, s.within) and torch.equal(back.count, s.count)


# ------------------------------------------------------------------------------- autograd and the compiler

def test_gradcheck_class_scatter(impl):
    x, y = make_features(40, 5, 3, dtype=torch.float64, seed=12)
    x.requires_grad_(True)

    def f(x):
        s = impl.class_scatter(x, y, 3)
        return s.mean, s.within

    assert torch.autograd.gradcheck(f, (x,))


def test_gradient_matches_reference():
    x, y = make_features(5000, 20, 4, dtype=torch.float32, seed=13)
    g = torch.randn(20, 20, dtype=torch.float64)
    grads = []
    for impl in (ops, reference):
        xx = x.clone().requires_grad_(True)
        s = impl.class_scatter(xx, y, 4)
        ((s.within * g).sum() + s.mean.pow(2).sum() + s.between().trace()).backward()
        grads.append(xx.grad)
    assert grads[0].dtype == torch.float32
    assert rel_err(grads[0], grads[1]) < F32_TOL


def test_gradcheck_merge_scatter(impl):
    x, y = make_features(60, 4, 3, dtype=torch.float64, seed=14)
    x.requires_grad_(True)

    def f(x):
        s = impl.merge_scatter(impl.class_scatter(x[:25], y[:25], 3), impl.class_scatter(x[25:], y[25:], 3))
        return s.mean, s.within

    assert torch.autograd.gradcheck(f, (x,))


def test_opcheck():
    if not ops.has_kernel("class_scatter", "cpu"):
        pytest.skip("extension not built")
    x, y = make_features(64, 6, 3, dtype=torch.float64, seed=15)
    torch.library.opcheck(torch.ops.gpp_ext.class_scatter.default, (x, y, 3))
    torch.library.opcheck(torch.ops.gpp_ext.class_scatter.default, (x.clone().requires_grad_(True), y, 3))
    a = ops.class_scatter(x[:30], y[:30], 3)
    b = ops.class_scatter(x[30:], y[30:], 3)
    torch.library.opcheck(torch.ops.gpp_ext.merge_scatter.default,
                          (a.count, a.mean, a.within, b.count, b.mean, b.within))
    # non-contiguous statistics: the fake must still describe the kernel's fresh contiguous outputs
    torch.library.opcheck(torch.ops.gpp_ext.merge_scatter.default,
                          (a.count, a.mean.T.contiguous().T, a.within.T, b.count, b.mean, b.within))
    s = ops.class_scatter(x, y, 3)
    torch.library.opcheck(torch.ops.gpp_ext.class_scatter_backward.default,
                          (torch.randn(3, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64), x, y,
                           s.count, s.mean))


def test_torch_compile_fullgraph():
    x, y = make_features(256, 8, 4, seed=16)

    def fisher_loss(x):
        s = ops.class_scatter(x, y, 4)
        return -(s.between().diagonal() / (s.within.diagonal() + 1e-6)).mean()

    compiled = torch.compile(fisher_loss, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), fisher_loss(x), rtol=1e-10)
