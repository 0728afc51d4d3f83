"""Property-based tests (hypothesis): every op against its `gpp_ext.reference` on random shapes, dtypes, strides
and label patterns, and `ChannelGraph.prune` on random small conv nets.

Reproducibility: every test runs with `derandomize=True` (the examples are a fixed function of the test, the
same on every machine and run) and `database=None` (no `.hypothesis/` directory, so no run replays failures
saved by an earlier one); `GPP_PROPERTY_SCALE=10` runs ten times as many fresh random examples instead (a
longer local search). Tensors are drawn as a seed for `torch.Generator` plus sizes, so examples are cheap to
make and shrink towards small shapes and seed 0. A failure prints the falsifying example; paste it into
`@example(...)` to keep it as a regression. Note that the derandomized examples depend on each test's source:
editing a test changes which examples it runs.

Tolerances (each stated where it is used) are bounds of the rounding the two implementations may differ by:
same algorithm, different summation order or precision of an intermediate, never "whatever passes".
"""

import math
import os
import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from gpp_ext import ScatterStats, _checks, ops, reference
from gpp_ext.pruning import ChannelGraph

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


# GPP_PROPERTY_SCALE=k runs k times as many examples, freshly random (not derandomized): a longer local search.
SCALE = int(os.environ.get("GPP_PROPERTY_SCALE", "1"))


