"""Kernel benchmarks: for each op, device and shape, rows `impl in {extension, reference, ...}` on the same inputs.

Every row checks its result against an expected value before it is timed. Rows are grouped per op, device and
shape so pytest-benchmark prints them side by side; `benchmarks/run_kernels.py` turns a run into ratios (to the
reference, to the GEMM floor, and CUDA to CPU). CUDA rows synchronise inside the timed region and are skipped
without a GPU. Inputs come from `gpp_ext.testing`, the factories the tests use.
"""

import functools
import os

import pytest
import torch

from gpp_ext import ops, reference
from gpp_ext.testing import make_conv_case, make_features, rel_err

FULL = os.environ.get("GPP_EXT_BENCH", "full") == "full"  # validated in conftest.py
ROUNDS = 5 if FULL else 1
SCATTER_SHAPES = ([(65536, d, c) for d in (256, 512, 1024) for c in (10, 100)] if FULL else [(2048, 64, 10)])
EIGH_SHAPES = [(1, 256), (1, 512), (1, 1024), (8, 256)] if FULL else [(2, 32)]
DISCRIMINANT_SHAPES = ([(d, c) for d in (256, 1024, 2048) for c in (10, 100)] if FULL else [(64, 10)])
UTILITY_SHAPES = [(100, 512), (100, 2048)] if FULL else [(10, 64)]
DECONV_CASES = ({  # name: (batch, c_in, c_out, size, kernel, stride, padding, groups)
    "vgg_conv3x3": (16, 128, 128, 32, 3, 1, 1, 1),
    "strided_conv": (16, 128, 256, 32, 3, 2, 1, 1),
    "depthwise": (16, 256, 256, 16, 3, 1, 1, 256),
    "inception_1x1": (16, 256, 64, 16, 1, 1, 0, 1),
} if FULL else {"small_conv": (2, 8, 16, 8, 3, 1, 1, 1)})
SLICE_CASES = ({  # name: (shape, dim, kept)
    "conv_out": ((512, 512, 3, 3), 0, 256),
    "conv_in": ((512, 512, 3, 3), 1, 256),
    "linear_in": ((4096, 4096), 1, 1024),
} if FULL else {"small": ((16, 8, 3, 3), 1, 4)})

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def run(benchmark, device, fn, *args, rounds=ROUNDS):
    """Times fn(*args) after one warm-up, waiting for the GPU inside the timed region; returns the result."""
    if device == "cuda":
        def timed(*a):
            out = fn(*a)
            torch.cuda.synchronize()
            return out
    else:
        timed = fn
    return benchmark.pedantic(timed, args=args, rounds=rounds, iterations=1, warmup_rounds=1 if FULL else 0)


def setup(benchmark, impl, device, op, shape):
    if impl == "extension" and not ops.has_kernel(op, device):
        pytest.skip(f"no compiled {op} kernel for {device}")
    benchmark.group = f"{op}[{device}] {shape}"


def to(device, *tensors):
    return tuple(t.to(device) for t in tensors)


# -------------------------------------------------------------------------------------------- class_scatter

@functools.lru_cache(maxsize=1)
def scatter_case(n, d, c):
    x, y = make_features(n, d, c, mean=5.0, relu=True, seed=d + c)  # post-ReLU-like features
    return x, y, reference.class_scatter(x, y, c)


