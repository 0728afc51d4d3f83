"""Argument validation shared by the public ops (`gpp_ext.ops`) and the reference ops (`gpp_ext.reference`).

Every error names the op, the argument and what was expected, and uses the exception a Python user expects:
`TypeError` for a wrong kind of object or dtype, `ValueError` for a wrong shape or value. The C++ kernels
raise the same exceptions with the same wording (csrc/common/checks.h), so the two paths read alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

_FEATURE_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)

# generalized_eigh's data checks (`eigh_data`):
# A b-diagonal entry at or below this fraction of the largest is a dead (zero-variance) dimension.
DEAD_RELATIVE = 1e-12
# `a` or `b` is symmetric when max|m - m^T| <= SYMMETRY_EPS * eps(dtype) * max|m|. Rounding alone leaves a
# Gram or scatter product with inner length K asymmetric by ~sqrt(K) eps (2K eps at worst; in practice
# under 1 eps, as BLAS sums (i, j) and (j, i) alike); 1024 eps (2.3e-13 in float64, 1.2e-4 in float32) covers
# a million samples at typical rounding, or a thousand classes at worst, while a matrix that is not symmetric
# at all (S_w^-1 S_b, a product in the wrong order) is off by ~max|m|, 1e12 times more in float64.
SYMMETRY_EPS = 1024
# The eigenvalues of `a e = λ b' e` carry relative errors up to ~cond(b')·eps: float64 rounding in the solve
# (measured: 0.05-0.2 cond·eps64), and for a float32 b the float32 rounding of b itself, which moves the
# eigenvalues by up to cond·eps32 whatever precision the solve runs in. Above CONDITION_ERROR they may have
# lost all but 3 significant digits (float64: cond > 4.5e12; float32: cond > 8.4e3) and the op raises.
CONDITION_ERROR = 1e-3


def tensor(value, op: str, arg: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{op}: {arg} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def features(x, op: str, arg: str = "x") -> torch.Tensor:
    """A floating tensor computed in float32 or float64 (half precisions are upcast to float32)."""
    x = tensor(x, op, arg)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {arg} must be a floating-point tensor, got {x.dtype}")
    if x.dtype in _UPCAST_DTYPES:
        x = x.float()
    elif x.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{op}: {arg} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def integer(value, op: str, arg: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {arg} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {arg} must be >= {minimum}, got {value}")
    return value


def real(value, op: str, arg: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {arg} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value == value and abs(value) != float("inf")) or value < minimum:
        raise ValueError(f"{op}: {arg} must be finite and >= {minimum}, got {value}")
    return value


def same_device(op: str, **tensors) -> None:
    """All the named tensors on one device (checked before any work: a mixed call would fail deep in a kernel,
    or read a meta tensor's missing data)."""
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {first} and {name} must be on the same device, got {first} on {t0.device} "
                             f"and {name} on {t.device}; move one with .to(), e.g. {name}.to({first}.device)")


