"""slice_channels: exact copies, so every comparison is bitwise."""

import pytest
import torch

from gpp_ext import ops



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_matches_index_select(impl, device, dtype, dim):
    # random values of every dtype (bool: half True), so a wrong index shows
    t = torch.randint(0, 2 if dtype == torch.bool else 100, (6, 7, 3, 5), device=device).to(dtype)
    size = t.shape[dim]
    index = torch.tensor([size - 1, 0, size // 2, size // 2], device=device)  # any order, repeats allowed
    out = impl.slice_channels(t, dim, index)
    assert out.is_contiguous()
    assert torch.equal(out, t.index_select(dim, index))


def test_permutation_and_list_index(impl):
    w = torch.randn(32, 16, 3, 3)
    perm = torch.randperm(32)
    assert torch.equal(impl.slice_channels(w, 0, perm), w[perm])
    assert torch.equal(impl.slice_channels(w, 1, [3, 1]), w[:, [3, 1]])
    assert torch.equal(impl.slice_channels(w, 1, range(16)), w)


def test_empty_index_and_non_contiguous(impl):
    w = torch.randn(8, 6)
    assert impl.slice_channels(w, 0, torch.empty(0, dtype=torch.long)).shape == (0, 6)
    wt = w.T  # non-contiguous
    out = impl.slice_channels(wt, 1, torch.tensor([7, 0]))
    assert out.is_contiguous() and torch.equal(out, wt[:, [7, 0]])


def test_lazy_conjugate_and_complex(impl):
    z = torch.randn(4, 6, dtype=torch.complex64)
    zc = z.conj()  # a lazy view with the conjugate bit set
    assert torch.equal(impl.slice_channels(zc, 1, [5, 0]), zc[:, [5, 0]].resolve_conj())
    zz = torch.randn(3, 4, dtype=torch.complex128)
    assert torch.equal(impl.slice_channels(zz, 0, [2, 2]), zz[[2, 2]])


def test_gradient_flows(impl):
    w = torch.randn(5, 4, requires_grad=True)
    impl.slice_channels(w, 0, [4, 1]).sum().backward()
    assert w.grad[[1, 4]].eq(1).all() and w.grad[[0, 2, 3]].eq(0).all()


def test_does_not_alias(impl):
    w = torch.randn(4, 4)
    out = impl.slice_channels(w, 0, torch.arange(4))
    out.zero_()
    assert w.abs().sum() > 0


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(4, 3), 0, torch.tensor([4])), ValueError, r"index must hold entries in \[0, 4\)"),
    ((torch.randn(4, 3), 1, torch.tensor([-1])), ValueError, r"index must hold entries in \[0, 3\)"),
    ((torch.randn(4, 3), 2, torch.tensor([0])), ValueError, r"dim must be in \[-2, 2\)"),
    ((torch.randn(4, 3), 0, torch.tensor([0.0])), TypeError, "index must be an integer tensor"),
    ((torch.randn(4, 3), 0, torch.tensor([True, False, True, True])), TypeError, "boolean mask"),
    ((torch.randn(4, 3), 0, torch.tensor([[0]])), ValueError, r"index must be 1-D"),
    ((torch.tensor(1.0), 0, torch.tensor([0])), ValueError, "at least one dimension"),
    ((torch.randn(4, 3), 0.0, torch.tensor([0])), TypeError, "dim must be an int"),
])
def test_bad_arguments(impl, args, error, match):
    with pytest.raises(error, match=match):
        impl.slice_channels(*args)


def test_opcheck():
    if not ops.has_kernel("slice_channels", "cpu"):
        pytest.skip("extension not built")
    torch.library.opcheck(torch.ops.gpp_ext.slice_channels.default, (torch.randn(5, 4, 3), 1, torch.tensor([2, 0])))
    torch.library.opcheck(torch.ops.gpp_ext.slice_channels.default, (torch.randn(5, 4), -1, torch.tensor([3])))
