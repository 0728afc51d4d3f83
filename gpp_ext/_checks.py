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
                                 f"{tuple(signal_shape)}; check stride and padding")
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
        output_size = int_list(list(output_size), op, "output_size")
        if len(output_size) == spatial + 2:  # a full input shape [B, C_in, spatial...]
            output_size = output_size[2:]
        if len(output_size) != spatial:
            raise ValueError(f"{op}: output_size must list the {spatial} spatial sizes of the layer input, "
                             f"got {output_size}")
    return signal, weight, stride, padding, dilation, groups, output_size