def scatter_inputs(x, y, num_classes, op: str = "class_scatter"):
    """Shape/dtype checks of class_scatter; returns (x, y as int64, num_classes)."""
    x = features(x, op, "x")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, D], got shape {tuple(x.shape)}")
    y = tensor(y, op, "y")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{op}: y must be an integer tensor of class labels, got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{op}: y must be 1-D [N], got shape {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: y must hold one label per row of x, got {y.shape[0]} labels for {x.shape[0]} rows")
    same_device(op, x=x, y=y)
    num_classes = integer(num_classes, op, "num_classes", minimum=1)
    return x, y.long(), num_classes


def labels_in_range(y: torch.Tensor, num_classes: int, op: str = "class_scatter") -> None:
    """Data-dependent check (syncs on GPU); the C++ kernels do it inside their counting pass."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: y must hold labels in [0, num_classes) = [0, {num_classes}), got {bad}")


def stats_tensors(stats, op: str, arg: str, counts: bool = False, on_device: bool = True):
    """The (count, mean, within) of a ScatterStats (which checks float64, shapes and device when it is built);
    with `counts`, the counts must be finite and >= 0 (the compiled and reference discriminants would read
    a negative count differently). Off the CPU that check reads a flag back to the host: only with `on_device`
    (`gpp_ext.ops` passes its `data_checks` setting)."""
    from .stats import ScatterStats

    if not isinstance(stats, ScatterStats):
        raise TypeError(f"{op}: {arg} must be a ScatterStats (from gpp_ext.ops.class_scatter), "
                        f"got {type(stats).__name__}")
    if counts:
        c = stats.count
        if (c.device.type == "cpu" or on_device and c.device.type != "meta") and \
                not torch.compiler.is_compiling() and not bool((torch.isfinite(c) & (c >= 0)).all()):
            raise ValueError(f"{op}: {arg}.count must hold finite sample counts >= 0, got {c.tolist()[:8]}")
    return stats.count, stats.mean, stats.within


def square_stack(a, op: str, arg: str) -> torch.Tensor:
    a = features(a, op, arg)
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{op}: {arg} must be a (batch of) square matrices [..., D, D], got shape {tuple(a.shape)}")
    return a


def column_stack(a, op: str, arg: str) -> torch.Tensor:
    """A (batch of) matrices `[..., D, K]` of column vectors."""
    a = features(a, op, arg)
    if a.dim() < 2:
        raise ValueError(f"{op}: {arg} must be a (batch of) matrices [..., D, K] with vectors as columns, got "
                         f"shape {tuple(a.shape)}")
    return a


# What discriminants' messages call the two sides of its problem.
DISCRIMINANT_NAMES = ("the between-class scatter (from stats.mean and stats.count)", "stats.within")


def discriminant_count(k, num_classes: int, dim: int, op: str = "discriminants") -> int:
    """How many discriminants: `k` in `[0, min(C, D)]`, default `min(C - 1, D)` (at least 0)."""
    most = min(num_classes, dim)
    if k is None:
        return max(min(num_classes - 1, dim), 0)
    k = integer(k, op, "k", minimum=0)
    if k > most:
        raise ValueError(f"{op}: k must be in [0, min(C, D)] = [0, {most}] (S_b has rank at most C - 1, so no "
                         f"eigenvalue past the C-th is non-zero), got {k}")
    return k


def symmetry_tolerance(dtype) -> float:
    """Largest accepted `max|m - m^T| / max|m|` of a generalized_eigh input of this dtype."""
    return SYMMETRY_EPS * torch.finfo(dtype).eps


def max_condition(dtype) -> float:
    """Largest accepted condition number of generalized_eigh's `b + ridge` for a `b` of this dtype."""
    return CONDITION_ERROR / torch.finfo(dtype).eps


def _entry(flat: int, batch_shape) -> str:
    """' (batch entry i)' for a stack of matrices, '' for a single one."""
    if not batch_shape:
        return ""
    if len(batch_shape) == 1:
        return f" (batch entry {flat})"
    index = []
    for size in reversed(batch_shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return f" (batch entry {tuple(reversed(index))})"


def _condition_estimate(b: torch.Tensor, chol: torch.Tensor, steps: int = 4):
    """Lower bounds of the extreme eigenvalues of SPD `b [k, D, D]` from its Cholesky factor, O(steps·D^2) each.

    `λ_max >= max(b_ii, L_ii^2, |b v|)` and `λ_min <= min(L_ii^2, 1/|b^-1 v|)` for unit `v` after a few steps of
    power and inverse iteration (through the factor) from a fixed pseudo-random start. Their ratio never exceeds
    cond(b) (up to rounding); inverse iteration finds an isolated small eigenvalue in a step or two, and the
    pivots `L_ii^2` find the near-collinear features Cholesky meets.
    """
    d = b.shape[-1]
    pivots = chol.diagonal(dim1=-2, dim2=-1) ** 2
    j = torch.arange(d, dtype=torch.float64, device=b.device).unsqueeze(-1)
    start = torch.frac(torch.sin(12.9898 * j + 78.233) * 43758.5453) - 0.5  # made on the device: no transfer
    start = (start / start.norm()).expand(b.shape[0], d, 1)
    high = torch.maximum(b.diagonal(dim1=-2, dim2=-1).amax(-1), pivots.amax(-1))
    inverse_norm = torch.zeros_like(high)
    v, w = start, start
    for _ in range(steps):
        bv = b @ v
        norm = bv.norm(dim=(-2, -1))
        high = torch.fmax(high, norm)
        v = bv / norm.clamp_min(1e-300).view(-1, 1, 1)
        inv = torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, w, upper=False), upper=True)
        norm = inv.norm(dim=(-2, -1))
        inverse_norm = torch.fmax(inverse_norm, norm)
        w = inv / norm.clamp_min(1e-300).view(-1, 1, 1)
    low = torch.minimum(pivots.amin(-1), 1.0 / inverse_norm)
    return high, low


