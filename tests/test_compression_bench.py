"""The compression benchmark harness runs end to end (tiny digits runs), writes what issue 6 asks for, and
resumes an interrupted run without redoing or changing what it already measured."""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("method", "model", "dataset", "budget", "seed", "params", "flops", "acc_after_prune", "test_accuracy",
          "latency_ms_b1", "latency_ms_b64")


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    yield importlib.import_module("benchmarks.compression.__main__")
    sys.modules.pop("benchmarks.compression.__main__", None)


def smoke(harness, tmp_path, *extra):
    out = tmp_path / "compression.json"
    code = harness.main(["--smoke", "--data", "digits", "--out", str(out), "--cache", str(tmp_path / "cache"),
                         *extra])
    return code, out


def test_harness_smoke(harness, tmp_path):
    code, out = smoke(harness, tmp_path)
    assert code == 0
    records = json.loads(out.read_text())
    methods = {r["method"] for r in records}
    assert set(harness.OURS) <= methods
    for r in records:
        for key in FIELDS:
            assert key in r, key
        assert r["params"] < r["base_params"]
        assert 0 <= r["acc_after_prune"] <= 1 and 0 <= r["test_accuracy"] <= 1
    # every method starts from the same reference and meets its budget
    assert len({r["base_test_accuracy"] for r in records}) == 1
    assert all(r["met_budget"] for r in records)
    table = (tmp_path / "compression.md").read_text()
    assert table.count("| lenet5 | 30% |") == len(methods) + 1  # every method, plus the 'who wins' row
    assert (tmp_path / "compression.png").stat().st_size > 1000


def test_resume_keeps_records_and_runs_only_the_missing(harness, tmp_path):
    code, out = smoke(harness, tmp_path, "--methods", "l1")
    assert code == 0
    first = json.loads(out.read_text())
    assert [r["method"] for r in first] == ["l1"]
    code, out = smoke(harness, tmp_path, "--methods", "l1,random", "--resume")
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["l1", "random"]
    assert records[0] == first[0]  # not rerun
    # the cached base made both: the reference accuracy is shared
    assert records[0]["base_test_accuracy"] == records[1]["base_test_accuracy"]


def test_resume_refuses_other_settings(harness, tmp_path):
    out = tmp_path / "compression.json"
    out.write_text(json.dumps([{"method": "l1", "model": "lenet5", "dataset": "digits", "budget": 0.3, "seed": 0,
                                "mode": "quick", "epochs": 5, "prep_epochs": 1, "finetune_epochs": 2, "lr": 2e-3}]))
    with pytest.raises(SystemExit, match="other settings"):
        smoke(harness, tmp_path, "--methods", "l1", "--resume")
    assert json.loads(out.read_text())[0]["mode"] == "quick"  # the user's file is untouched


@pytest.mark.parametrize("argv, message", [
    (["--methods", "magic"], "unknown"),
    (["--budgets", "1.5"], "fraction"),
    (["--models", "alexnet"], "lenet5"),
])
def test_bad_arguments_name_the_option(harness, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        smoke(harness, tmp_path, *argv)
    assert message in capsys.readouterr().err
