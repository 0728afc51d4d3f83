import os

# A finished loop run exports and times base and compact model in ONNX Runtime (a few seconds each): off for the
# suite's many short runs; the tests of that measurement (test_readme's own-model commands, test_loop) turn it on.
os.environ.setdefault("GPP_EXT_ONNX_LATENCY", "0")

import pytest
import torch

import gpp_ext
from gpp_ext import ops, reference

# `make test` spreads the suite over the cores with pytest-xdist: each worker takes its share of them, so that the
# workers' torch threads do not oversubscribe the machine
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CUDA = torch.cuda.is_available()
cuda_param = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])


@pytest.fixture(params=["cpu", cuda_param])
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["ops", "reference"])
def impl(request):
    """The public op (compiled kernel where built) and the pure-PyTorch reference: both must behave alike."""
    return ops if request.param == "ops" else reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"gpp_ext build_info: {gpp_ext.build_info()}"


def pytest_sessionstart(session):
    """Without the compiled ops every ops-vs-reference test would compare the reference with itself."""
    if not ops.extension_available() and os.environ.get("GPP_EXT_ALLOW_FALLBACK") != "1":
        raise pytest.UsageError(
            f"gpp_ext's compiled extension is not loaded ({ops.load_error()}): build it with `make build` "
            f"(or `pip install --no-build-isolation -e .`), or set GPP_EXT_ALLOW_FALLBACK=1 to test the "
            f"pure-PyTorch fallback alone")


@pytest.fixture
def compress_cli(tmp_path):
    """`compress_cli(name, *flags)`: `gpp compress` on the digits, quietly, on one thread, into `tmp_path/name`, in
    this process (`gpp_ext.testing.run_cli`); returns `(completed process, report dict or None, output folder)`.
    Without an `--accuracy-floor` flag the floor is off (0.5 below a base of a few epochs): these runs test that a
    method runs end to end, and a 2-point floor on 143 validation images is 3 of them, which another torch's
    numerics can cross (a run below the floor exits 3)."""
    import json

    from gpp_ext.testing import run_cli

    def run(name, *flags, timeout=900):
        out = tmp_path / name
        floor = () if "--accuracy-floor" in flags else ("--accuracy-floor", "0.5")
        done = run_cli("compress", "--data", "digits", *flags, *floor, "--quiet", "--threads", "1",
                       "--no-onnx-latency", "--out", out, timeout=timeout)
        report = out / "report.json"
        return done, (json.loads(report.read_text()) if report.exists() else None), out
    return run