@torch.no_grad()
def eigh_data(a: torch.Tensor, b: torch.Tensor, ridge: float, op: str = "generalized_eigh", names=("a", "b")):
    """generalized_eigh's data checks, read back in one synchronisation (on a GPU); `a`, `b` are validated,
    same-shape, non-empty `[..., D, D]` stacks.

    Checks, in order: finite `a` and `b`; `a` and `b` symmetric to `symmetry_tolerance` (then symmetrised); a
    non-negative diagonal of `b`; `b + r I` positive definite on the live (non-dead) dimensions; and its
    condition number (estimated by `_condition_estimate` on the live block) at most `max_condition(b.dtype)`.
    Returns `(dead, any_dead)`: the `[k, D]` mask of dead dimensions of the `[k, D, D]` stack (no variance in
    `b` nor in `a`), and whether there is any. `names` are what the messages call `a` and `b`.
    """
    d = a.shape[-1]
    batch = tuple(a.shape[:-2])
    A = a.detach().reshape(-1, d, d)  # in its own dtype: only its asymmetry and diagonal are needed
    B = b.detach().reshape(-1, d, d)

    def magnitude(m):  # max|m| per matrix; NaN or inf when m holds one (amax and amin propagate NaN)
        return torch.maximum(m.amax((-2, -1)), -m.amin((-2, -1))).double()

    def asymmetry(m, size):  # max|m - m^T| / max|m| per matrix
        gap = (m - m.mT).abs_().amax((-2, -1)).double()
        return torch.where(size > 0, gap / size.clamp_min(1e-300), torch.zeros_like(gap))

    size_a, size_b = magnitude(A), magnitude(B)
    finite_a, finite_b = torch.isfinite(size_a), torch.isfinite(size_b)
    asym_a, asym_b = asymmetry(A, size_a), asymmetry(B, size_b)
    B = B.to(torch.float64)
    S = torch.add(B, B.mT).mul_(0.5)  # symmetrised b, in float64 as the solve; made into the live block below
    diag = S.diagonal(dim1=-2, dim2=-1).clone()
    largest = diag.abs().amax(-1, keepdim=True)
    a_diag = A.diagonal(dim1=-2, dim2=-1).abs().double()
    dead = (diag <= DEAD_RELATIVE * largest) & (a_diag <= DEAD_RELATIVE * a_diag.amax(-1, keepdim=True))
    # The live block of b + r I, with the dead rows and columns replaced by a diagonal entry from inside its
    # spectrum (its largest diagonal entry), so that it keeps the live block's condition number; scaled to a
    # unit largest diagonal (which changes no condition number), so that no norm over- or underflows.
    trace = diag.sum(-1)
    shift = trace * (ridge / d)
    ridged_diag = diag + shift.unsqueeze(-1)
    fill = torch.where(dead, torch.full_like(diag, -float("inf")), ridged_diag).amax(-1, keepdim=True)
    fill = torch.where(torch.isfinite(fill), fill, torch.ones_like(fill))
    live = (~dead).to(S.dtype)
    S.mul_(live.unsqueeze(-1)).mul_(live.unsqueeze(-2))
    new_diag = torch.where(dead, fill.expand_as(diag), ridged_diag)
    S.diagonal(dim1=-2, dim2=-1).copy_(new_diag)
    usable = finite_b & torch.isfinite(new_diag).all(-1)
    scale = new_diag.amax(-1)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    S.div_(scale.view(-1, 1, 1))
    chol, info = torch.linalg.cholesky_ex(S)  # NaN or inf entries fail it (info > 0): no exception
    failed = info != 0
    high, low = _condition_estimate(S, chol)
    ignored = failed | ~usable  # their estimates are meaningless; they raise before the estimate is read
    cond = torch.where(ignored, torch.zeros_like(high), high / low.clamp_min(1e-300))
    # The ridge that brings cond below a tenth of the limit: (λ_max + r)/(λ_min + r) <= c for r >= ...
    c = max_condition(b.dtype) / 10
    extra = ((high - c * low) / (c - 1)).clamp_min(0.0)
    needed = torch.where(ignored | (trace <= 0), torch.zeros_like(trace),
                         ridge + extra * scale * d / trace.clamp_min(1e-300))
    f64 = dict(dtype=torch.float64)
    flags = torch.stack([
        (~finite_a).any().to(**f64), (~finite_b).any().to(**f64),
        asym_a.amax().to(**f64), asym_a.argmax().to(**f64), asym_b.amax().to(**f64), asym_b.argmax().to(**f64),
        (diag < -DEAD_RELATIVE * largest).any().to(**f64), (~usable & finite_b).any().to(**f64),
        failed.any().to(**f64), failed.int().argmax().to(**f64),
        cond.amax(), cond.argmax().to(**f64), needed.amax(), dead.any().to(**f64),
    ]).tolist()
    raise_eigh_flags(flags, ridge, op, names, (a.dtype, b.dtype), batch)
    return dead, bool(flags[-1])


