"""Public ops of gpp_ext: discriminant analysis of activations and channel surgery.

Each op validates its arguments, then runs the compiled kernel (`torch.ops.gpp_ext.*`, chosen by the
dispatcher from the tensors' device) or, where the extension is missing or has no kernel for that device,
the pure-PyTorch version in `gpp_ext.reference`, which defines the semantics. Fake (meta) kernels make the
compiled ops traceable by `torch.compile`. `class_scatter` and `merge_scatter` have autograd formulas; the
other ops run their (differentiable) reference when a gradient has to flow through them.

Shapes: `N` samples, `D` features, `C` classes. Statistics are float64 whatever the feature dtype.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _checks, reference
from .stats import ScatterStats

__all__ = [
    "ScatterStats", "class_scatter", "merge_scatter", "generalized_eigh", "discriminants", "discriminant_utility",
    "fisher_utility", "deconv_backproject", "slice_channels", "extension_available", "has_kernel", "data_checks",
]

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.gpp_ext.*)
    _LOAD_ERROR = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = error
    warnings.warn(
        f"gpp_ext: the compiled extension gpp_ext._C could not be loaded ({error}); gpp_ext.ops falls back to "
        f"the pure-PyTorch reference ops, which are correct but slower. Build it against the installed torch "
        f"with `pip install --no-build-isolation -e .` (or `make build`).", RuntimeWarning, stacklevel=2)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
_OPS = ("class_scatter", "class_scatter_backward", "merge_scatter", "generalized_eigh", "discriminants",
        "discriminant_utility",
        "fisher_utility", "deconv_backproject", "slice_channels")
# Which ops have a compiled kernel for which device: read once from the dispatcher, so that choosing a path
# is a dictionary lookup that torch.compile can trace.
_KERNELS = {(op, device): _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"gpp_ext::{op}", key)
            for op in _OPS for device, key in _DISPATCH_KEYS.items()}
_data_checks = True


def extension_available() -> bool:
    """True when the compiled ops are loaded."""
    return _C is not None


def load_error():
    """The exception that stopped the extension from loading, or None."""
    return _LOAD_ERROR


def has_kernel(op: str, device) -> bool:
    """True when `torch.ops.gpp_ext.<op>` has a compiled kernel for `device` (a torch.device or a string)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _KERNELS.get((op, device_type), False)


def _compiled(op: str, t: torch.Tensor) -> bool:
    # Fake tensors under torch.compile report their real device, so they take the compiled op and its fake.
    # Quantized and other layouts have no kernel: they run the reference.
    return _KERNELS.get((op, t.device.type), False) and not t.is_quantized


