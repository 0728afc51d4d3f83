"""Pure-PyTorch versions of every op in `gpp_ext.ops`.

They are the semantics written plainly: the oracle the tests compare the kernels against, the baseline the
benchmarks time, and the fallback `gpp_ext.ops` uses when the compiled extension is missing or has no kernel
for a device. They take and return what the public ops do, validate the same way, work on any device, and
are differentiable by ordinary autograd. Statistics are computed in float64 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from .stats import ScatterStats

# A b-diagonal entry at or below this fraction of the largest is a dead (zero-variance) dimension.
DEAD_RELATIVE = _checks.DEAD_RELATIVE


def class_scatter(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ScatterStats:
    """Per-class counts, means and within-class scatter of `x [N, D]` with labels `y [N]` in [0, C)."""
    x, y, num_classes = _checks.scatter_inputs(x, y, num_classes)
    _checks.labels_in_range(y, num_classes)
    xd = x.to(torch.float64)
    count = torch.bincount(y, minlength=num_classes).to(torch.float64)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device).index_add(0, y, xd)
    if not bool(torch.isfinite(sums).all()):
        raise ValueError("class_scatter: x must be finite, found NaN or Inf")
    mean = sums / count.clamp_min(1.0).unsqueeze(1)
    centred = xd - mean[y]  # centre before the Gram product: no cancellation for large means
    within = centred.T @ centred
    return ScatterStats(count, mean, 0.5 * (within + within.T))


def merge_scatter(a: ScatterStats, b: ScatterStats) -> ScatterStats:
    """Exact merge of two partial statistics (Chan et al.'s parallel formula)."""
    ca, ma, wa = _checks.stats_tensors(a, "merge_scatter", "a")
    cb, mb, wb = _checks.stats_tensors(b, "merge_scatter", "b")
    _checks.same_device("merge_scatter", a=ma, b=mb)
    if ma.shape != mb.shape:
        raise ValueError(f"merge_scatter: a and b must have the same number of classes and dimension, got mean "
                         f"shapes {tuple(ma.shape)} and {tuple(mb.shape)}")
    n = ca + cb
    safe = n.clamp_min(1e-300)
    fa = torch.where(n > 0, ca / safe, torch.zeros_like(n))
    fb = torch.where(n > 0, cb / safe, torch.zeros_like(n))
    mean = fa.unsqueeze(1) * ma + fb.unsqueeze(1) * mb
    delta = ma - mb
    within = wa + wb + (delta * (ca * fb).unsqueeze(1)).T @ delta
    return ScatterStats(n, mean, 0.5 * (within + within.T))


def _solve_definite(a: torch.Tensor, b: torch.Tensor, entry: int = 0):
    chol, info = torch.linalg.cholesky_ex(b)
    if bool((info != 0).any()):
        first = entry + int((info != 0).nonzero()[0, 0])
        raise ValueError(f"generalized_eigh: b (+ ridge) is not positive definite on its non-dead dimensions "
                         f"(batch entry {first}); b is singular, e.g. fewer samples than dimensions, collinear "
                         f"features, or a feature constant within every class but not across classes. Pass "
                         f"ridge > 0 (1e-3 is a common choice) to regularise it.")
    m = torch.linalg.solve_triangular(chol, a, upper=False)
    m = torch.linalg.solve_triangular(chol, m.mT, upper=False)
    w, u = torch.linalg.eigh(0.5 * (m + m.mT))
    e = torch.linalg.solve_triangular(chol.mT, u, upper=True)
    return w.flip(-1), e.flip(-1)


def discriminants(stats: ScatterStats, k: int | None = None, ridge: float = 0.0):
    """The first `k` pairs of `generalized_eigh(stats.between(), stats.within, ridge)` (the full solve; the op
    gets them from a rank-aware one), `k` by default `min(C - 1, D)`."""
    op = "discriminants"
    count, mean, within = _checks.stats_tensors(stats, op, "stats", counts=True)
    ridge = _checks.real(ridge, op, "ridge")
    k = _checks.discriminant_count(k, *mean.shape, op)
    values, vectors = _generalized_eigh(stats.between(), within, ridge, op, _checks.DISCRIMINANT_NAMES)
    return values[:k], vectors[:, :k]


def generalized_eigh(a: torch.Tensor, b: torch.Tensor, ridge: float = 0.0):
    """Solves `a e = λ (b + ridge·tr(b)/D·I) e` for symmetric `a`, `b` of shape `[..., D, D]`.

    Returns `(eigenvalues [..., D], eigenvectors [..., D, D])`: eigenvalues descending, eigenvectors as columns
    normalised so that `E^T (b + ridge·tr(b)/D·I) E = I`, the largest-magnitude entry of each made positive.
    Dead dimensions (zero diagonal in both `b` and `a`: no variance at all) get eigenvalue 0 and their coordinate
    vector. Computed in float64, returned in the promoted input dtype. The data checks (symmetry to rounding,
    then symmetrised; `b + ridge` positive definite and not too ill-conditioned) are `_checks.eigh_data`'s,
    the public op's.
    """
    op = "generalized_eigh"
    a = _checks.square_stack(a, op, "a")
    b = _checks.square_stack(b, op, "b")
    _checks.same_device(op, a=a, b=b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    ridge = _checks.real(ridge, op, "ridge")
    return _generalized_eigh(a, b, ridge, op)


def _generalized_eigh(a, b, ridge: float, op: str, names=("a", "b")):
    """`generalized_eigh` of validated arguments; `op` and `names` are what its errors say."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    d = a.shape[-1]
    if a.numel() == 0:
        return a.new_empty(a.shape[:-1], dtype=out_dtype), a.new_empty(a.shape, dtype=out_dtype)
    # One read-back for every data check. Dead: no variance in b nor in a (b_jj = 0 with a_jj > 0 is a perfect
    # discriminant, not a dead neuron).
    dead, any_dead = _checks.eigh_data(a, b, ridge, op, names)
    A = a.to(torch.float64).reshape(-1, d, d)
    B = b.to(torch.float64).reshape(-1, d, d)
    A = 0.5 * (A + A.mT)
    B = 0.5 * (B + B.mT)
    diag = B.diagonal(dim1=-2, dim2=-1)
    shift = diag.sum(-1) * (ridge / d)
    B = B + shift.view(-1, 1, 1) * torch.eye(d, dtype=B.dtype, device=B.device)
    if not any_dead:
        values, vectors = _solve_definite(A, B)
    else:
        values = torch.zeros(A.shape[:-1], dtype=A.dtype, device=A.device)
        vectors = torch.zeros_like(A)
        for i in range(A.shape[0]):
            live = (~dead[i]).nonzero().squeeze(1)
            dead_idx = dead[i].nonzero().squeeze(1)
            n_live = live.numel()
            w = torch.zeros(d, dtype=A.dtype, device=A.device)
            e = torch.zeros(d, d, dtype=A.dtype, device=A.device)
            if n_live:
                wl, el = _solve_definite(A[i][live][:, live][None], B[i][live][:, live][None], i)
                w[:n_live] = wl[0]
                e[live, :n_live] = el[0]
            bjj = B[i].diagonal()[dead_idx]
            scale = torch.where(bjj > 0, bjj.clamp_min(1e-300).rsqrt(), torch.ones_like(bjj))
            e[dead_idx, n_live + torch.arange(dead_idx.numel(), device=A.device)] = scale
            w, order = torch.sort(w, stable=True, descending=True)
            values[i], vectors[i] = w, e[:, order]
    pivot = vectors.abs().argmax(-2, keepdim=True)
    sign = vectors.gather(-2, pivot).sign()
    vectors = vectors * torch.where(sign == 0, torch.ones_like(sign), sign)
    return values.reshape(a.shape[:-1]).to(out_dtype), vectors.reshape(a.shape).to(out_dtype)


def discriminant_utility(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, k: int | None = None):
    """`u_r = Σ_{j<k} max(λ_j, 0)·|e_{r,j}|/‖e_j‖`: eigenvalue-weighted loadings of the top-k discriminants
    (eigenvectors `[..., D, K]` as columns, eigenvalues `[..., K]`)."""
    op = "discriminant_utility"
    lam = _checks.features(eigenvalues, op, "eigenvalues")
    vec = _checks.column_stack(eigenvectors, op, "eigenvectors")
    _checks.same_device(op, eigenvalues=lam, eigenvectors=vec)
    if lam.shape != vec.shape[:-2] + vec.shape[-1:]:
        raise ValueError(f"{op}: eigenvalues must be [..., K] matching eigenvectors [..., D, K] = "
                         f"{tuple(vec.shape)}, got {tuple(lam.shape)}")
    cols = vec.shape[-1]
    k = cols if k is None else _checks.integer(k, op, "k", minimum=0)
    if k > cols:
        raise ValueError(f"{op}: k must be in [0, K] = [0, {cols}], got {k}")
    out_dtype = torch.promote_types(lam.dtype, vec.dtype)
    e = vec[..., :k].to(torch.float64)
    norm = e.norm(dim=-2, keepdim=True)
    weight = lam[..., :k].to(torch.float64).clamp_min(0.0).unsqueeze(-2)
    weight = torch.where(norm > 0, weight / norm.clamp_min(1e-300), torch.zeros_like(weight))
    return (e.abs() * weight).sum(-1).to(out_dtype)


def fisher_utility(stats: ScatterStats, eps: float = 1e-6) -> torch.Tensor:
    """`v_j = S_b[j,j] / (S_w[j,j] + eps·tr(S_t)/D)` per neuron (0 for a neuron with no variance)."""
    count, mean, within = _checks.stats_tensors(stats, "fisher_utility", "stats", counts=True)
    eps = _checks.real(eps, "fisher_utility", "eps")
    d = mean.shape[1]
    n = count.sum()
    if d == 0 or float(n) <= 0:
        return torch.zeros(d, dtype=torch.float64, device=mean.device)
    mu = (count @ mean) / n
    between = (count.unsqueeze(1) * (mean - mu) ** 2).sum(0)
    within_diag = within.diagonal()
    denom = within_diag + eps * (between.sum() + within_diag.sum()) / d
    inf_or_zero = torch.where(between > 0, torch.full_like(between, float("inf")), torch.zeros_like(between))
    return torch.where(denom > 0, between / denom.clamp_min(1e-300), inf_or_zero)


_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def deconv_backproject(signal, weight, stride=1, padding=0, dilation=1, groups=1, output_size=None):
    """Back-projects `signal` at a layer's output to its input through the layer's weight (transposed conv)."""
    signal, weight, stride, padding, dilation, groups, output_size = _checks.deconv_arguments(
        signal, weight, stride, padding, dilation, groups, output_size)
    if weight.dim() == 2:
        return signal @ weight
    output_padding = _checks.deconv_output_padding(signal.shape, weight.shape, stride, padding, dilation,
                                                   output_size)
    return _CONV_TRANSPOSE[weight.dim()](signal, weight, None, stride, padding, output_padding, groups, dilation)


def slice_channels(t: torch.Tensor, dim: int, index) -> torch.Tensor:
    """Contiguous copy of `t` keeping the entries `index` along `dim` (index_select semantics)."""
    op = "slice_channels"
    t = _checks.tensor(t, op, "t")
    if t.dim() == 0:
        raise ValueError(f"{op}: t must have at least one dimension, got a scalar")
    dim = _checks.integer(dim, op, "dim")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"{op}: dim must be in [{-t.dim()}, {t.dim()}) for a {t.dim()}-D tensor, got {dim}")
    index = _checks.channel_index(index, op, t.device)
    _checks.index_in_range(index, t.shape[dim], dim % t.dim(), t.shape, op)
    return t.index_select(dim, index).contiguous()