# The order of the data flags `eigh_data` computes and the discriminants kernel returns (csrc/common/
# discriminants.h): 14 float64 numbers, the "_at" ones batch entries.
EIGH_FLAGS = ("nonfinite_a", "nonfinite_b", "asym_a", "asym_a_at", "asym_b", "asym_b_at", "negative", "overflow",
              "failed", "failed_at", "cond", "cond_at", "needed_ridge", "any_dead")


def raise_eigh_flags(flags, ridge: float, op: str, names=("a", "b"), dtypes=(torch.float64, torch.float64),
                     batch=()) -> None:
    """Raises the ValueError the first failing data check of a generalized eigenproblem `a e = λ b' e` calls
    for, from its flags (`EIGH_FLAGS`, read back as numbers). `names` are what the messages call `a` and `b`,
    `dtypes` their dtypes (the tolerances depend on them), `batch` the stack's batch shape."""
    (nonfinite_a, nonfinite_b, asym_a_max, asym_a_at, asym_b_max, asym_b_at, negative, overflow,
     any_failed, failed_at, cond_max, cond_at, needed_max, _) = flags
    a_name, b_name = names
    if nonfinite_a:
        raise ValueError(f"{op}: {a_name} must be finite, found NaN or Inf")
    if nonfinite_b:
        raise ValueError(f"{op}: {b_name} must be finite, found NaN or Inf")
    for name, dtype, worst, at in ((a_name, dtypes[0], asym_a_max, asym_a_at),
                                   (b_name, dtypes[1], asym_b_max, asym_b_at)):
        tol = symmetry_tolerance(dtype)
        if worst > tol:
            raise ValueError(f"{op}: {name} must be symmetric, got max|{name} - {name}^T| = {worst:.2e} "
                             f"x max|{name}|{_entry(int(at), batch)}, above the {tol:.1e} that rounding explains "
                             f"for {dtype}; pass the symmetric matrix itself (e.g. a scatter or covariance "
                             f"matrix), not a product such as inv(S_w) @ S_b")
    if negative:
        raise ValueError(f"{op}: {b_name} must be positive semi-definite (a scatter or covariance matrix), "
                         f"found a negative diagonal")
    if overflow:
        raise ValueError(f"{op}: {b_name} + ridge·tr({b_name})/D·I overflows float64 (ridge={ridge:g}); pass a "
                         f"smaller ridge")
    if any_failed:
        where = _entry(int(failed_at), batch)
        if ridge == 0:
            raise ValueError(f"{op}: {b_name} (+ ridge) is not positive definite on its non-dead dimensions{where}; "
                             f"{b_name} is singular, e.g. fewer samples than dimensions, collinear features, or a "
                             f"feature constant within every class but not across classes. Pass ridge > 0 "
                             f"(ridge=1e-6 regularises it slightly, 1e-3 is a common choice).")
        raise ValueError(f"{op}: {b_name} (+ ridge) is not positive definite on its non-dead dimensions{where} "
                         f"even with ridge={ridge:g}: {b_name} has a negative eigenvalue below "
                         f"-ridge·tr({b_name})/D, so it is not a scatter or covariance matrix (check how it is "
                         f"computed), or pass ridge > {ridge:g}.")
    limit = max_condition(dtypes[1])
    if cond_max > limit:
        exponent = math.ceil(math.log10(needed_max)) if 0 < needed_max < float("inf") else -3
        suggest = f"1e{max(exponent, -6)}"
        precision = (f"; {b_name} is {dtypes[1]}, and its own rounding moves the eigenvalues by up to cond·eps: "
                     f"compute it in float64 (class_scatter's statistics are float64)"
                     if dtypes[1] != torch.float64 else "")
        raise ValueError(f"{op}: {b_name} (+ ridge) is ill-conditioned{_entry(int(cond_at), batch)}: condition "
                         f"number ~{cond_max:.1e} (estimated from its Cholesky factor), so the eigenvalues may be "
                         f"off by up to cond·eps = {cond_max * torch.finfo(dtypes[1]).eps:.1e} relative; {op} "
                         f"accepts cond <= {limit:.1e} for {dtypes[1]} (eigenvalues good to "
                         f"~{CONDITION_ERROR:g}). {b_name} is nearly singular: nearly collinear features, or a "
                         f"feature (almost) constant within every class. Pass ridge={suggest} (or larger) to "
                         f"regularise it{precision}.")


