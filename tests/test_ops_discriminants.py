"""discriminants: the rank-aware solve of `S_b e = λ (S_w + r I) e` from scatter statistics.

Oracle: scipy.linalg.eigh(S_b, S_w + r I) (LAPACK sygvd, float64), the full solve. Both run in float64; their
eigenvalues differ by rounding of order cond(S_w')·eps64 relative to the largest one, so they are held to
1e-9·λ_max where cond < 1e3 and to 1e-12·cond·λ_max for the ill-conditioned cases (the limit the op accepts,
cond <= 4.5e12, then leaves ~3 digits, which is what generalized_eigh promises too). Eigenvectors are compared
as subspaces, per group of (near-)equal eigenvalues separated from the others by a gap: the canonical cosines
between the two spans in the S_w' inner product must be 1 within tol/gap (the Davis-Kahan bound).
"""

import pytest
import scipy.linalg
import torch

from gpp_ext import ops, reference
from gpp_ext.stats import ScatterStats
from gpp_ext.testing import digits, make_features


def ridged(within, ridge):
    d = within.shape[0]
    return within + ridge * within.diagonal().sum() / d * torch.eye(d, dtype=within.dtype)


def scipy_pairs(stats, ridge):
    w, v = scipy.linalg.eigh(stats.between().numpy(), ridged(stats.within, ridge).numpy())
    return torch.from_numpy(w[::-1].copy()), torch.from_numpy(v[:, ::-1].copy())


def groups(values, gap):
    """Index runs of eigenvalues closer than `gap` to their neighbour."""
    out, run = [], [0]
    for j in range(1, len(values)):
        if values[j - 1] - values[j] > gap:
            out.append(run)
            run = []
        run.append(j)
    out.append(run)
    return out


def check_against_scipy(stats, ridge, k, tol, values, vectors):
    """Eigenvalues within `tol·λ_max`; each group of eigenvalues separated by more than 1e3·tol·λ_max spans the
    same S_w'-orthonormal subspace as scipy's; `E^T S_w' E = I` and the sign convention hold."""
    w, v = scipy_pairs(stats, ridge)
    w, v = w[:k], v[:, :k]
    scale = float(w[0]) if k else 1.0
    assert values.shape == (k,) and vectors.shape == (stats.dim, k)
    assert (values - w).abs().max() <= tol * scale if k else True
    b = ridged(stats.within, ridge)
    gram = vectors.T @ b @ vectors
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() < max(tol, 1e-10) * 10
    if k:
        pivot = vectors.abs().argmax(0)
        assert (vectors[pivot, torch.arange(k)] > 0).all()
    full_w = scipy_pairs(stats, ridge)[0]
    gap = 1e3 * tol * scale
    for run in groups(full_w.tolist(), gap):
        if run[-1] >= k:
            continue  # a group that k cuts (or lies past k): only the span of the whole group is defined
        if full_w[run[0]] <= gap:
            continue  # the null space of S_b: any basis of it is a solution
        cosines = torch.linalg.svdvals(vectors[:, run].T @ b @ v[:, run])
        assert (cosines - 1).abs().max() < 1e-6, (run, cosines)


def features(n, d, c, seed, spread=3.0, mean=0.0):
    x, y = make_features(n, d, c, dtype=torch.float64, seed=seed, spread=spread, mean=mean)
    return ops.class_scatter(x, y, c)


@pytest.mark.parametrize("n,d,c,ridge", [(400, 8, 3, 0.0), (2000, 64, 10, 0.0), (3000, 128, 100, 1e-3),
                                         (500, 40, 60, 1e-3)])
def test_matches_scipy(impl, device, n, d, c, ridge):
    stats = features(n, d, c, seed=d + c)
    on = ScatterStats(*(t.to(device) for t in (stats.count, stats.mean, stats.within)))
    k = min(c - 1, d)
    values, vectors = impl.discriminants(on, ridge=ridge)
    assert values.device == vectors.device == on.mean.device
    check_against_scipy(stats, ridge, k, 1e-9, values.cpu(), vectors.cpu())


def test_real_activations():
    """Digits pixels (dead ones included, no ridge) and the ReLU features of a random network on them."""
    x, y = digits(torch.float64)
    stats = ops.class_scatter(x, y, 10)
    assert (stats.within.diagonal() == 0).any()
    values, vectors = ops.discriminants(stats)
    check_against_scipy_dead(stats, values, vectors)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256), torch.nn.ReLU())
    with torch.no_grad():
        h = net(x.float())
    stats = ops.class_scatter(h, y, 10)
    values, vectors = ops.discriminants(stats, ridge=1e-3)
    check_against_scipy(stats, 1e-3, 9, 1e-9, values, vectors)
    utility = ops.discriminant_utility(values, vectors)  # what the analysis ranks neurons by
    expected = reference.discriminant_utility(*reference.discriminants(stats, 9, 1e-3))
    assert torch.allclose(utility, expected, rtol=1e-7, atol=1e-12 * float(expected.max()))


