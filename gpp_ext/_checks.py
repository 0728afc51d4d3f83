"""Argument validation shared by the public ops (`gpp_ext.ops`) and the reference ops (`gpp_ext.reference`).

Every error names the op, the argument and what was expected, and uses the exception a Python user expects:
`TypeError` for a wrong kind of object or dtype, `ValueError` for a wrong shape or value. The C++ kernels
raise the same exceptions with the same wording (csrc/common/checks.h), so the two paths read alike.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

_FEATURE_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


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
    if y.device != x.device:
        raise ValueError(f"{op}: x and y must be on the same device, got {x.device} and {y.device}")
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


def stats_tensors(stats, op: str, arg: str):
    """The (count, mean, within) of a ScatterStats (which checks float64, shapes and device when it is built)."""
    from .stats import ScatterStats

    if not isinstance(stats, ScatterStats):
        raise TypeError(f"{op}: {arg} must be a ScatterStats (from gpp_ext.ops.class_scatter), "
                        f"got {type(stats).__name__}")
    return stats.count, stats.mean, stats.within


def square_stack(a, op: str, arg: str) -> torch.Tensor:
    a = features(a, op, arg)
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{op}: {arg} must be a (batch of) square matrices [..., D, D], got shape {tuple(a.shape)}")
    return a


def int_list(value, op: str, arg: str) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, Sequence) and value and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    raise TypeError(f"{op}: {arg} must be an int or a non-empty sequence of ints, got {value!r}")


def channel_index(index, op: str, device) -> torch.Tensor:
    if isinstance(index, (list, tuple, range)):
        index = torch.tensor(list(index), dtype=torch.long, device=device)
    index = tensor(index, op, "index")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"{op}: index must be an integer tensor of positions (for a boolean mask use "
                        f"mask.nonzero().squeeze(1)), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: index must be 1-D [K], got shape {tuple(index.shape)}")
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
