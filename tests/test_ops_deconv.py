"""deconv_backproject.

Oracle: the transposed convolution is the adjoint of the forward convolution, i.e. the vector-Jacobian product
of F.conv*d with respect to its input, which autograd computes independently. Same float32 arithmetic, different
summation order: held to 1e-5 relative (float32 sums of up to C_out·k² ≈ 600 terms, ~sqrt(600)·eps32·10).
"""

import pytest
import torch
import torch.nn.functional as F

from gpp_ext import ops, reference
from gpp_ext.testing import make_conv_case, rel_err


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def adjoint(signal, weight, input_shape, stride, padding, dilation, groups):
    inp = torch.zeros(input_shape, dtype=signal.dtype, requires_grad=True)
    out = CONV[weight.dim() - 2](inp, weight, None, stride, padding, dilation, groups)
    assert out.shape == signal.shape
    (grad,) = torch.autograd.grad(out, inp, signal)
    return grad


CASES = [  # c_in, c_out, size, kernel, stride, padding, dilation, groups, dims
    (3, 16, 12, 3, 1, 1, 1, 1, 2),
    (16, 32, 15, 3, 2, 1, 1, 1, 2),  # odd size, stride 2: output_size disambiguates
    (8, 8, 14, 5, 2, 2, 1, 8, 2),  # depthwise
    (12, 18, 13, 3, 1, 2, 2, 3, 2),  # grouped, dilated
    (64, 64, 9, 1, 1, 0, 1, 1, 2),  # 1x1
    (6, 10, 31, 4, 3, 1, 1, 2, 1),  # 1-D
    (4, 6, 7, 3, 2, 1, 1, 1, 3),  # 3-D
]


@pytest.mark.parametrize("c_in,c_out,size,kernel,stride,padding,dilation,groups,dims", CASES)
def test_matches_adjoint_of_convolution(impl, device, c_in, c_out, size, kernel, stride, padding, dilation, groups,
                                        dims):
    # float64 on a GPU: cuDNN may use TF32 for float32 convolutions by default
    dtype = torch.float32 if device.type == "cpu" else torch.float64
    signal, weight, input_shape = make_conv_case(2, c_in, c_out, size, kernel, stride=stride, padding=padding,
                                                 dilation=dilation, groups=groups, dims=dims, seed=size, dtype=dtype)
    expected = adjoint(signal, weight, input_shape, stride, padding, dilation, groups)
    signal, weight = signal.to(device), weight.to(device)
    got = impl.deconv_backproject(signal, weight, stride, padding, dilation, groups, output_size=input_shape[2:])
    assert got.device == signal.device
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5
    # the full input shape is accepted as output_size too
    full = impl.deconv_backproject(signal, weight, stride, padding, dilation, groups, output_size=input_shape)
    assert torch.equal(full, got)


def test_ops_matches_reference_without_output_size():
    signal, weight, _ = make_conv_case(3, 16, 24, 16, 3, stride=2, padding=1)
    got = ops.deconv_backproject(signal, weight, stride=2, padding=1)
    ref = reference.deconv_backproject(signal, weight, stride=2, padding=1)
    assert got.shape == ref.shape == (3, 16, 15, 15)  # the minimal size without output_size
    assert rel_err(got, ref) < 1e-6


def test_linear_weight(impl):
    weight = torch.randn(10, 84, dtype=torch.float64)
    signal = torch.randn(5, 10, dtype=torch.float64)
    inp = torch.zeros(5, 84, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(F.linear(inp, weight), inp, signal)
    assert rel_err(impl.deconv_backproject(signal, weight), expected) < 1e-14


def test_non_contiguous_and_float64(impl):
    signal, weight, input_shape = make_conv_case(2, 8, 8, 10, 3, padding=1, dtype=torch.float64)
    got = impl.deconv_backproject(signal.transpose(2, 3).contiguous().transpose(2, 3), weight, padding=1)
    assert got.dtype == torch.float64
    assert rel_err(got, adjoint(signal, weight, input_shape, 1, 1, 1, 1)) < 1e-12


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(signal=torch.randn(1, 5, 4, 4)), ValueError, r"signal must be \[B, 8"),
    (dict(groups=3), ValueError, "groups .* must divide"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(stride=(1, 2, 3)), ValueError, "stride must have 1 or 2 entries"),
    (dict(stride=0), ValueError, "stride and dilation must be >= 1"),
    (dict(output_size=(20, 20)), ValueError, "output_size .* is not an input size"),
    (dict(output_size=(8,)), ValueError, "output_size must list the 2 spatial sizes"),
    (dict(signal=torch.randn(1, 8, 4, 4, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(weight=torch.randn(8)), ValueError, "weight must be a linear weight"),
    (dict(stride=1.5), TypeError, "stride must be an int"),
])
def test_bad_arguments(impl, kwargs, error, match):
    args = dict(signal=torch.randn(1, 8, 4, 4), weight=torch.randn(8, 4, 3, 3), stride=1, padding=1, dilation=1,
                groups=1, output_size=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        impl.deconv_backproject(**args)


def test_gradient_flows(impl):
    signal, weight, shape = make_conv_case(2, 4, 6, 9, 3, stride=2, padding=1, dtype=torch.float64)
    signal.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, w: impl.deconv_backproject(s, w, 2, 1, 1, 1, shape), (signal, weight))


def test_opcheck():
    if not ops.has_kernel("deconv_backproject", "cpu"):
        pytest.skip("extension not built")
    signal, weight, input_shape = make_conv_case(2, 4, 6, 9, 3, stride=2, padding=1)
    op = torch.ops.gpp_ext.deconv_backproject.default
    torch.library.opcheck(op, (signal, weight, [2, 2], [1, 1], [1, 1], 1, list(input_shape[2:])))
    torch.library.opcheck(op, (signal, weight, [2], [1], [1], 1, None))
    torch.library.opcheck(op, (torch.randn(3, 5), torch.randn(5, 7), [1], [0], [1], 1, None))