def check_against_scipy_dead(stats, values, vectors):
    """Dead dimensions (no variance at all) leave the problem; compare on the live block."""
    live = ~((stats.within.diagonal() == 0) & (stats.between().diagonal() == 0))
    block = ScatterStats(stats.count, stats.mean[:, live], stats.within[live][:, live])
    check_against_scipy(block, 0.0, values.shape[0], 1e-9, values, vectors[live])
    assert (vectors[~live] == 0).all()


def test_clustered_eigenvalues():
    """Class means on a regular simplex, isotropic noise: C - 1 equal eigenvalues, any basis of their span."""
    c, d = 6, 20
    g = torch.Generator().manual_seed(3)
    simplex = torch.eye(c, d, dtype=torch.float64) - 1.0 / c * torch.ones(c, d, dtype=torch.float64) * \
        (torch.arange(d) < c)
    y = torch.arange(c).repeat_interleave(2000)
    x = simplex[y] * 5 + torch.randn(len(y), d, generator=g, dtype=torch.float64)
    stats = ops.class_scatter(x, y, c)
    for impl in (ops, reference):
        values, vectors = impl.discriminants(stats)
        check_against_scipy(stats, 0.0, c - 1, 1e-9, values, vectors)
        assert values[0] / values[-1] < 1.1  # nearly equal: the subspace test above is the one that matters


def test_wide_dynamic_range():
    """Class separations from 1e3 down to 1e-3 standard deviations: eigenvalues over 12 decades."""
    c, d = 8, 30
    g = torch.Generator().manual_seed(4)
    means = torch.zeros(c, d, dtype=torch.float64)
    for j in range(c):
        means[j, j] = 10.0 ** (3 - 6 * j / (c - 1))
    y = torch.arange(c).repeat_interleave(500)
    x = means[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64)
    stats = ops.class_scatter(x, y, c)
    values, vectors = ops.discriminants(stats)
    check_against_scipy(stats, 0.0, c - 1, 1e-9, values, vectors)
    assert values[0] / values[-1] > 1e6


def test_ill_conditioned_within():
    """Nearly collinear features: cond(S_w) ~1e10, accepted (the limit is 4.5e12), and still scipy's pairs."""
    c, d = 5, 24
    g = torch.Generator().manual_seed(5)
    y = torch.arange(c).repeat_interleave(800)
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64) + torch.randn(c, d, generator=g,
                                                                                dtype=torch.float64)[y]
    x[:, 1] = x[:, 0] + 1e-5 * torch.randn(len(y), generator=g, dtype=torch.float64)
    stats = ops.class_scatter(x, y, c)
    cond = torch.linalg.cond(stats.within).item()
    assert 1e9 < cond < 1e12
    values, vectors = ops.discriminants(stats)
    check_against_scipy(stats, 0.0, c - 1, 1e-12 * cond, values, vectors)


def test_large_means_in_float32():
    """float32 features with a large common offset: the statistics are float64 and centred, so the solve
    matches the one of the same features without the offset."""
    x, y = make_features(3000, 32, 5, dtype=torch.float64, seed=6)
    near = ops.class_scatter(x.float(), y, 5)
    far = ops.class_scatter((x + 1e4).float(), y, 5)
    v_near, e_near = ops.discriminants(near, ridge=1e-6)
    v_far, e_far = ops.discriminants(far, ridge=1e-6)
    assert (v_near - v_far).abs().max() < 1e-2 * v_near[0]  # float32 rounding of x + 1e4 (eps32·1e4 ~1e-3)


def test_fewer_dimensions_than_classes_and_empty_classes(impl):
    x, y = make_features(600, 4, 10, dtype=torch.float64, seed=7)
    y[y == 3] = 2  # class 3 is empty
    stats = ops.class_scatter(x, y, 10)
    assert stats.count[3] == 0
    values, vectors = impl.discriminants(stats)  # k = min(C - 1, D) = 4
    check_against_scipy(stats, 0.0, 4, 1e-9, values, vectors)
    values, vectors = impl.discriminants(stats, k=0)
    assert values.shape == (0,) and vectors.shape == (4, 0)


def test_k_and_the_default():
    stats = features(800, 16, 5, seed=8)
    assert ops.discriminants(stats)[0].shape == (4,)
    values, vectors = ops.discriminants(stats, k=5)  # the C-th pair: eigenvalue 0 by the centring
    assert values[4].abs() < 1e-9 * values[0]
    full, _ = ops.generalized_eigh(stats.between(), stats.within)
    assert torch.allclose(values[:4], full[:4], rtol=1e-10, atol=0)