def _differentiating(*tensors) -> bool:
    """Ops without an autograd formula run the (differentiable) reference when a gradient must flow."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@contextlib.contextmanager
def data_checks(enabled: bool):
    """Switches the data-dependent input checks of ops on GPU tensors on or off within a block.

    On a GPU, checking labels against `[0, num_classes)`, features for NaN/Inf or indices against a size means
    reading a flag back to the host: a synchronisation per call. They are on by default; switch them off in a
    hot training loop whose inputs are known to be valid. Without them, out-of-range labels are ignored by
    `class_scatter` and out-of-range indices trip a device assert in `slice_channels`. CPU kernels always check
    (it costs nothing there).
    """
    global _data_checks
    previous, _data_checks = _data_checks, bool(enabled)
    try:
        yield
    finally:
        _data_checks = previous


def _check_on_device(t: torch.Tensor) -> bool:
    return _data_checks and t.device.type not in ("cpu", "meta")


# ---------------------------------------------------------------------------------------------- the ops

def class_scatter(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ScatterStats:
    """Per-class scatter statistics of a batch of features.

    Args:
        x: `[N, D]` features, float32 or float64 (float16/bfloat16 are upcast to float32). Must be finite.
        y: `[N]` integer labels in `[0, num_classes)`.
        num_classes: `C >= 1`; classes absent from the batch get count 0 and mean 0.

    Returns:
        `ScatterStats` with `count [C]`, `mean [C, D]`, `within [D, D]` (unnormalised `S_w`), all float64.
        Differentiable w.r.t. `x` (through `mean` and `within`).

    Rows are centred by their float64 class mean before the Gram product, so float32 features with a large
    mean keep their precision. For float32 input the Gram product of the centred rows runs in float32 over
    blocks of rows (4096 on the CPU, 16384 on CUDA), accumulated in float64 (relative error ~1e-6); float64
    input stays float64. A float32 block whose product overflows float32 (centred values beyond ~1e19) is an
    error from the compiled kernel, where the reference would compute it: give such features as float64.
    """
    x, y, num_classes = _checks.scatter_inputs(x, y, num_classes)
    if not _compiled("class_scatter", x):
        return reference.class_scatter(x, y, num_classes)
    stats = ScatterStats(*torch.ops.gpp_ext.class_scatter(x, y, num_classes))
    if _check_on_device(x):  # the CPU kernel checks inside its passes; on a GPU it costs one sync, here
        _checks.scatter_data_on_device(y, num_classes, stats)
    return stats


def merge_scatter(a: ScatterStats, b: ScatterStats) -> ScatterStats:
    """Exact merge of the statistics of two disjoint sample sets (Chan's parallel formula).

    `merge_scatter(class_scatter(x1, y1, C), class_scatter(x2, y2, C))` equals `class_scatter` of the
    concatenation up to round-off; merging is associative and commutative, so batches, files and processes
    can be combined in any order. Differentiable w.r.t. the means and scatters.
    """
    ca, ma, wa = _checks.stats_tensors(a, "merge_scatter", "a")
    cb, mb, wb = _checks.stats_tensors(b, "merge_scatter", "b")
    _checks.same_device("merge_scatter", a=ma, b=mb)
    if ma.shape != mb.shape:
        raise ValueError(f"merge_scatter: a and b must have the same number of classes and dimension, got mean "
                         f"shapes {tuple(ma.shape)} and {tuple(mb.shape)}")
    if not _compiled("merge_scatter", ma):
        return reference.merge_scatter(a, b)
    return ScatterStats(*torch.ops.gpp_ext.merge_scatter(ca, ma, wa, cb, mb, wb))


def generalized_eigh(a: torch.Tensor, b: torch.Tensor, ridge: float = 0.0):
    """Generalized symmetric eigenproblem `a e = λ (b + ridge·tr(b)/D·I) e`, batched over leading dims.

    Args:
        a: `[..., D, D]` symmetric (e.g. between-class scatter `S_b`).
        b: `[..., D, D]` symmetric positive semi-definite (e.g. within-class scatter `S_w`), on `a`'s device.
        ridge: regulariser relative to the scale of `b` (`r = ridge·tr(b)/D`); use > 0 when `b` is singular or
            ill-conditioned. Finite and >= 0.

    Returns:
        `(eigenvalues [..., D], eigenvectors [..., D, D])`, eigenvalues descending, eigenvectors as columns with
        `E^T (b + r I) E = I` and their largest-magnitude entry positive. Dead dimensions (zero variance in `b`)
        are excluded from the solve and get eigenvalue 0 and their coordinate vector. Computed in float64,
        returned in the promoted input dtype. Dead dimensions are those with no variance in `b` nor in `a`; a
        dimension with none in `b` but some in `a` (constant within each class, different between classes) is a
        perfect discriminant: it needs a ridge.

    Checks (raising `ValueError`, on every path: compiled CPU and CUDA kernels and the reference), besides
    shapes and dtypes: `a` and `b` finite; symmetric up to rounding, `max|m - m^T| <= 1024·eps(dtype)·max|m|`
    (2.3e-13 in float64, 1.2e-4 in float32; a symmetric scatter is symmetric to ~1 eps, a matrix that is not
    symmetric at all is off by ~max|m|), and within that symmetrised as `(m + m^T)/2`; `b + r I` positive
    definite on the live dimensions (else: pass `ridge > 0`); and its condition number at most
    `1e-3/eps(b.dtype)` (4.5e12 for float64, 8.4e3 for float32), since the eigenvalues carry relative errors up
    to ~cond·eps: float64 rounding in the solve, and for a float32 `b` its own rounding. Above that the op
    raises (it does not warn: such eigenvalues may have lost all but three digits) with the estimate, the
    batch entry of the worst matrix and a ridge that fixes it. The estimate is the ratio of a lower bound of
    `λ_max` to an upper bound of `λ_min` of the live block, from its Cholesky factor (the pivots `L_ii²`, and
    four O(D²) steps of power and inverse iteration through the factor), so it never exceeds the true
    condition number (and in the tests stays within a factor 10·D of it). float16/bfloat16 inputs
    are judged as float32. The checks cost one extra Cholesky factorisation and one read-back (a sync on a
    GPU, skipped there inside `data_checks(False)`); they are skipped while `torch.compile` traces.
    """
    a = _checks.square_stack(a, "generalized_eigh", "a")
    b = _checks.square_stack(b, "generalized_eigh", "b")
    _checks.same_device("generalized_eigh", a=a, b=b)
    ridge = _checks.real(ridge, "generalized_eigh", "ridge")
    if a.shape != b.shape:
        raise ValueError(f"generalized_eigh: b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if not _compiled("generalized_eigh", a) or _differentiating(a, b):
        return reference.generalized_eigh(a, b, ridge)  # which runs the same data checks
    if a.numel() and a.device.type != "meta" and not torch.compiler.is_compiling() and (
            a.device.type == "cpu" or _data_checks):
        _checks.eigh_data(a, b, ridge)  # one read-back
    return tuple(torch.ops.gpp_ext.generalized_eigh(a, b, ridge))


def discriminants(stats: ScatterStats, k: int | None = None, ridge: float = 0.0):
    """The top-`k` discriminants of scatter statistics: `generalized_eigh(stats.between(), stats.within, ridge)`
    cut to its first `k` pairs, computed without the full `D x D` eigendecomposition.

    Args:
        stats: `ScatterStats` (from `class_scatter` / `merge_scatter`), float64.
        k: how many pairs, in `[0, min(C, D)]`; default `min(C - 1, D)`, all that can carry between-class
            scatter (`S_b` has rank at most `C - 1`, so every later eigenvalue is 0).
        ridge: as `generalized_eigh`'s: `S_w + ridge·tr(S_w)/D·I`.

    Returns:
        `(eigenvalues [k], eigenvectors [D, k])` float64: eigenvalues descending, eigenvectors as columns with
        `E^T (S_w + r I) E = I`, the largest-magnitude entry of each positive, zero on dead dimensions.

    The rank-aware solve: `S_b = M^T M` with `M [C, D]` the centred class means scaled by `sqrt(n_c)`, so with
    `S_w + r I = L L^T` the pairs are the singular pairs of `L^{-1} M^T [D, C]` (`λ = s²`, `e = L^{-T} u`): one
    Cholesky factorisation, two triangular solves with `C` right-hand sides and an SVD of a `[D, C]` matrix,
    against a full eigendecomposition for `generalized_eigh`. The pairs with distinct non-zero eigenvalues
    agree with `generalized_eigh`'s; where eigenvalues tie (including the zero ones, past the rank of `S_b`) the
    two span the same subspace with possibly different bases. The data checks and their errors are
    `generalized_eigh`'s (a non-finite or non-symmetric `stats.within`, a singular or ill-conditioned one
    without a ridge), computed from the same factorisation; on a GPU they cost one read-back, skipped inside
    `data_checks(False)`. A gradient (w.r.t. `stats.mean` or `stats.within`) runs the reference, the full solve.
    """
    op = "discriminants"
    count, mean, within = _checks.stats_tensors(stats, op, "stats", counts=True, on_device=_data_checks)
    ridge = _checks.real(ridge, op, "ridge")
    k = _checks.discriminant_count(k, *mean.shape, op)
    if not _compiled("discriminants", mean) or _differentiating(mean, within, count):
        return reference.discriminants(stats, k, ridge)
    values, vectors, flags = torch.ops.gpp_ext.discriminants(count, mean, within, ridge, k)
    if mean.device.type != "meta" and not torch.compiler.is_compiling() and (
            mean.device.type == "cpu" or _data_checks):
        _checks.raise_eigh_flags(flags.tolist(), ridge, op, _checks.DISCRIMINANT_NAMES)  # one read-back
    return values, vectors


def discriminant_utility(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, k: int | None = None):
    """Neuron utility from discriminants: `u_r = Σ_{j<k} max(λ_j, 0)·|e_{r,j}| / ‖e_j‖`.

    Args:
        eigenvalues: `[..., K]`, descending (as from `generalized_eigh` or `discriminants`; note
            `torch.linalg.eigh` is ascending).
        eigenvectors: `[..., D, K]`, discriminants as columns: all `D` of `generalized_eigh`, or the top `K`
            of `discriminants`.
        k: how many leading discriminants (the first k columns) count (default all `K`; `C - 1` carry all the
            between-class scatter).

    Returns:
        `[..., D]` utility per neuron (row of `eigenvectors`), in the promoted input dtype.
    """
    lam = _checks.features(eigenvalues, "discriminant_utility", "eigenvalues")
    vec = _checks.column_stack(eigenvectors, "discriminant_utility", "eigenvectors")
    _checks.same_device("discriminant_utility", eigenvalues=lam, eigenvectors=vec)
    if k is not None:
        k = _checks.integer(k, "discriminant_utility", "k", minimum=0)
    if lam.shape != vec.shape[:-2] + vec.shape[-1:] or not _compiled("discriminant_utility", vec) or \
            _differentiating(lam, vec):
        return reference.discriminant_utility(lam, vec, k)
    return torch.ops.gpp_ext.discriminant_utility(lam, vec, k)


def fisher_utility(stats: ScatterStats, eps: float = 1e-6) -> torch.Tensor:
    """Per-neuron Fisher ratio `v_j = S_b[j,j] / (S_w[j,j] + eps·tr(S_t)/D)`, `[D]` float64.

    Exact as a discriminant measure when the scatter matrices are near diagonal. The ridge is relative to the
    total scatter, so the utility does not depend on the features' scale; a neuron with no variance gets 0.
    """
    count, mean, within = _checks.stats_tensors(stats, "fisher_utility", "stats", counts=True, on_device=_data_checks)
    eps = _checks.real(eps, "fisher_utility", "eps")
    if not _compiled("fisher_utility", mean) or _differentiating(count, mean, within):
        return reference.fisher_utility(stats, eps)
    return torch.ops.gpp_ext.fisher_utility(count, mean, within, eps)


def deconv_backproject(signal: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1,
                       output_size=None) -> torch.Tensor:
    """Carries a signal at a layer's output back to the layer's input through its weight.

    For a convolution weight `[C_out, C_in/groups, k...]` this is the transposed convolution with the layer's
    stride, padding, dilation and groups (the adjoint of the forward convolution), mapping `signal
    [B, C_out, H, W]` (or 1-D/3-D) to `[B, C_in, H_in, W_in]`; pass `output_size` (the layer input's spatial
    size, or its full shape) when a stride makes it ambiguous. For a linear weight `[out, in]`, `signal [B, out]`
    maps to `signal @ weight`, `[B, in]`. `signal` and `weight` share a dtype and a device.
    """
    signal, weight, stride, padding, dilation, groups, output_size = _checks.deconv_arguments(
        signal, weight, stride, padding, dilation, groups, output_size)
    if not _compiled("deconv_backproject", signal) or _differentiating(signal, weight):
        return reference.deconv_backproject(signal, weight, stride, padding, dilation, groups, output_size)
    return torch.ops.gpp_ext.deconv_backproject(signal, weight, stride, padding, dilation, groups, output_size)


def slice_channels(t: torch.Tensor, dim: int, index) -> torch.Tensor:
    """Contiguous copy of `t` keeping the entries `index` (`[K]` ints, any order, repeats allowed) along `dim`.

    Used to slice weights, biases and BatchNorm buffers when channels are pruned; any dtype. `index` is a
    sequence of ints (floats and bools are refused, not truncated) or an integer tensor on `t`'s device.
    """
    t = _checks.tensor(t, "slice_channels", "t")
    index = _checks.channel_index(index, "slice_channels", t.device)
    dim = _checks.integer(dim, "slice_channels", "dim")
    if not _compiled("slice_channels", t) or _differentiating(t):
        return reference.slice_channels(t, dim, index)
    if _check_on_device(t) and -t.dim() <= dim < t.dim():
        _checks.index_in_range(index, t.shape[dim], dim % t.dim(), t.shape, "slice_channels")  # one sync
    return torch.ops.gpp_ext.slice_channels(t, dim, index)


# ------------------------------------------------------------------- fake kernels and autograd formulas

def _register():
    lib = "gpp_ext::"

    @torch.library.register_fake(lib + "class_scatter")
    def _(x, y, num_classes):
        d = x.shape[1]
        f64 = dict(dtype=torch.float64)
        return x.new_empty((num_classes,), **f64), x.new_empty((num_classes, d), **f64), x.new_empty((d, d), **f64)

    @torch.library.register_fake(lib + "class_scatter_backward")
    def _(grad_mean, grad_within, x, y, count, mean):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "merge_scatter")
    def _(count_a, mean_a, within_a, count_b, mean_b, within_b):
        return count_a.new_empty(count_a.shape), mean_a.new_empty(mean_a.shape), within_a.new_empty(within_a.shape)

    @torch.library.register_fake(lib + "generalized_eigh")
    def _(a, b, ridge):
        dtype = torch.promote_types(a.dtype, b.dtype)
        return a.new_empty(a.shape[:-1], dtype=dtype), a.new_empty(a.shape, dtype=dtype)

    @torch.library.register_fake(lib + "discriminants")
    def _(count, mean, within, ridge, k):
        return mean.new_empty((k,)), mean.new_empty((mean.shape[1], k)), mean.new_empty((14,))

    @torch.library.register_fake(lib + "discriminant_utility")
    def _(eigenvalues, eigenvectors, k):
        return eigenvalues.new_empty(eigenvectors.shape[:-1],
                                     dtype=torch.promote_types(eigenvalues.dtype, eigenvectors.dtype))

    @torch.library.register_fake(lib + "fisher_utility")
    def _(count, mean, within, eps):
        return mean.new_empty((mean.shape[1],))

    @torch.library.register_fake(lib + "deconv_backproject")
    def _(signal, weight, stride, padding, dilation, groups, output_size):
        if weight.dim() == 2:
            return signal.new_empty((signal.shape[0], weight.shape[1]))
        spatial = weight.dim() - 2
        expand = [(v * spatial if len(v) == 1 else list(v)) for v in (stride, padding, dilation)]
        extra = _checks.deconv_output_padding(signal.shape, weight.shape, *expand, output_size)
        s, p, dl = expand
        sizes = [(signal.shape[2 + i] - 1) * s[i] - 2 * p[i] + dl[i] * (weight.shape[2 + i] - 1) + 1 + extra[i]
                 for i in range(spatial)]
        return signal.new_empty((signal.shape[0], weight.shape[1] * groups, *sizes))

    @torch.library.register_fake(lib + "slice_channels")
    def _(t, dim, index):
        shape = list(t.shape)
        shape[dim] = index.shape[0]
        return t.new_empty(shape)

    def class_scatter_setup(ctx, inputs, output):
        x, y, _ = inputs
        count, mean, _ = output
        ctx.save_for_backward(x, y, count, mean)

    def class_scatter_backward(ctx, grad_count, grad_mean, grad_within):
        x, y, count, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        d = x.shape[1]
        if grad_mean is None:
            grad_mean = mean.new_zeros(mean.shape)
        if grad_within is None:
            grad_within = mean.new_zeros((d, d))
        if torch.is_grad_enabled():  # a gradient of this gradient is wanted (create_graph): differentiable ops
            centred = x.double() - mean[y]
            grad_x = centred @ (grad_within + grad_within.mT) + grad_mean[y] / count[y].clamp_min(1.0).unsqueeze(1)
            return grad_x.to(x.dtype), None, None
        return torch.ops.gpp_ext.class_scatter_backward(grad_mean, grad_within, x, y, count, mean), None, None

    torch.library.register_autograd(lib + "class_scatter", class_scatter_backward,
                                    setup_context=class_scatter_setup)

    def merge_setup(ctx, inputs, output):
        count_a, mean_a, _, count_b, mean_b, _ = inputs
        ctx.save_for_backward(count_a, mean_a, count_b, mean_b)

    def merge_backward(ctx, grad_count, grad_mean, grad_within):
        ca, ma, cb, mb = ctx.saved_tensors
        n = ca + cb
        safe = n.clamp_min(1e-300)
        fa = torch.where(n > 0, ca / safe, torch.zeros_like(n)).unsqueeze(1)
        fb = torch.where(n > 0, cb / safe, torch.zeros_like(n)).unsqueeze(1)
        g_ma = torch.zeros_like(ma)
        g_mb = torch.zeros_like(mb)
        g_w = None
        if grad_mean is not None:
            g_ma = g_ma + grad_mean * fa
            g_mb = g_mb + grad_mean * fb
        if grad_within is not None:
            g_sym = grad_within + grad_within.mT
            g_delta = (ca.unsqueeze(1) * fb) * ((ma - mb) @ g_sym)
            g_ma = g_ma + g_delta
            g_mb = g_mb - g_delta
            g_w = 0.5 * g_sym
        return None, g_ma, g_w, None, g_mb, g_w

    torch.library.register_autograd(lib + "merge_scatter", merge_backward, setup_context=merge_setup)


if _C is not None:
    _register()
    # the fake (meta) kernels exist only now: a meta tensor takes them (shape inference, torch.compile's tracing)
    _KERNELS.update({(op, "meta"): torch._C._dispatch_has_kernel_for_dispatch_key(f"gpp_ext::{op}", "Meta")
                     for op in _OPS})
