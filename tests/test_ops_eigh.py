"""generalized_eigh.

Oracle: scipy.linalg.eigh(a, b + r I) (LAPACK sygvd, float64). Both solve in float64; for the well-
conditioned pairs used here (cond(b) < 1e2) the eigenvalues agree to ~D·cond·eps64, so they are held to
1e-9 relative to the largest eigenvalue. The reference runs the same algorithm, so ops == reference to 1e-12.
"""

import numpy as np
import pytest
import scipy.linalg
import torch

from gpp_ext import ops, reference
from gpp_ext.testing import digits, make_features, make_scatter_pair, rel_err



def ridged(b, ridge):
    d = b.shape[-1]
    return b + ridge * torch.diagonal(b, dim1=-2, dim2=-1).sum(-1)[..., None, None] / d * torch.eye(d, dtype=b.dtype)


def check_solution(a, b, values, vectors, ridge, tol=1e-9):
    bp = ridged(b.double(), ridge)
    values, vectors = values.double(), vectors.double()
    assert torch.all(values[..., :-1] >= values[..., 1:] - 1e-12 * values.abs().max()), "not descending"
    scale = values.abs().max().clamp_min(1.0)
    residual = a.double() @ vectors - bp @ vectors * values[..., None, :]
    assert residual.abs().max() / scale < tol
    gram = vectors.mT @ bp @ vectors
    assert (gram - torch.eye(a.shape[-1], dtype=torch.float64)).abs().max() < tol


@pytest.mark.parametrize("d,rank,ridge", [(8, 8, 0.0), (32, 9, 0.0), (64, 9, 1e-3), (100, 99, 0.1)])
def test_matches_scipy(impl, device, d, rank, ridge):
    a, b = make_scatter_pair(d, rank=rank, seed=d)
    values, vectors = impl.generalized_eigh(a.to(device), b.to(device), ridge)
    assert values.device == vectors.device == a.to(device).device
    values, vectors = values.cpu(), vectors.cpu()
    w, v = scipy.linalg.eigh(a.numpy(), ridged(b, ridge).numpy())
    w, v = w[::-1].copy(), v[:, ::-1].copy()
    assert np.allclose(values.numpy(), w, rtol=0, atol=1e-9 * abs(w).max())
    check_solution(a, b, values, vectors, ridge)
    # eigenvectors of simple eigenvalues agree up to sign
    for j in range(min(rank, d) - 1):
        gap = min(abs(w[j] - w[j + 1]), abs(w[j] - w[j - 1]) if j else np.inf)
        if gap > 1e-6 * abs(w).max():
            s = np.sign(v[:, j] @ vectors[:, j].numpy())
            assert np.allclose(vectors[:, j].numpy(), s * v[:, j], atol=1e-7 * abs(v[:, j]).max())


def test_ops_matches_reference_batched():
    a, b = make_scatter_pair(24, batch=(3, 2), rank=5, seed=1)
    got = ops.generalized_eigh(a, b, 1e-3)
    ref = reference.generalized_eigh(a, b, 1e-3)
    assert got[0].shape == (3, 2, 24) and got[1].shape == (3, 2, 24, 24)
    assert rel_err(got[0], ref[0]) < 1e-12
    assert rel_err(got[1][..., :5], ref[1][..., :5]) < 1e-10  # the top (non-degenerate) discriminants
    for i in range(3):
        for j in range(2):
            one = ops.generalized_eigh(a[i, j], b[i, j], 1e-3)
            assert rel_err(one[0], got[0][i, j]) < 1e-12
    check_solution(a, b, *got, ridge=1e-3)


def test_at_most_c_minus_1_discriminants():
    x, y = make_features(3000, 30, 6, dtype=torch.float64, seed=2)
    s = ops.class_scatter(x, y, 6)
    values, vectors = ops.generalized_eigh(s.between(), s.within)
    assert (values[:5] > 1e-3).all()
    assert values[5:].abs().max() < 1e-10 * values[0]
    check_solution(s.between(), s.within, values, vectors, 0.0)


def test_dead_dimensions():
    """A neuron with no variance is excluded: the rest is the problem on the live block, the dead neuron gets
    eigenvalue 0 and its coordinate vector."""
    a, b = make_scatter_pair(10, rank=4, seed=3)
    dead = [2, 7]
    live = [i for i in range(12) if i not in dead]
    A = torch.zeros(12, 12, dtype=torch.float64)
    B = torch.zeros(12, 12, dtype=torch.float64)
    A[np.ix_(live, live)] = a
    B[np.ix_(live, live)] = b
    for impl in (ops, reference):
        values, vectors = impl.generalized_eigh(A, B)
        sub_values, _ = impl.generalized_eigh(a, b)
        assert torch.allclose(values[:4], sub_values[:4], rtol=1e-12)
        assert values[4:].abs().max() < 1e-10 * values[0]
        assert vectors[dead][:, :4].abs().max() == 0
        dead_cols = [int(vectors[j].abs().argmax()) for j in dead]
        for j, col in zip(dead, dead_cols):
            assert vectors[:, col].abs().sum() == vectors[j, col].abs() == 1.0
        # with a ridge the dead coordinates are normalised like the others
        values, vectors = impl.generalized_eigh(A, B, 1e-2)
        check_solution(A, B, values, vectors, 1e-2)