def fast(n):
    """Settings of every test here: n examples, no deadline (2 busy cores), reproducible (see the docstring)."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2 ** 16)
LAYOUTS = ["contiguous", "transposed", "stepped", "offset"]


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout: column-major, every other element of a larger buffer,
    or at a storage offset. None of these is contiguous except "offset"'s (which is not at offset 0)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.mT.contiguous().mT
    if layout in ("stepped", "transposed"):
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device) if t.dim() else None
        if big is None:
            return t
        big[..., 1::2] = t
        return big[..., 1::2]
    if layout == "offset" and t.dim():
        big = torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype, device=t.device)
        big[1:] = t
        return big[1:]
    return t


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close(got, ref, atol, what=""):
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    same_inf = torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[torch.isinf(got)],
                                                                                 ref[torch.isinf(ref)])
    assert same_inf, (what, got, ref)
    finite = torch.isfinite(ref)
    err = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= atol, f"{what}: max error {err:.3e} > tolerance {atol:.3e}"


# ------------------------------------------------------------------------------------------------- scatter

@st.composite
def labelled(draw, max_n=48, max_d=7):
    """(x, y, C): features with a label pattern, a layout and (float32 stability) possibly a large mean."""
    dtype = draw(dtypes)
    n = draw(st.integers(0, max_n))
    d = draw(st.integers(1, max_d))
    pattern = draw(st.sampled_from(["random", "one class", "all in one", "empty classes"]))
    c = 1 if pattern == "one class" else draw(st.integers(2, 6))
    g = gen(draw(seeds))
    if pattern == "all in one":
        y = torch.full((n,), draw(st.integers(0, c - 1)), dtype=torch.long)
    elif pattern == "empty classes":  # labels from a strict subset of the classes
        present = torch.randperm(c, generator=g)[: draw(st.integers(1, c - 1))]
        y = present[torch.randint(0, present.numel(), (n,), generator=g)]
    else:
        y = torch.randint(0, c, (n,), generator=g)
    mean = draw(st.sampled_from([0.0, 0.0, 1e3, 1e4]))  # 1e4 with unit spread: the float32 cancellation case
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + mean).to(dtype)
    x = laid_out(x, draw(st.sampled_from(LAYOUTS)))
    y = laid_out(y.to(draw(st.sampled_from([torch.int64, torch.int32]))), draw(st.sampled_from(["contiguous",
                                                                                                 "stepped"])))
    return x, y, c


def within_tolerance(x, ref: ScatterStats) -> float:
    # The reference is float64 from the exact float64 values of x. The kernel centres each row by the float64
    # class mean, then (float32 x) multiplies the centred rows rounded to float32: per entry an error of at
    # most (N + 2)·eps32·sqrt(w_ii·w_jj) <= (N + 2)·eps32·max diag(S_w) (a dot product of N terms, plus the
    # rounding of both factors); float64 x the same with eps64. The class means may differ by a few eps·|mean|
    # between the two summation orders, which cancels to first order in the centred Gram product. Factor 2 margin.
    n = x.shape[0]
    kernel_eps = EPS[x.dtype]
    return 2 * (n + 2) * kernel_eps * ref.within.diagonal().abs().max().item() + 1e-300


def mean_tolerance(x) -> float:
    # Both sum float32/float64 values in float64, in different orders: N·eps64·max|x| bounds the difference.
    return 2 * (x.shape[0] + 1) * EPS[torch.float64] * (x.abs().max().item() if x.numel() else 0.0) + 1e-300


@pytest.mark.parametrize("device", DEVICES)
@fast(30)
@given(case=labelled())
def test_class_scatter_matches_reference(device, case):
    x, y, c = case
    got = ops.class_scatter(x.to(device), y.to(device), c)
    ref = reference.class_scatter(x, y, c)
    assert got.count.dtype == got.mean.dtype == got.within.dtype == torch.float64
    assert torch.equal(got.count.cpu(), ref.count)  # counts are exact
    assert_close(got.mean, ref.mean, mean_tolerance(x), "mean")
    assert_close(got.within, ref.within, within_tolerance(x, ref), "within")
    assert torch.equal(got.within.cpu(), got.within.cpu().T)  # symmetric, exactly
    if c > 1 and x.shape[0]:
        empty = ref.count == 0
        assert (got.mean.cpu()[empty] == 0).all()  # an absent class has mean 0


def _stats_laid_out(s: ScatterStats, layout: str) -> ScatterStats:
    return ScatterStats(laid_out(s.count, "stepped" if layout != "contiguous" else layout),
                        laid_out(s.mean, layout), laid_out(s.within, layout))


@pytest.mark.parametrize("device", DEVICES)
@fast(25)
@given(case=labelled(), cut=st.floats(0, 1), layout=st.sampled_from(LAYOUTS))
def test_merge_scatter_of_a_split_is_the_whole(device, case, cut, layout):
    x, y, c = case
    k = int(round(cut * x.shape[0]))
    a = _stats_laid_out(reference.class_scatter(x[:k], y[:k], c), layout)
    b = _stats_laid_out(reference.class_scatter(x[k:], y[k:], c), layout)
    whole = reference.class_scatter(x, y, c)
    got = ops.merge_scatter(a.to(device), b.to(device))
    ref = reference.merge_scatter(a, b)
    assert torch.equal(got.count.cpu(), whole.count)
    # merge vs reference merge: the same formula on float64 statistics, up to a few eps64 of their magnitude
    scale = whole.within.abs().max().item() + whole.mean.abs().max().item() ** 2 * max(x.shape[0], 1)
    assert_close(got.mean, ref.mean, 8 * EPS[torch.float64] * (whole.mean.abs().max().item() + 1e-300), "mean")
    assert_close(got.within, ref.within, 16 * EPS[torch.float64] * scale + 1e-300, "within")
    # and Chan's formula against the statistics of the concatenation: the reference's own float64 rounding,
    # N·eps64 of the uncentred magnitude (the merge adds n_a·n_b/n·(m_a - m_b)² terms of size ~ N·mean²)
    assert_close(got.within, whole.within, 4 * (x.shape[0] + 2) * EPS[torch.float64] * scale + 1e-300, "whole")
    flipped = ops.merge_scatter(b.to(device), a.to(device))  # commutative
    assert_close(flipped.within, got.within, 16 * EPS[torch.float64] * scale + 1e-300, "commuted")


# ------------------------------------------------------------------------------------- generalized_eigh

@st.composite
def eigh_pairs(draw):
    """(a, b, ridge, log10 cond(b)): a PSD `a` of random rank, an SPD `b` with a planted condition number
    below the op's limit, random batch, dead dimensions and layout."""
    dtype = draw(dtypes)
    d = draw(st.integers(1, 7))
    batch = draw(st.sampled_from([(), (2,), (2, 2)]))
    rank = draw(st.integers(0, d))
    # float64: up to 1e8 (eigenvalues good to ~1e-8); float32: up to 1e3 (below its 8.4e3 limit)
    log_cond = draw(st.floats(0, 8 if dtype == torch.float64 else 3))
    ridge = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]))
    n_dead = draw(st.integers(0, min(2, d - 1)))
    g = gen(draw(seeds))
    f = torch.randn(*batch, d, rank, generator=g, dtype=torch.float64)
    a = f @ f.mT
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -log_cond, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    b = (q * spectrum.unsqueeze(-2)) @ q.mT
    b = 0.5 * (b + b.mT) * draw(st.sampled_from([1.0, 1e-4, 1e4]))
    dead = torch.randperm(d, generator=g)[:n_dead]
    for m in (a, b):
        m[..., dead, :] = 0
        m[..., :, dead] = 0
    a, b = a.to(dtype), b.to(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    return laid_out(a, layout), laid_out(b, layout), ridge, log_cond, dead


def ridged(b, ridge):
    d = b.shape[-1]
    shift = ridge * b.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    return b + shift[..., None, None] * torch.eye(d, dtype=b.dtype)


@pytest.mark.parametrize("device", DEVICES)
@fast(40)
@given(case=eigh_pairs())
def test_generalized_eigh_matches_reference_and_scipy(device, case):
    a, b, ridge, log_cond, dead = case
    values, vectors = ops.generalized_eigh(a.to(device), b.to(device), ridge)
    ref_values, ref_vectors = reference.generalized_eigh(a, b, ridge)
    assert values.dtype == vectors.dtype == a.dtype and values.shape == a.shape[:-1]
    # Tolerance, relative to the largest |eigenvalue|: both solve in float64 and differ by ~cond·eps64 (the
    # float64 rounding of the solve, measured 0.05-0.2·cond·eps64), times 10·D margin; a float32 result is
    # rounded to float32 on top (2 eps32 covers one rounding of each).
    cond = 10 ** log_cond * (1 + 1e-9)
    scale = ref_values.double().abs().max().item() + 1e-300
    tol = (10 * a.shape[-1] * cond * EPS[torch.float64] + (2 * EPS[torch.float32] if a.dtype == torch.float32
                                                            else 0.0)) * scale
    assert_close(values, ref_values, tol, "ops vs reference")
    # An independent oracle: scipy (LAPACK sygvd) on the live block of each matrix in float64; the dead
    # dimensions add eigenvalues 0.
    d = a.shape[-1]
    live = [i for i in range(d) if i not in set(dead.tolist())]
    a64, b64 = a.double().reshape(-1, d, d), ridged(b.double(), ridge).reshape(-1, d, d)
    got = values.double().cpu().reshape(-1, d)
    for i in range(a64.shape[0]):
        w = scipy.linalg.eigh(a64[i][np.ix_(live, live)].numpy(), b64[i][np.ix_(live, live)].numpy(),
                              eigvals_only=True)
        w = np.sort(np.concatenate([w, np.zeros(d - len(live))]))[::-1].copy()
        assert_close(got[i], torch.from_numpy(w), tol, f"scipy, entry {i}")
    # the eigenvectors solve the problem and are b'-orthonormal (in float64 from the returned vectors, whose
    # float32 rounding contributes eps32·cond relative)
    e = vectors.double().cpu()
    bp = ridged(b.double(), ridge)
    for j in dead.tolist():  # a dead dimension's eigenvector is its coordinate vector, scaled to b'_jj = 1
        bjj = bp[..., j, j]
        expected = torch.where(bjj > 0, bjj.clamp_min(1e-300).rsqrt(), torch.ones_like(bjj))
        assert torch.allclose(e[..., j, :].abs().amax(-1), expected.to(e.dtype), rtol=1e-6)
    if len(live) == d:
        vec_tol = 100 * d * cond * (EPS[a.dtype])
        gram = e.mT @ bp @ e
        assert (gram - torch.eye(d, dtype=torch.float64)).abs().max() < vec_tol
        residual = a.double() @ e - bp @ e * values.double().cpu().unsqueeze(-2)
        norm = (a.double().abs().amax() + scale * bp.abs().amax()) * e.abs().amax()
        assert residual.abs().max() <= vec_tol * norm + 1e-300
    pivot = e.abs().argmax(-2, keepdim=True)
    assert (e.gather(-2, pivot) >= 0).all()  # the sign convention


@st.composite
def risky_pairs(draw):
    """Pairs near and past the limits: a planted tiny eigenvalue in b (cond 1..1e18) and an asymmetry of
    relative size 0 or 10^-17..10^-1."""
    dtype = draw(dtypes)
    d = draw(st.integers(2, 6))
    batch = draw(st.sampled_from([(), (3,)]))
    g = gen(draw(seeds))
    f = torch.randn(*batch, d, d, generator=g, dtype=torch.float64)
    a = f @ f.mT
    q, _ = torch.linalg.qr(torch.randn(*batch, d, d, generator=g, dtype=torch.float64))
    log_cond = draw(st.floats(0, 18))
    spectrum = torch.ones(d, dtype=torch.float64)
    spectrum[0] = 10 ** -log_cond
    b = (q * spectrum) @ q.mT
    b = 0.5 * (b + b.mT)
    which = draw(st.sampled_from(["none", "a", "b"]))
    skew = draw(st.sampled_from([0.0, 1e-17, 1e-15, 1e-13, 1e-11, 1e-8, 1e-5, 1e-3, 1e-1]))
    if which != "none" and skew:
        m = a if which == "a" else b
        noise = torch.randn(*batch, d, d, generator=g, dtype=torch.float64).triu(1)
        m += skew * m.abs().amax((-2, -1), keepdim=True) * noise
    ridge = draw(st.sampled_from([0.0, 0.0, 1e-12, 1e-6, 1e-3]))
    return a.to(dtype), b.to(dtype), ridge


def _outcome(impl, a, b, ridge):
    try:
        return impl.generalized_eigh(a, b, ridge)
    except ValueError as error:
        return error


@fast(60)
@given(case=risky_pairs())
def test_generalized_eigh_checks_agree_and_hold_their_promise(case):
    """ops and reference raise alike (same message) or agree; they raise only for a reason that holds, and what
    they accept is within the stated limits (symmetric to 1024 eps, cond(b + ridge) <= 1e-3/eps(b.dtype) up to
    the estimate's lag), with eigenvalues that match scipy's to the cond·eps64 the float64 solve promises."""
    a, b, ridge = case
    got, ref = _outcome(ops, a, b, ridge), _outcome(reference, a, b, ridge)
    assert isinstance(got, ValueError) == isinstance(ref, ValueError), (got, ref)
    a64, b64 = a.double(), b.double()
    # the quantities the checks bound, computed independently: per matrix, then the worst of the batch
    asym = max(((m - m.mT).abs().amax((-2, -1)) / m.abs().amax((-2, -1))).max().item() for m in (a64, b64))
    ev = torch.linalg.eigvalsh(ridged(0.5 * (b64 + b64.mT), ridge))
    true_cond = torch.where(ev[..., 0] > 0, ev[..., -1] / ev[..., 0].clamp_min(1e-300),
                            torch.full_like(ev[..., 0], math.inf)).max().item()
    limit = _checks.max_condition(b.dtype)
    event("raised: " + str(got).split(":")[1].strip()[:40] if isinstance(got, ValueError) else "accepted")
    if isinstance(got, ValueError):
        assert str(got) == str(ref)
        message = str(got)
        assert message.startswith("generalized_eigh: ")
        # raised only for a reason that holds: an asymmetry past the tolerance, or a b + ridge whose true
        # condition number is past the limit (the estimate is a lower bound; eigvalsh's own λ_min is accurate to
        # eps64·λ_max, i.e. to 1e-3 relative at the float64 limit: 1% slack)
        if "must be symmetric" in message:
            assert asym > _checks.symmetry_tolerance(a.dtype)
        else:
            assert "ridge" in message and asym <= _checks.symmetry_tolerance(a.dtype)
            assert true_cond > 0.99 * limit, (true_cond, limit, message)
        return
    assert asym <= _checks.symmetry_tolerance(a.dtype)
    # accepted: the true condition number may exceed the limit only as far as the lower-bound estimate lags
    # (at most a factor 10·D, see test_condition_estimate_is_a_lower_bound_within_a_factor_d)
    assert true_cond <= limit * a.shape[-1] * 10, (true_cond, limit)
    values = got[0].double()
    # same algorithm on the same float64 data: cond·eps64 (times 10·D) plus the final rounding to the dtype; and
    # scipy (float64 sygvd on the symmetrised, ridged pair) to the same bound
    tol = (10 * a.shape[-1] * true_cond * EPS[torch.float64] + 2 * EPS[a.dtype]) * values.abs().max().item()
    assert_close(values, ref[0].double(), tol, "ops vs reference")
    d = a.shape[-1]
    pairs = zip((0.5 * (a64 + a64.mT)).reshape(-1, d, d), ridged(0.5 * (b64 + b64.mT), ridge).reshape(-1, d, d))
    w = torch.stack([torch.from_numpy(scipy.linalg.eigh(x.numpy(), y.numpy(), eigvals_only=True)[::-1].copy())
                     for x, y in pairs])
    assert_close(values.reshape(-1, d), w, tol, "scipy")


@fast(40)
@given(d=st.integers(1, 12), seed=seeds, log_cond=st.floats(0, 15), kind=st.sampled_from(["planted", "graded",
                                                                                           "collinear"]))
def test_condition_estimate_is_a_lower_bound_within_a_factor_d(d, seed, log_cond, kind):
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    if kind == "planted":
        spectrum = torch.ones(d, dtype=torch.float64)
        spectrum[0] = 10 ** -log_cond
    elif kind == "graded":
        spectrum = torch.logspace(0, -log_cond, d, dtype=torch.float64)
    else:  # two nearly collinear features on top of a well-conditioned rest
        spectrum = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
        q = torch.eye(d, dtype=torch.float64)
    b = (q * spectrum) @ q.T
    if kind == "collinear" and d > 1:
        b[1] = b[0] * (1 - 10 ** -log_cond)
        b[:, 1] = b[:, 0] * (1 - 10 ** -log_cond)
        b[1, 1] = b[0, 0] * (1 - 10 ** -log_cond) ** 2 + spectrum[1] * 10 ** -log_cond
    b = 0.5 * (b + b.T)
    ev = torch.linalg.eigvalsh(b)
    assume(ev[0] > 1e3 * EPS[torch.float64] * ev[-1])  # the "true" value is itself accurate
    chol = torch.linalg.cholesky(b)
    high, low = _checks._condition_estimate(b[None], chol[None])
    estimate, true = (high / low).item(), (ev[-1] / ev[0]).item()
    # a lower bound in exact arithmetic; in float64 both it and eigvalsh's λ_min carry ~cond·eps64 relative error
    assert estimate <= true * (1 + 10 * d * true * EPS[torch.float64] + 1e-9)
    assert estimate >= true / (10 * d)


# ------------------------------------------------------------------------------------------- utilities

@pytest.mark.parametrize("device", DEVICES)
@fast(30)
@given(dtype=dtypes, d=st.integers(0, 9), batch=st.sampled_from([(), (3,), (2, 2)]), seed=seeds,
       k=st.one_of(st.none(), st.integers(0, 9)), layout=st.sampled_from(LAYOUTS))
def test_discriminant_utility_matches_reference(device, dtype, d, batch, seed, k, layout):
    assume(k is None or k <= d)
    g = gen(seed)
    values = torch.randn(*batch, d, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    vectors = torch.randn(*batch, d, d, generator=g, dtype=torch.float64)
    if d:
        vectors[..., :, 0] = 0  # a zero column: its weight is 0, not NaN
    values, vectors = laid_out(values.to(dtype), layout), laid_out(vectors.to(dtype), layout)
    got = ops.discriminant_utility(values.to(device), vectors.to(device), k)
    ref = reference.discriminant_utility(values, vectors, k)
    # float64 sums of k <= 9 non-negative terms in another order: (k + 2)·eps64 relative per entry; float32 results
    # are rounded once more (eps32)
    tol = ((k if k is not None else d) + 2) * EPS[torch.float64] + (EPS[torch.float32] if dtype == torch.float32
                                                                     else 0.0)
    assert got.dtype == ref.dtype == dtype
    assert_close(got, ref, tol * (ref.abs().max().item() if ref.numel() else 0.0) + 1e-300)


@pytest.mark.parametrize("device", DEVICES)
@fast(30)
@given(case=labelled(), eps=st.sampled_from([0.0, 1e-6, 1e-2]), layout=st.sampled_from(LAYOUTS))
def test_fisher_utility_matches_reference(device, case, eps, layout):
    x, y, c = case
    stats = _stats_laid_out(reference.class_scatter(x, y, c), layout)
    got = ops.fisher_utility(stats.to(device), eps)
    ref = reference.fisher_utility(stats, eps)
    # a ratio of float64 sums of <= C + D terms computed in another order: ~(C + D)·eps64 relative per entry;
    # inf (between-class scatter without any within-class) and 0 (no variance) must match exactly
    tol = 4 * (c + x.shape[1] + 2) * EPS[torch.float64]
    finite = torch.isfinite(ref)
    assert_close(got, ref, tol * (ref[finite].abs().max().item() if finite.any() else 0.0) + 1e-300)


# ------------------------------------------------------------------------------------------------ deconv

@st.composite
def conv_cases(draw):
    dtype = draw(dtypes)
    dims = draw(st.sampled_from([0, 1, 2]))  # 0: a linear weight
    g = gen(draw(seeds))
    batch = draw(st.integers(1, 3))
    if dims == 0:
        out_f, in_f = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        return (torch.randn(batch, out_f, generator=g, dtype=torch.float64).to(dtype),
                torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype), dict())
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride, padding, dilation = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    size = draw(st.integers(dilation * (kernel - 1) + 1, 9))
    conv = (F.conv1d, F.conv2d)[dims - 1]
    shape = (batch, c_in, *([size] * dims))
    weight = torch.randn(c_out, c_in // groups, *([kernel] * dims), generator=g, dtype=torch.float64)
    out = conv(torch.zeros(shape, dtype=torch.float64), weight, None, stride, padding, dilation, groups)
    assume(out.numel() > 0)
    signal = torch.randn(out.shape, generator=g, dtype=torch.float64)
    sizes = draw(st.sampled_from(["spatial", "full", "none"]))
    output_size = {"spatial": list(shape[2:]), "full": torch.Size(shape), "none": None}[sizes]
    return signal.to(dtype), weight.to(dtype), dict(stride=stride, padding=padding, dilation=dilation,
                                                    groups=groups, output_size=output_size)


@pytest.mark.parametrize("device", DEVICES)
@fast(30)
@given(case=conv_cases(), layout=st.sampled_from(LAYOUTS))
def test_deconv_backproject_matches_reference(device, case, layout):
    signal, weight, kw = case
    signal, weight = laid_out(signal, layout), laid_out(weight, layout)
    if device == "cuda" and signal.dtype == torch.float32:
        signal, weight = signal.double(), weight.double()  # cuDNN may use TF32 for float32 convolutions
    try:
        ref = reference.deconv_backproject(signal, weight, **kw)
    except ValueError as error:  # without output_size, padding can leave the minimal output empty: both refuse
        assert kw.get("output_size") is None and "empty output" in str(error)
        with pytest.raises(ValueError, match=re.escape(str(error))):
            ops.deconv_backproject(signal.to(device), weight.to(device), **kw)
        return
    got = ops.deconv_backproject(signal.to(device), weight.to(device), **kw)
    # Each output is a sum of at most C_out·k^dims products, in another order: |error| <= K·eps·(|s| *^T |w|),
    # the same back-projection of the absolute values (K the number of terms), with a factor 2 margin.
    bound = reference.deconv_backproject(signal.abs(), weight.abs(), **kw).double()
    terms = weight.shape[0] * math.prod(weight.shape[2:])
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = (got.cpu().double() - ref.double()).abs()
    assert (err <= 2 * (terms + 1) * EPS[signal.dtype] * bound + 1e-300).all(), err.max()


# ------------------------------------------------------------------------------------------------- slice

SLICE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@pytest.mark.parametrize("device", DEVICES)
@fast(40)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=seeds, data=st.data(),
       dtype=st.sampled_from(SLICE_DTYPES), layout=st.sampled_from(LAYOUTS), as_list=st.booleans())
def test_slice_channels_is_index_select(device, shape, seed, data, dtype, layout, as_list):
    g = gen(seed)
    t = laid_out(torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=g).to(dtype), layout)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), "dim")
    index = data.draw(st.lists(st.integers(0, shape[dim] - 1), max_size=7), "index")  # any order, repeats
    arg = index if as_list else laid_out(torch.tensor(index, dtype=torch.long), "stepped").to(device)
    got = ops.slice_channels(t.to(device), dim, arg)
    expected = t.index_select(dim, torch.tensor(index, dtype=torch.long))
    assert got.is_contiguous() and got.dtype == t.dtype
    assert torch.equal(got.cpu(), expected)  # a copy: exact
    assert torch.equal(reference.slice_channels(t, dim, index), expected)


