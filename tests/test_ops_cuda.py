"""CUDA kernels against float64 references (skipped without a GPU).

Tolerances. class_scatter on CUDA multiplies centred rows in float32 (TF32 off) over blocks of 16384 rows,
accumulated in float64: ~sqrt(16384)·eps32 ≈ 8e-6 relative, held to 3e-5; float64 inputs to 1e-10. The other
ops compute in float64 on both devices and differ only in summation order: 1e-10 (deconv_backproject is
tested in float64, where cuDNN has no TF32 mode).
"""

import pytest
import torch

from gpp_ext import ops, reference
from gpp_ext.testing import make_conv_case, make_features, make_scatter_pair, rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not ops.has_kernel("class_scatter", "cuda"):
        pytest.skip("extension built without CUDA kernels (GPP_EXT_CUDA=0)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n,d,c", [(70000, 96, 10), (3000, 300, 100), (100, 20, 7)])
def test_class_scatter_matches_float64(dtype, tol, n, d, c):
    x, y = make_features(n, d, c, mean=100.0, dtype=dtype, seed=d)
    got = ops.class_scatter(x.cuda(), y.cuda(), c)
    ref = reference.class_scatter(x.double(), y, c)
    assert got.mean.is_cuda and got.within.dtype == torch.float64
    assert torch.equal(got.count.cpu(), ref.count)
    assert rel_err(got.mean, ref.mean) < 1e-12
    assert rel_err(got.within, ref.within) < tol


def test_class_scatter_tf32_stays_off():
    x, y = make_features(20000, 64, 10, mean=1e3, seed=1)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = ops.class_scatter(x.cuda(), y.cuda(), 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert rel_err(got.within, reference.class_scatter(x.double(), y, 10).within) < 3e-5


def test_class_scatter_edge_cases_and_errors():
    empty = ops.class_scatter(torch.empty(0, 4, device="cuda"), torch.empty(0, dtype=torch.long, device="cuda"), 3)
    assert not empty.within.any() and empty.count.shape == (3,)
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], device="cuda")
    s = ops.class_scatter(x, torch.tensor([0, 2], device="cuda"), 4)
    assert s.count.tolist() == [1, 0, 1, 0] and not s.within.any()
    with pytest.raises(ValueError, match="y must hold labels"):
        ops.class_scatter(x, torch.tensor([0, 4], device="cuda"), 4)
    with pytest.raises(ValueError, match="x must be finite"):
        ops.class_scatter(torch.tensor([[float("nan"), 1.0]], device="cuda"), torch.tensor([0], device="cuda"), 1)
    with ops.data_checks(False):  # no sync: the bad label is ignored instead of reported
        s = ops.class_scatter(x, torch.tensor([0, 9], device="cuda"), 4)
    assert s.count.tolist() == [1, 0, 0, 0]


def test_class_scatter_is_deterministic_and_differentiable(monkeypatch):
    """Our kernels use no atomics; cuBLAS needs its documented workspace setting to be deterministic, and torch
    raises a clear error naming it when deterministic algorithms are on without it."""
    x, y = make_features(30000, 64, 10, seed=2)
    x, y = x.cuda(), y.cuda()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        a, b = ops.class_scatter(x, y, 10), ops.class_scatter(x, y, 10)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a.within, b.within) and torch.equal(a.mean, b.mean)
    g = torch.randn(64, 64, dtype=torch.float64, device="cuda")
    grads = []
    for xx in (x.clone().requires_grad_(True), x.cpu().requires_grad_(True)):
        s = ops.class_scatter(xx, y.to(xx.device), 10)
        ((s.within * g.to(xx.device)).sum() + s.mean.square().sum()).backward()
        grads.append(xx.grad.cpu())
    assert rel_err(grads[0], grads[1]) < 3e-5