@pytest.mark.parametrize("impl", ["extension", "reference", "gemm_floor", "sklearn"])
@pytest.mark.parametrize("n,d,c", SCATTER_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_class_scatter(benchmark, impl, device, n, d, c):
    if impl == "sklearn" and device != "cpu":
        pytest.skip("scikit-learn runs on the CPU")
    setup(benchmark, impl, device, "class_scatter", f"N={n} D={d} C={c}")
    x, y, expected = scatter_case(n, d, c)
    if impl == "sklearn":
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        xn, yn = x.numpy(), y.numpy()
        lda = run(benchmark, device, lambda: LinearDiscriminantAnalysis(
            solver="eigen", store_covariance=True, shrinkage=1e-3).fit(xn, yn), rounds=min(ROUNDS, 2))
        assert rel_err(torch.as_tensor(lda.means_), expected.mean) < 1e-5
        return
    x, y = to(device, x, y)
    if impl == "gemm_floor":  # one float32 X^T X of the same shape: the floor the kernel is held to
        g = run(benchmark, device, lambda x: x.T @ x, x)  # TF32 is off unless the user turned it on
        assert torch.allclose(g[:8, :8].double().cpu(), x[:, :8].double().T.cpu() @ x[:, :8].double().cpu(),
                              rtol=1e-4)
        return
    fn = ops.class_scatter if impl == "extension" else reference.class_scatter
    s = run(benchmark, device, fn, x, y, c)
    assert rel_err(s.within, expected.within) < 3e-5 and rel_err(s.mean, expected.mean) < 1e-10


@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_scatter(benchmark, impl, device):
    n, d, c, parts = (65536, 512, 100, 64) if FULL else (2048, 64, 10, 4)
    setup(benchmark, impl, device, "merge_scatter", f"parts={parts} D={d} C={c}")
    x, y = make_features(n, d, c, dtype=torch.float64, seed=1)
    stats = [ops.class_scatter(x[i::parts], y[i::parts], c).to(device) for i in range(parts)]
    merge = ops.merge_scatter if impl == "extension" else reference.merge_scatter

    def fold():
        acc = stats[0]
        for s in stats[1:]:
            acc = merge(acc, s)
        return acc

    s = run(benchmark, device, fold)
    assert rel_err(s.within, ops.class_scatter(x, y, c).within) < 1e-9


# ------------------------------------------------------------------------------------------ generalized_eigh

@functools.lru_cache(maxsize=1)
def eigh_case(batch, d):
    pairs = []
    for i in range(batch):
        x, y = make_features(4 * d, d, 100, relu=True, seed=i)
        s = ops.class_scatter(x, y, 100)
        pairs.append((s.between(), s.within))
    a = torch.stack([p[0] for p in pairs])
    b = torch.stack([p[1] for p in pairs])
    return a, b, reference.generalized_eigh(a, b, 1e-3)[0]


@pytest.mark.parametrize("impl", ["extension", "reference", "scipy"])
@pytest.mark.parametrize("batch,d", EIGH_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_generalized_eigh(benchmark, impl, device, batch, d):
    if impl == "scipy" and device != "cpu":
        pytest.skip("scipy runs on the CPU")
    setup(benchmark, impl, device, "generalized_eigh", f"batch={batch} D={d}")
    a, b, expected = eigh_case(batch, d)
    if impl == "scipy":
        import numpy as np
        import scipy.linalg

        bp = (b + 1e-3 * b.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] / d * torch.eye(d, dtype=b.dtype))
        an, bn = a.numpy(), bp.numpy()
        w = run(benchmark, device, lambda: np.stack([scipy.linalg.eigh(an[i], bn[i])[0] for i in range(batch)]))
        assert rel_err(torch.as_tensor(w[:, ::-1].copy()), expected) < 1e-8
        return
    a, b = to(device, a, b)
    fn = ops.generalized_eigh if impl == "extension" else reference.generalized_eigh
    values, _ = run(benchmark, device, fn, a, b, 1e-3)
    assert rel_err(values, expected) < 1e-10


# ------------------------------------------------------------------------------------------ discriminants

@functools.lru_cache(maxsize=1)
def discriminant_case(d, c):
    x, y = make_features(max(4 * d, 20 * c), d, c, relu=True, seed=d + c)
    stats = ops.class_scatter(x, y, c)
    return stats, reference.discriminants(stats, None, 1e-3)[0]


@pytest.mark.parametrize("impl", ["extension", "reference", "scipy"])
@pytest.mark.parametrize("d,c", DISCRIMINANT_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_discriminants(benchmark, impl, device, d, c):
    """The top C - 1 discriminants: the rank-aware solve (extension) against the full solves it replaces, ours
    (reference: generalized_eigh, then the first C - 1 pairs) and scipy's sygvd of the same problem."""
    if impl == "scipy" and device != "cpu":
        pytest.skip("scipy runs on the CPU")
    setup(benchmark, impl, device, "discriminants", f"D={d} C={c}")
    stats, expected = discriminant_case(d, c)
    if impl == "scipy":
        import scipy.linalg

        a = stats.between().numpy()
        b = (stats.within + 1e-3 * stats.within.diagonal().sum() / d * torch.eye(d, dtype=torch.float64)).numpy()
        w = run(benchmark, device, lambda: scipy.linalg.eigh(a, b))[0]
        assert rel_err(torch.as_tensor(w[::-1][:c - 1].copy()), expected) < 1e-8
        return
    on = ops.ScatterStats(*to(device, stats.count, stats.mean, stats.within))
    fn = ops.discriminants if impl == "extension" else reference.discriminants
    values, _ = run(benchmark, device, fn, on, None, 1e-3)
    assert rel_err(values, expected) < 1e-10


# --------------------------------------------------------------------------------------------- utilities

@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("c,d", UTILITY_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_discriminant_utility(benchmark, impl, device, c, d):
    setup(benchmark, impl, device, "discriminant_utility", f"D={d} k={c - 1}")
    g = torch.Generator().manual_seed(d)
    values = torch.rand(d, generator=g, dtype=torch.float64).sort(descending=True).values
    vectors = torch.randn(d, d, generator=g, dtype=torch.float64)
    expected = reference.discriminant_utility(values, vectors, c - 1)
    fn = ops.discriminant_utility if impl == "extension" else reference.discriminant_utility
    got = run(benchmark, device, fn, *to(device, values, vectors), c - 1, rounds=ROUNDS * 20)
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("c,d", UTILITY_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", DEVICES)
def test_fisher_utility(benchmark, impl, device, c, d):
    setup(benchmark, impl, device, "fisher_utility", f"C={c} D={d}")
    x, y = make_features(2 * d, d, c, seed=c)
    s = ops.class_scatter(x, y, c)
    expected = reference.fisher_utility(s)
    fn = ops.fisher_utility if impl == "extension" else reference.fisher_utility
    assert rel_err(run(benchmark, device, fn, s.to(device), rounds=ROUNDS * 20), expected) < 1e-12


# --------------------------------------------------------------------------------- deconv and slicing

@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("case", list(DECONV_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_deconv_backproject(benchmark, impl, device, case):
    batch, c_in, c_out, size, kernel, stride, padding, groups = DECONV_CASES[case]
    setup(benchmark, impl, device, "deconv_backproject", f"{case} {DECONV_CASES[case]}")
    signal, weight, shape = make_conv_case(batch, c_in, c_out, size, kernel, stride=stride, padding=padding,
                                           groups=groups)
    expected = reference.deconv_backproject(signal, weight, stride, padding, 1, groups, shape)
    fn = ops.deconv_backproject if impl == "extension" else reference.deconv_backproject
    got = run(benchmark, device, fn, *to(device, signal, weight), stride, padding, 1, groups, shape,
              rounds=ROUNDS * 4)
    assert rel_err(got, expected) < (1e-5 if device == "cpu" else 2e-3)  # cuDNN may use TF32 by default


@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("case", list(SLICE_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_slice_channels(benchmark, impl, device, case):
    shape, dim, kept = SLICE_CASES[case]
    setup(benchmark, impl, device, "slice_channels", f"{case} {shape} dim={dim} keep={kept}")
    t = torch.randn(shape)
    index = torch.randperm(shape[dim], generator=torch.Generator().manual_seed(0))[:kept].sort().values
    fn = ops.slice_channels if impl == "extension" else reference.slice_channels
    got = run(benchmark, device, fn, *to(device, t), dim, index.to(device), rounds=ROUNDS * 10)
    assert torch.equal(got.cpu(), t.index_select(dim, index))