# ---------------------------------------------------------------------------------------------- pruning

class RandomNet(nn.Module):
    """conv + BN + ReLU layers of random widths (some followed by a max-pool); optionally a residual block
    (couples two producers through an add), a two-branch concat, and an add of a 1x1 conv onto the concat (a
    sum of differently concatenated sources, which the graph freezes); then pooling, an optional hidden linear
    layer and a linear head. `spec` fixes the architecture (static control flow, so torch.fx traces it)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        c = spec["in_channels"]
        self.layers = nn.ModuleList()
        for width, pool in zip(spec["widths"], spec["pools"]):
            self.layers.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=spec["bias"]),
                                             nn.BatchNorm2d(width), nn.ReLU(),
                                             nn.MaxPool2d(2, ceil_mode=True) if pool else nn.Identity()))
            c = width
        if spec["residual"]:
            self.res = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                     nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        if spec["concat"]:
            left, right = spec["concat"]
            self.left = nn.Sequential(nn.Conv2d(c, left, 1), nn.BatchNorm2d(left), nn.ReLU())
            self.right = nn.Sequential(nn.Conv2d(c, right, 3, padding=1), nn.ReLU())
            if spec["mix"]:
                self.mix = nn.Conv2d(c, left + right, 1)
            c = left + right
        self.pool = nn.AdaptiveAvgPool2d(spec["pool"]) if spec["pool"] else nn.Identity()
        self.eval()  # probe the flattened width without touching the BatchNorm statistics
        with torch.no_grad():
            features = self.body(torch.zeros(1, spec["in_channels"], spec["size"], spec["size"])).shape[1]
        hidden = spec["hidden"]
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or features, spec["classes"])

    def body(self, x):
        for layer in self.layers:
            x = layer(x)
        if self.spec["residual"]:
            x = F.relu(x + self.res(x))
        if self.spec["concat"]:
            y = torch.cat([self.left(x), self.right(x)], 1)
            x = y + self.mix(x) if self.spec["mix"] else y
        return torch.flatten(self.pool(x), 1)

    def forward(self, x):
        return self.head(self.hidden(self.body(x)))


@st.composite
def nets(draw):
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    spec = dict(in_channels=draw(st.integers(1, 3)), widths=widths,
                pools=draw(st.lists(st.booleans(), min_size=len(widths), max_size=len(widths))),
                bias=draw(st.booleans()), residual=draw(st.booleans()),
                concat=draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4)))),
                mix=draw(st.booleans()), pool=draw(st.sampled_from([0, 1, 2])), size=draw(st.sampled_from([4, 6])),
                hidden=draw(st.sampled_from([0, 0, 5])), classes=draw(st.integers(2, 4)))
    torch.manual_seed(draw(seeds))
    model = RandomNet(spec)
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters, as in test_graph.py
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval(), torch.randn(3, spec["in_channels"], spec["size"], spec["size"])


@fast(20)
@given(net=nets(), data=st.data())
def test_pruning_random_nets_equals_zeroing_the_removed_channels(net, data):
    model, x = net
    graph = ChannelGraph(model, x)
    assert graph.groups, "a conv layer before the head is always prunable"
    keep, drop = {}, {}
    for group in graph.groups:
        if not data.draw(st.booleans(), f"prune {group.name}"):
            continue  # groups left out of keep are untouched
        kept = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size, unique=True),
                         f"keep {group.name}")
        keep[group.name] = torch.tensor(kept)  # any order: a permutation of the kept channels is allowed
        drop[group.name] = torch.tensor([c for c in range(group.size) if c not in kept], dtype=torch.long)
    if not keep:  # prune at least one group
        group = graph.groups[0]
        keep[group.name] = torch.tensor(data.draw(st.lists(st.integers(0, group.size - 1), min_size=1,
                                                           max_size=group.size, unique=True), "keep first"))
        drop[group.name] = torch.tensor([c for c in range(group.size) if c not in keep[group.name].tolist()],
                                        dtype=torch.long)
    event(f"residual={model.spec['residual']}, concat={bool(model.spec['concat'])}, mix={model.spec['mix']}")
    for name, channels in drop.items():  # silence what is to be removed, through the public API
        graph.scale_channels(name, channels, 0.0)
    probe = torch.randn(5, *x.shape[1:])
    before, before_probe = model(x), model(probe)
    sizes = {g.name: g.size for g in graph.groups}
    graph.prune(keep)
    after, after_probe = model(x), model(probe)
    assert after.shape == before.shape and after_probe.shape == before_probe.shape
    # float32 outputs of order 1: pruning zeroed channels changes only the summation order in the remaining
    # convolutions and linear layers (sums of at most 6·9 or 8·36 terms): 1e-5 absolute, as in test_graph.py
    assert (after - before).abs().max() < 1e-5
    assert (after_probe - before_probe).abs().max() < 1e-5
    # every group keeps its name and members, with the kept number of channels (or all of them); a residual
    # group cut to 1 channel stays one group (an add of two 1-channel maps is no broadcast)
    after_sizes = {g.name: g.size for g in graph.groups}
    assert after_sizes == {n: len(keep[n]) if n in keep else s for n, s in sizes.items()}
    for m in model.modules():  # every layer agrees with its new width
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,)
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