def test_merge_scatter_matches_cpu():
    x, y = make_features(5000, 40, 6, dtype=torch.float64, seed=3)
    a, b = ops.class_scatter(x[:1234], y[:1234], 6), ops.class_scatter(x[1234:], y[1234:], 6)
    got = ops.merge_scatter(a.to("cuda"), b.to("cuda"))
    ref = reference.merge_scatter(a, b)
    assert rel_err(got.within, ref.within) < 1e-12 and rel_err(got.mean, ref.mean) < 1e-12


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_discriminants_matches_cpu(ridge):
    x, y = make_features(3000, 96, 12, dtype=torch.float64, seed=5)
    stats = ops.class_scatter(x, y, 12)
    on = ops.ScatterStats(stats.count.cuda(), stats.mean.cuda(), stats.within.cuda())
    got = ops.discriminants(on, ridge=ridge)
    ref = ops.discriminants(stats, ridge=ridge)
    assert got[0].is_cuda and got[1].shape == (96, 11)
    assert rel_err(got[0], ref[0]) < 1e-10
    assert rel_err(got[1], ref[1]) < 1e-8  # well-separated discriminants: the same vectors, signs fixed
    with pytest.raises(ValueError, match="stats.within"):  # no within-class variance at all: singular
        ops.discriminants(ops.ScatterStats(on.count, on.mean, on.within * 0))


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_generalized_eigh_matches_cpu(ridge):
    a, b = make_scatter_pair(64, batch=(3,), rank=9, seed=4)
    got = ops.generalized_eigh(a.cuda(), b.cuda(), ridge)
    ref = reference.generalized_eigh(a, b, ridge)
    assert got[0].is_cuda
    assert rel_err(got[0], ref[0]) < 1e-10
    assert rel_err(got[1][..., :9], ref[1][..., :9]) < 1e-8  # the non-degenerate discriminants


def test_utilities_match_cpu():
    a, b = make_scatter_pair(50, batch=(2,), rank=7, seed=5)
    values, vectors = reference.generalized_eigh(a, b)
    got = ops.discriminant_utility(values.cuda(), vectors.cuda(), 7)
    assert rel_err(got, reference.discriminant_utility(values, vectors, 7)) < 1e-12
    x, y = make_features(3000, 50, 7, dtype=torch.float64, seed=6, relu=True)
    s = ops.class_scatter(x, y, 7)
    assert rel_err(ops.fisher_utility(s.to("cuda")), reference.fisher_utility(s)) < 1e-12


@pytest.mark.parametrize("case", [(16, 32, 15, 3, 2, 1, 1), (8, 8, 14, 3, 1, 1, 8), (6, 12, 9, 1, 1, 0, 1)])
def test_deconv_backproject_matches_cpu(case):
    c_in, c_out, size, kernel, stride, padding, groups = case
    signal, weight, shape = make_conv_case(3, c_in, c_out, size, kernel, stride=stride, padding=padding,
                                           groups=groups, dtype=torch.float64)
    got = ops.deconv_backproject(signal.cuda(), weight.cuda(), stride, padding, 1, groups, shape)
    assert rel_err(got, reference.deconv_backproject(signal, weight, stride, padding, 1, groups, shape)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool, torch.complex128])
def test_slice_channels_matches_index_select(dtype):
    t = torch.randint(0, 2, (8, 6, 5, 3)).to(dtype).cuda()
    for dim in range(4):
        index = torch.tensor([t.shape[dim] - 1, 0, 1, 1], device="cuda")
        assert torch.equal(ops.slice_channels(t, dim, index), t.index_select(dim, index))
    with pytest.raises(ValueError, match=r"index must hold entries in \[0, 8\)"):
        ops.slice_channels(t, 0, torch.tensor([8], device="cuda"))


def test_every_op_has_a_cuda_kernel():
    for name in ("class_scatter", "class_scatter_backward", "merge_scatter", "generalized_eigh", "discriminants",
                 "discriminant_utility", "fisher_utility", "deconv_backproject", "slice_channels"):
        assert ops.has_kernel(name, "cuda"), name
