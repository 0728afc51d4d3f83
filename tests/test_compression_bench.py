"""The compression benchmark harness runs end to end (a tiny digits run) and writes what issue 6 asks for."""

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_harness_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    harness = importlib.import_module("benchmarks.compression.__main__")
    out = tmp_path / "compression.json"
    assert harness.main(["--smoke", "--data", "digits", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    methods = {r["method"] for r in records}
    assert set(harness.OURS) <= methods
    for r in records:
        for key in ("method", "model", "dataset", "budget", "seed", "params", "flops", "acc_after_prune",
                    "test_accuracy", "latency_ms_b1", "latency_ms_b64"):
            assert key in r, key
        assert r["params"] < r["base_params"]
    assert (tmp_path / "compression.md").read_text().count("| lenet5 |") == len(methods)
    assert (tmp_path / "compression.png").stat().st_size > 1000
    sys.modules.pop("benchmarks.compression.__main__", None)