def test_perfect_discriminant_is_not_dead():
    """A feature constant within each class but not across them has b_jj = 0 and a_jj > 0: an infinite
    eigenvalue without a ridge (an error that says so), a large finite one with it."""
    x = torch.tensor([[0.0, 1.0, 0.5], [0.0, 2.0, -0.1], [0.0, 1.5, 0.3],
                      [1.0, 3.0, 0.2], [1.0, 5.0, 0.9], [1.0, 4.1, -0.4]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    s = ops.class_scatter(x, y, 2)
    assert s.within[0, 0] == 0 and s.between()[0, 0] > 0
    for impl in (ops, reference):
        with pytest.raises(ValueError, match="constant within every class"):
            impl.generalized_eigh(s.between(), s.within)
        values, vectors = impl.generalized_eigh(s.between(), s.within, 1e-3)
        check_solution(s.between(), s.within, values, vectors, 1e-3)
        assert int(vectors[:, 0].abs().argmax()) == 0  # the top discriminant is the perfect feature
        u = impl.discriminant_utility(values, vectors, 1)
        assert int(u.argmax()) == 0


def test_digits_with_dead_pixels():
    x, y = digits(torch.float64)
    s = ops.class_scatter(x, y, 10)
    assert (s.within.diagonal() == 0).any()  # digits has pixels that are always 0
    values, vectors = ops.generalized_eigh(s.between(), s.within)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    assert (values[:9] > 0).all()
    ref = reference.generalized_eigh(s.between(), s.within)
    assert rel_err(values, ref[0]) < 1e-10


def test_singular_b_needs_a_ridge(impl):
    x, y = make_features(20, 50, 4, dtype=torch.float64, seed=5)  # D > N: S_w has rank <= 16
    s = impl.class_scatter(x, y, 4)
    with pytest.raises(ValueError, match=r"not positive definite.*ridge > 0"):
        impl.generalized_eigh(s.between(), s.within)
    values, vectors = impl.generalized_eigh(s.between(), s.within, 1e-3)
    w = scipy.linalg.eigh(s.between().numpy(), ridged(s.within, 1e-3).numpy(), eigvals_only=True)[::-1]
    assert np.allclose(values.numpy(), w, rtol=0, atol=1e-8 * w.max())
    check_solution(s.between(), s.within, values, vectors, 1e-3, tol=1e-7)


def test_dtypes_and_empty(impl):
    a, b = make_scatter_pair(6, seed=6, dtype=torch.float32)
    values, vectors = impl.generalized_eigh(a, b)
    assert values.dtype == vectors.dtype == torch.float32
    v64, _ = impl.generalized_eigh(a.double(), b.double())
    assert rel_err(values, v64) < 1e-6
    values, vectors = impl.generalized_eigh(torch.empty(0, 4, 4), torch.empty(0, 4, 4))
    assert values.shape == (0, 4) and vectors.shape == (0, 4, 4)


def test_sign_convention_is_deterministic():
    a, b = make_scatter_pair(16, seed=7)
    _, vectors = ops.generalized_eigh(a, b)
    pivot = vectors.abs().argmax(0)
    assert (vectors[pivot, torch.arange(16)] > 0).all()
    assert torch.equal(vectors, ops.generalized_eigh(a, b)[1])


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(3, 4), torch.randn(3, 4)), ValueError, "a must be a .*square"),
    ((torch.eye(3), torch.eye(4)), ValueError, "b must have the shape of a"),
    ((torch.eye(3), torch.eye(3), -1.0), ValueError, "ridge must be finite and >= 0"),
    ((torch.eye(3), torch.eye(3), float("nan")), ValueError, "ridge must be finite"),
    ((torch.eye(3, dtype=torch.long), torch.eye(3)), TypeError, "a must be a floating"),
    ((torch.full((3, 3), float("nan")), torch.eye(3)), ValueError, "a must be finite"),
    ((torch.eye(3), -torch.eye(3)), ValueError, "b must be positive semi-definite"),
])
def test_bad_arguments(impl, args, error, match):
    with pytest.raises(error, match=match):
        impl.generalized_eigh(*args)


def test_gradient_flows_through_the_reference():
    """The compiled op has no autograd formula; with inputs that need a gradient the wrapper runs the
    (differentiable) reference, so the two paths never disagree about gradients."""
    a, b = make_scatter_pair(6, rank=3, seed=9)
    a.requires_grad_(True)
    values, _ = ops.generalized_eigh(a, b, 1e-3)
    (grad,) = torch.autograd.grad(values[:2].sum(), a)
    ref_a = a.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.generalized_eigh(ref_a, b, 1e-3)[0][:2].sum(), ref_a)
    assert torch.allclose(grad, expected)


def test_opcheck():
    if not ops.has_kernel("generalized_eigh", "cpu"):
        pytest.skip("extension not built")
    a, b = make_scatter_pair(8, batch=(2,), seed=8)
    torch.library.opcheck(torch.ops.gpp_ext.generalized_eigh.default, (a, b, 1e-3))
