"""Benchmark configuration: sizes, thread pinning, and a pass-through of the extension's build.

GPP_EXT_BENCH=smoke (small shapes, used by `make test` with --benchmark-disable) or full (default; the
realistic sizes of the ops issue). GPP_EXT_BENCH_THREADS pins torch's intra-op threads (default: all cores);
the runner records it.
"""

import os

import pytest
import torch

MODE = os.environ.get("GPP_EXT_BENCH", "full")
if MODE not in ("smoke", "full"):
    raise pytest.UsageError(f"GPP_EXT_BENCH must be smoke or full, got {MODE!r}")
THREADS = int(os.environ.get("GPP_EXT_BENCH_THREADS", os.cpu_count() or 1))
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    import gpp_ext

    return f"gpp_ext benchmarks: mode={MODE} threads={torch.get_num_threads()} build_info={gpp_ext.build_info()}"
