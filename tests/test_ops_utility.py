"""discriminant_utility and fisher_utility.

Both are O(D·k) / O(C·D) sums in float64; ops and reference sum in different orders, so they agree to ~k·eps64
(held to 1e-12 relative). The independent oracles are numpy loops and scikit-learn's ANOVA F statistic.
"""

import numpy as np
import pytest
import torch

from gpp_ext import ScatterStats, ops, reference
from gpp_ext.testing import digits, make_features, make_scatter_pair, rel_err



def numpy_discriminant_utility(values, vectors, k):
    values, vectors = np.asarray(values, dtype=np.float64), np.asarray(vectors, dtype=np.float64)
    out = np.zeros(vectors.shape[0])
    for j in range(k):
        e = vectors[:, j]
        n = np.linalg.norm(e)
        if n > 0:
            out += max(values[j], 0.0) * np.abs(e) / n
    return out


@pytest.mark.parametrize("k", [None, 0, 1, 9, 40])
def test_discriminant_utility_matches_numpy(impl, device, k):
    a, b = make_scatter_pair(40, rank=9, seed=1)
    values, vectors = ops.generalized_eigh(a, b)
    u = impl.discriminant_utility(values.to(device), vectors.to(device), k).cpu()
    expected = numpy_discriminant_utility(values, vectors, 40 if k is None else k)
    assert u.shape == (40,) and u.dtype == torch.float64
    if k == 0:
        assert not u.any()
    else:
        assert rel_err(u, expected) < 1e-12


def test_discriminant_utility_of_the_top_columns(impl, device):
    """`[D, K]` eigenvectors (the top K, as from `discriminants`) give the utility of the first K columns of the
    full `[D, D]` ones."""
    a, b = make_scatter_pair(40, rank=9, seed=1)
    values, vectors = ops.generalized_eigh(a, b)
    u = impl.discriminant_utility(values[:9].to(device), vectors[:, :9].to(device)).cpu()
    assert u.shape == (40,)
    assert rel_err(u, ops.discriminant_utility(values, vectors, 9)) < 1e-12
    batched = impl.discriminant_utility(values[:9].repeat(2, 1).to(device), vectors[:, :9].repeat(2, 1, 1).to(device),
                                        4).cpu()
    assert batched.shape == (2, 40) and rel_err(batched[1], numpy_discriminant_utility(values, vectors, 4)) < 1e-12


def test_discriminant_utility_batched_and_clamped():
    values = torch.tensor([[3.0, 1.0, -1e-14], [2.0, -0.5, 0.0]], dtype=torch.float64)
    vectors = torch.randn(2, 3, 3, dtype=torch.float64)
    vectors[0, :, 1] = 0  # a zero column contributes nothing
    for impl in (ops, reference):
        u = impl.discriminant_utility(values, vectors, 3)
        for i in range(2):
            assert rel_err(u[i], numpy_discriminant_utility(values[i], vectors[i], 3)) < 1e-12
    assert ops.discriminant_utility(values.float(), vectors.float()).dtype == torch.float32


def test_discriminant_utility_finds_the_informative_neurons():
    """Neurons that carry the class signal get the utility; pure-noise neurons get little."""
    x, y = make_features(4000, 12, 5, spread=0.0, dtype=torch.float64, seed=3)
    x[:, :3] += 3 * torch.randn(5, 3, dtype=torch.float64)[y]  # only neurons 0..2 separate the classes
    s = ops.class_scatter(x, y, 5)
    values, vectors = ops.generalized_eigh(s.between(), s.within, 1e-3)
    u = ops.discriminant_utility(values, vectors, 4)
    assert u[:3].min() > 5 * u[3:].max()
    v = ops.fisher_utility(s)
    assert v[:3].min() > 5 * v[3:].max()


def test_fisher_utility_matches_sklearn_f_statistic():
    """ANOVA F_j = (S_b[j,j]/(C-1)) / (S_w[j,j]/(N-C)), so with eps=0 the Fisher ratio is F_j·(C-1)/(N-C)."""
    from sklearn.feature_selection import f_classif

    x, y = digits(torch.float64)
    s = ops.class_scatter(x, y, 10)
    v = ops.fisher_utility(s, eps=0.0)
    live = (x.std(0) > 0).numpy()
    f, _ = f_classif(x.numpy()[:, live], y.numpy())
    assert np.allclose(v.numpy()[live] * (len(y) - 10) / 9, f, rtol=1e-9)
    assert (v.numpy()[~live] == 0).all()  # constant pixels: 0/0 reads as 0


def test_fisher_utility_ops_matches_reference_and_scale_invariance(impl, device):
    x, y = make_features(2000, 30, 7, dtype=torch.float64, seed=4, relu=True)
    s = impl.class_scatter(x, y, 7)
    v = impl.fisher_utility(s.to(device)).cpu()
    assert rel_err(v, reference.fisher_utility(s)) < 1e-12
    assert rel_err(impl.fisher_utility(impl.class_scatter(1000 * x, y, 7)), v) < 1e-10
    direct = s.between().diagonal() / (s.within.diagonal() + 1e-6 * s.total().trace() / 30)
    assert rel_err(v, direct) < 1e-10


def test_fisher_utility_edge_cases(impl):
    assert impl.fisher_utility(ScatterStats.empty(3, 5)).tolist() == [0.0] * 5
    # perfectly separating neuron with no within-class spread: infinite only when eps == 0
    x = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [1.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    s = impl.class_scatter(x, y, 2)
    assert torch.isinf(impl.fisher_utility(s, eps=0.0)[0])
    assert torch.isfinite(impl.fisher_utility(s)[0])


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m.discriminant_utility(torch.zeros(3), torch.zeros(4, 4)), ValueError, "eigenvalues must be"),
    (lambda m: m.discriminant_utility(torch.zeros(3), torch.zeros(3, 3), 4), ValueError, r"k must be in \[0, K\]"),
    (lambda m: m.discriminant_utility(torch.zeros(3), torch.zeros(3, 3), -1), ValueError, "k must be >= 0"),
    (lambda m: m.discriminant_utility(torch.zeros(3), torch.zeros(3, 2)), ValueError,
     r"eigenvalues must be \[\.\.\., K\]"),
    (lambda m: m.discriminant_utility(torch.zeros(3), torch.zeros(3)), ValueError, "eigenvectors must be"),
    (lambda m: m.fisher_utility(torch.zeros(3)), TypeError, "stats must be a ScatterStats"),
    (lambda m: m.fisher_utility(ScatterStats.empty(2, 2), eps=-1.0), ValueError, "eps must be finite and >= 0"),
])
def test_bad_arguments(impl, call, error, match):
    with pytest.raises(error, match=match):
        call(impl)


def test_opcheck():
    if not ops.has_kernel("fisher_utility", "cpu"):
        pytest.skip("extension not built")
    x, y = make_features(300, 6, 3, dtype=torch.float64)
    s = ops.class_scatter(x, y, 3)
    values, vectors = ops.generalized_eigh(s.between(), s.within)
    torch.library.opcheck(torch.ops.gpp_ext.discriminant_utility.default, (values, vectors, 2))
    torch.library.opcheck(torch.ops.gpp_ext.discriminant_utility.default, (values, vectors, None))
    torch.library.opcheck(torch.ops.gpp_ext.fisher_utility.default, (s.count, s.mean, s.within, 1e-6))
