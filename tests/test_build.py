"""The build: what build_info reports, kernel registration, the fallback, and source hygiene."""

import os
import pathlib
import re
import subprocess
import sys

import torch

import gpp_ext
from gpp_ext import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA_OPS = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "schema.cpp").read_text())


def test_build_info_contract():
    info = gpp_ext.build_info()
    assert isinstance(info["extension"], bool) and isinstance(info["cuda"], bool)
    assert info["torch"] == torch.__version__
    assert info["cuda_version"] is None or isinstance(info["cuda_version"], str)
    if info["extension"]:
        assert info["compiled_torch"] == torch.__version__.split("+")[0], "extension built against another torch"
        assert info["openmp"], "built without -fopenmp: at::parallel_for would run on one thread"
        assert info["cuda"] == (info["cuda_version"] is not None)


def test_every_op_has_a_cpu_kernel():
    assert len(SCHEMA_OPS) == 9
    assert set(SCHEMA_OPS) == set(ops._OPS)
    if not ops.extension_available():
        return
    for name in SCHEMA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpp_ext::{name}", "CPU"), name
        assert ops.has_kernel(name, "cpu")


def test_cuda_kernels_registered_when_built_with_cuda():
    """`make cuda-check` sets GPP_EXT_EXPECT_CUDA=1: there the CUDA build must be loaded, kernels and all,
    and come from the installed package, not the source tree. No GPU is needed to ask the dispatcher."""
    info = gpp_ext.build_info()
    if os.environ.get("GPP_EXT_EXPECT_CUDA") == "1":
        assert info["extension"] and info["cuda"], info
        assert info["cuda_version"], info
        assert pathlib.Path(gpp_ext.__file__).resolve().parent != ROOT / "gpp_ext", gpp_ext.__file__
    for name in SCHEMA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpp_ext::{name}", "CUDA") == info["cuda"], name
        assert ops.has_kernel(name, "cuda") == info["cuda"], name


def test_fallback_warns_once_and_still_computes(tmp_path):
    """With the compiled module unavailable, gpp_ext.ops warns once and runs the reference ops."""
    script = """
import sys, warnings
sys.modules["gpp_ext._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gpp_ext
    from gpp_ext import ops
    import torch
    x = torch.randn(50, 4); y = torch.arange(50) % 3
    s = ops.class_scatter(x, y, 3)
    ops.generalized_eigh(s.between(), s.within)
    ops.slice_channels(x, 1, [0, 2])
messages = [str(w.message) for w in caught if "gpp_ext" in str(w.message)]
assert len(messages) == 1, messages
assert "falls back to the pure-PyTorch reference" in messages[0], messages[0]
info = gpp_ext.build_info()
assert info["extension"] is False and info["cuda"] is False and "error" in info, info
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_no_two_sources_share_a_stem():
    """setuptools names object files by stem; two sources with one stem would silently overwrite each other."""
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".cc", ".cxx")]
    stems = [p.stem for p in sources]
    assert len(sources) >= 7
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)


def test_source_list_is_complete():
    """Every C++/CUDA file is in csrc/sources.cmake (the list both builds use), and every listed file exists."""
    sys.path.insert(0, str(ROOT))
    try:
        from setup import read_source_lists
    finally:
        sys.path.pop(0)
    listed = {s for files in read_source_lists(ROOT / "csrc" / "sources.cmake").values() for s in files}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    assert listed == on_disk