def int_list(value, op: str, arg: str) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, Sequence) and value and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    raise TypeError(f"{op}: {arg} must be an int or a non-empty sequence of ints, got {value!r}")


def _is_int(v) -> bool:
    """An int (Python, NumPy) or a 0-d integer tensor; not a bool."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not (v.dtype == torch.bool or v.is_floating_point() or v.is_complex())
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def channel_index(index, op: str, device) -> torch.Tensor:
    """A 1-D int64 index on `device`: a sequence of ints (not floats or bools, which would be truncated or
    read as 0/1) or an integer tensor already on `device`."""
    if isinstance(index, (list, tuple, range)):
        bad = next((v for v in index if not _is_int(v)), None)
        if bad is not None:
            boolean = isinstance(bad, bool) or (isinstance(bad, torch.Tensor) and bad.dtype == torch.bool)
            why = ("it would be read as position 0 or 1; for a boolean mask pass mask.nonzero().squeeze(1)"
                   if boolean else "it would be truncated; pass int positions")
            raise TypeError(f"{op}: index must hold ints (positions along dim), got {bad!r} "
                            f"({type(bad).__name__}): {why}")
        if any(not -2 ** 63 <= int(v) < 2 ** 63 for v in index):
            raise ValueError(f"{op}: index must hold int64 positions, got {max(index, key=lambda v: abs(int(v)))}")
        index = torch.tensor(list(index), dtype=torch.long, device=device)
    index = tensor(index, op, "index")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"{op}: index must be an integer tensor of positions (for a boolean mask use "
                        f"mask.nonzero().squeeze(1)), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: index must be 1-D [K], got shape {tuple(index.shape)}")
    if index.device != torch.device(device):
        raise ValueError(f"{op}: t and index must be on the same device, got t on {torch.device(device)} and "
                         f"index on {index.device}; move index with index.to(t.device)")
    return index.long()


def scatter_data_on_device(y: torch.Tensor, num_classes: int, stats, op: str = "class_scatter") -> None:
    """The data checks of class_scatter for a GPU kernel, read back in one synchronisation."""
    if y.numel() == 0:
        return
    flags = torch.stack([y.min() < 0, y.max() >= num_classes, ~torch.isfinite(stats.mean).all(),
                         ~torch.isfinite(stats.within).all()]).tolist()
    if flags[0] or flags[1]:
        labels_in_range(y, num_classes, op)
    if flags[2]:
        raise ValueError(f"{op}: x must be finite, found NaN or Inf")
    if flags[3]:
        raise ValueError(f"{op}: the within-class scatter overflowed float32; pass x as float64")


def index_in_range(index: torch.Tensor, size: int, dim: int, shape, op: str = "slice_channels") -> None:
    """Data-dependent check of a channel index against the size of `dim` (syncs on a GPU)."""
    if index.numel() == 0:
        return
    lo, hi = index.aminmax()
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= size:
        raise ValueError(f"{op}: index must hold entries in [0, {size}) for dim {dim} of t {tuple(shape)}, "
                         f"got {lo if lo < 0 else hi}")


def deconv_output_padding(signal_shape, weight_shape, stride, padding, dilation, output_size):
    """The output_padding that makes a transposed convolution produce `output_size` (the layer's input size)."""
    op = "deconv_backproject"
    spatial = len(weight_shape) - 2
    extra = []
    for i in range(spatial):
        minimal = (signal_shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight_shape[2 + i] - 1) + 1
        if output_size is None:
            if minimal < 1:
                raise ValueError(f"{op}: the transposed convolution would have an empty output for signal "
                                 f"{list(signal_shape)}; check stride and padding")
            extra.append(0)
            continue
        e = output_size[i] - minimal
        if not 0 <= e < max(stride[i], dilation[i]):
            raise ValueError(f"{op}: output_size {list(output_size)} is not an input size that this convolution "
                             f"maps to the signal's spatial size {list(signal_shape[2:])}")
        extra.append(e)
    return extra


def deconv_arguments(signal, weight, stride, padding, dilation, groups, output_size):
    """Validates and normalises deconv_backproject's arguments (shared with `gpp_ext.ops`)."""
    op = "deconv_backproject"
    signal = features(signal, op, "signal")
    weight = features(weight, op, "weight")
    same_device(op, signal=signal, weight=weight)
    if signal.dtype != weight.dtype:
        raise TypeError(f"{op}: signal and weight must share a dtype, got {signal.dtype} and {weight.dtype}")
    if not 2 <= weight.dim() <= 5:
        raise ValueError(f"{op}: weight must be a linear weight [out, in] or a convolution weight "
                         f"[C_out, C_in/groups, k...], got shape {tuple(weight.shape)}")
    groups = integer(groups, op, "groups", minimum=1)
    if weight.dim() == 2:
        if groups != 1:
            raise ValueError(f"{op}: groups must be 1 for a linear weight, got {groups}")
        if signal.dim() != 2 or signal.shape[1] != weight.shape[0]:
            raise ValueError(f"{op}: signal must be [B, out_features] = [B, {weight.shape[0]}] for a linear weight "
                             f"{tuple(weight.shape)}, got {tuple(signal.shape)}")
        return signal, weight, [1], [0], [1], 1, None
    spatial = weight.dim() - 2
    if signal.dim() != weight.dim() or signal.shape[1] != weight.shape[0]:
        raise ValueError(f"{op}: signal must be [B, {weight.shape[0]}, spatial...] with {spatial} spatial dims for "
                         f"weight {tuple(weight.shape)}, got {tuple(signal.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups ({groups}) must divide the output channels of weight ({weight.shape[0]})")
    params = []
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        v = int_list(value, op, name)
        if len(v) not in (1, spatial):
            raise ValueError(f"{op}: {name} must have 1 or {spatial} entries for a {spatial}-D convolution, got {v}")
        params.append(v * spatial if len(v) == 1 else v)
    stride, padding, dilation = params
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    if output_size is not None:
        output_size = int_list(output_size, op, "output_size")
        if len(output_size) == spatial + 2:  # a full input shape [B, C_in, spatial...]
            output_size = output_size[2:]
        if len(output_size) != spatial:
            raise ValueError(f"{op}: output_size must list the {spatial} spatial sizes of the layer input, "
                             f"got {output_size}")
    return signal, weight, stride, padding, dilation, groups, output_size