def test_analysis_uses_the_rank_aware_solve(monkeypatch):
    """DiscriminantAnalyzer.utility("lda") goes through ops.discriminants, and equals the full solve's."""
    from gpp_ext.analysis import DiscriminantAnalyzer

    x, y = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with DiscriminantAnalyzer(model, 10, layers=["2:input"]) as analyzer:
        analyzer.update(x, y)
    calls = []
    real = ops.discriminants
    monkeypatch.setattr(ops, "discriminants", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    utility = analyzer.utility()
    assert calls
    values, vectors = analyzer.discriminants()
    expected = ops.discriminant_utility(values, vectors, 9)
    assert torch.allclose(utility, expected, rtol=1e-8, atol=1e-12 * float(expected.max()))


def test_errors_name_the_statistics(impl):
    x, y = make_features(20, 50, 4, dtype=torch.float64, seed=9)  # D > N: S_w singular
    stats = ops.class_scatter(x, y, 4)
    with pytest.raises(ValueError, match=r"discriminants: stats.within \(\+ ridge\) is not positive definite.*"
                                         r"ridge > 0"):
        impl.discriminants(stats)
    bad = ScatterStats(stats.count, stats.mean, stats.within.clone().fill_diagonal_(float("nan")))
    with pytest.raises(ValueError, match="discriminants: stats.within must be finite"):
        impl.discriminants(bad)
    skew = stats.within.clone()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match=r"stats.within must be symmetric"):
        impl.discriminants(ScatterStats(stats.count, stats.mean, skew), ridge=1e-3)
    with pytest.raises(ValueError, match=r"k must be in \[0, min\(C, D\)\] = \[0, 4\]"):
        impl.discriminants(stats, k=5, ridge=1e-3)
    with pytest.raises(TypeError, match="stats must be a ScatterStats"):
        impl.discriminants((stats.count, stats.mean, stats.within))
    with pytest.raises(ValueError, match="ridge must be finite"):
        impl.discriminants(stats, ridge=-1.0)


def test_ill_conditioned_error_suggests_a_ridge():
    c, d = 3, 6
    y = torch.arange(c).repeat_interleave(100)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(len(y), d, generator=g, dtype=torch.float64) + torch.randn(c, d, generator=g,
                                                                                dtype=torch.float64)[y]
    x[:, 1] = x[:, 0] + 1e-9 * torch.randn(len(y), generator=g, dtype=torch.float64)
    stats = ops.class_scatter(x, y, c)
    with pytest.raises(ValueError, match=r"stats.within \(\+ ridge\) is ill-conditioned.*Pass ridge=1e"):
        ops.discriminants(stats)
    ops.discriminants(stats, ridge=1e-6)


def test_gradient_runs_the_reference():
    stats = features(300, 6, 3, seed=11)
    mean = stats.mean.clone().requires_grad_(True)
    values, _ = ops.discriminants(ScatterStats(stats.count, mean, stats.within))
    (grad,) = torch.autograd.grad(values.sum(), mean)
    ref_mean = stats.mean.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.discriminants(ScatterStats(stats.count, ref_mean, stats.within))[0]
                                      .sum(), ref_mean)
    assert torch.allclose(grad, expected)


def test_opcheck_and_compile():
    if not ops.has_kernel("discriminants", "cpu"):
        pytest.skip("extension not built")
    stats = features(300, 12, 4, seed=12)
    torch.library.opcheck(torch.ops.gpp_ext.discriminants.default,
                          (stats.count, stats.mean, stats.within, 1e-3, 3))
    compiled = torch.compile(lambda s: ops.discriminants(s, ridge=1e-3), fullgraph=True, backend="eager")
    got = compiled(stats)
    expected = ops.discriminants(stats, ridge=1e-3)
    assert torch.allclose(got[0], expected[0]) and torch.allclose(got[1], expected[1])


def test_dead_dimensions_past_the_rank_of_s_b_keep_the_vectors_s_w_orthonormal(impl):
    """k past the rank of S_b: the vectors of zero eigenvalues are any S_w'-orthonormal completion, which may use
    the dead dimensions (where S_w' holds the fill value). Masking them there shrank them: the compiled solve gave
    diag(E^T S_w' E) = [1, 1, 0.81]. Tolerance 1e-10: float64 solves of a well-conditioned 6x6 problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[:, [1, 4]] = 2.0   # constant: dead dimensions
    stats = ops.class_scatter(x, torch.arange(30) % 3, 3)
    values, vectors = impl.discriminants(stats, 3)
    diag = stats.within.diagonal()
    dead = (diag == 0) & (stats.between().diagonal() == 0)
    effective = stats.within.clone()
    effective[dead, dead] = diag[~dead].max()   # the op's S_w' on the dead dimensions: the largest live entry
    gram = vectors.T @ effective @ vectors
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64), atol=1e-10), gram
    assert values[2].abs() < 1e-10 * values[0]


def test_a_between_class_scatter_that_overflows_is_refused(impl):
    stats = ops.class_scatter(torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 3, 3)
    far = ScatterStats(stats.count, stats.mean * 1e200, stats.within)
    with pytest.raises(ValueError, match="must be finite"):
        impl.discriminants(far, 2)
