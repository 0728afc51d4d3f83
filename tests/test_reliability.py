"""Bad input fails early with a clear message; no hang, no silent wrong model, no lost run (one test per item of
the reliability issue: each failed, hung or passed silently before the fix)."""

import gzip
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import gpp_ext
from gpp_ext import data, io, loop as loop_module, models
from gpp_ext.classifier import find_classifier
from gpp_ext.loop import GrowPushPrune, LoopConfig
from gpp_ext.recipes import RECIPES
from gpp_ext.report import read_report, summary_table
from gpp_ext.training import compare_latency
from gpp_ext.testing import run_cli

# the v1 recipe (eta schedule, push terms, AdamW at a constant rate), sized for a test
TINY = {**RECIPES["v1"], **dict(epochs=1, push_epochs=0.25, finetune_epochs=0.25, max_iterations=1, batch_size=64,
                                lr=3e-3, target_params=0.6, accuracy_floor=0.9, eta_start=0.3)}


def lenet(seed=0):
    torch.manual_seed(seed)
    return models.build("lenet5", in_channels=1, num_classes=10, input_size=8)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0)


def gpp(*args, timeout=300):
    return run_cli(*args, timeout=timeout)


COMPRESS = ["compress", "--model", "lenet5", "--data", "digits", "--epochs", "1", "--push-epochs", "1",
            "--finetune-epochs", "1", "--max-iterations", "2", "--target-params", "0.5", "--accuracy-floor", "0.9",
            "--quiet", "--threads", "1"]


WRITES = {}  # finished run -> how many files it wrote


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished `gpp compress` run (LeNet-5 on digits, a few seconds), copied by the tests that change it; run
    under the fault injector without a fault, which counts the files the run writes."""
    out = tmp_path_factory.mktemp("run") / "lenet"
    done = subprocess.run([sys.executable, "-c", KILLER, "0", "after", *COMPRESS, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    WRITES[out] = int(done.stdout.strip().splitlines()[-1].split()[-1])
    return out


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# 1 ------------------------------------------------------------------------------------------ no hang

class EndlessWithoutClass9:
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 9, (16,), generator=g)


def _alarm(seconds):
    def fail(*_):
        raise TimeoutError(f"did not return within {seconds} s")
    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


def test_prune_on_an_endless_loader_lacking_a_class_stops_at_max_batches():
    _alarm(120)
    try:
        _, report = gpp_ext.prune(lenet(), EndlessWithoutClass9(), torch.zeros(2, 1, 8, 8), max_batches=3,
                                  progress=False, recalibrate=False)
    finally:
        signal.alarm(0)
    assert report.params[1] < report.params[0]
    with pytest.raises(TypeError, match="one-pass iterator"):
        gpp_ext.prune(lenet(), iter([(torch.zeros(4, 1, 8, 8), torch.arange(4))]), torch.zeros(2, 1, 8, 8))


# 2 ------------------------------------------------------------------------ resume into the wrong run

def test_resume_refuses_another_model_or_other_data(finished_run, tmp_path, digits):
    run = _copy(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    out = gpp(*[("vgg" if a == "lenet5" else a) for a in COMPRESS], "--out", str(run), "--resume")
    assert out.returncode == 2 and "belongs to another run" in out.stderr and "'lenet5' -> 'vgg'" in out.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched
    other = data.load_dataset("digits", seed=1)  # the same data set split otherwise: other training labels
    with pytest.raises(ValueError, match="belongs to another run.*train_labels"):
        GrowPushPrune(lenet(), other, LoopConfig(**{**TINY}), out_dir=run, progress=False).run(resume=True)


# 3 ------------------------------------------------------------------------- the class count is known

def test_the_class_count_comes_from_the_known_classes_and_is_checked_in_every_split(digits):
    x, y = data.digits().tensors
    bad = y.clone()
    bad[5] = 200
    with pytest.raises(ValueError, match=r"label 200 at index 5"):
        data.make_splits(TensorDataset(x, bad), classes=range(10))
    with pytest.raises(ValueError, match=r"label 200 at index 5"):
        data.make_splits(TensorDataset(x, bad))
    keep = y != 9
    with pytest.raises(ValueError, match=r"class\(es\) 9 have no samples in the training set"):
        data.make_splits(TensorDataset(x[keep], y[keep]), classes=range(10))
    test_labels = y.clone()
    test_labels[:3] = 10
    with pytest.raises(ValueError, match="test set"):
        data.make_splits(TensorDataset(x, y), TensorDataset(x, test_labels))
    assert digits.num_classes == 10
    with pytest.raises(ValueError, match="has 9 outputs but the data"):
        GrowPushPrune(models.build("lenet5", in_channels=1, num_classes=9, input_size=8), digits,
                      LoopConfig(**TINY), out_dir="unused", progress=False)


# 4, 5, 11 ------------------------------------------------------------------------ prune's arguments

def _loader(digits, n=4):
    return list(torch.utils.data.DataLoader(digits.train, batch_size=64))[:n]


def test_prune_follows_the_knob_given_and_refuses_conflicting_or_bad_ones(digits):
    model, x = lenet(), torch.zeros(2, 1, 8, 8)
    _, report = gpp_ext.prune(model, _loader(digits), x, budget=0.3, progress=False)
    assert report.params[1] <= 0.3 * report.params[0] * 1.02
    for kwargs, error, message in [(dict(method="eta", budget=0.3), ValueError, "does not use budget=0.3"),
                                   (dict(budget=0.3, eta=0.2), ValueError, "give one of eta, ratio and budget"),
                                   (dict(eta=float("nan")), ValueError, "eta must be a finite number"),
                                   (dict(neurons=True), TypeError, "neurons must be a count"),
                                   (dict(neurons=1.5), ValueError, "neurons must be a count"),
                                   (dict(max_batches=0), ValueError, "max_batches must be a positive int"),
                                   (dict(num_classes=7), ValueError, "num_classes=7 but the classifier")]:
        with pytest.raises(error, match=message):
            gpp_ext.prune(model, _loader(digits, 1), x, progress=False, **kwargs)


def test_prune_refuses_a_loader_with_one_class_or_no_data(digits):
    x = torch.zeros(2, 1, 8, 8)
    one = [(torch.randn(32, 1, 8, 8), torch.full((32,), 3))]
    with pytest.raises(ValueError, match="holds only class 3 .*at least 2 classes"):
        gpp_ext.prune(lenet(), one, x, progress=False)
    with pytest.raises(ValueError, match="yielded no samples"):
        gpp_ext.prune(lenet(), [], x, progress=False)


def test_the_classifier_is_the_last_linear_called_not_the_last_declared():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 10)
            self.conv = nn.Conv2d(1, 4, 3)
            self.proj = nn.Linear(4, 16)

        def forward(self, x):
            return self.head(torch.relu(self.proj(self.conv(x).mean((2, 3)))))

    model = HeadFirst()
    assert find_classifier(model) == "head"
    loader = [(torch.randn(40, 1, 8, 8), torch.arange(40) % 10)]
    compact, report = gpp_ext.prune(model, loader, torch.zeros(2, 1, 8, 8), ratio=0.5, progress=False)
    assert compact(torch.zeros(3, 1, 8, 8)).shape == (3, 10) and compact.head.out_features == 10


# 6 --------------------------------------------------------------------------------- lost progress

def test_a_folder_holding_a_run_is_never_overwritten_without_overwrite(finished_run, tmp_path, digits,
                                                                       monkeypatch):
    run = _copy(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    out = gpp(*COMPRESS, "--out", str(run))
    assert out.returncode == 2 and "holds a run already" in out.stderr and "--overwrite" in out.stderr
    assert "continue it with --resume, replace it with --overwrite" in out.stderr   # the flags alone, on the CLI
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert gpp("compress", "--resume", "--overwrite").returncode == 2  # one or the other
    # --overwrite interrupted: the old report is gone with the old run, never beside the new checkpoint
    calls = {"n": 0}
    real = loop_module.prune

    def crash(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "prune", crash)
    with pytest.raises(KeyboardInterrupt):
        GrowPushPrune(lenet(), digits, LoopConfig(**TINY), out_dir=run, progress=False).run(overwrite=True)
    monkeypatch.setattr(loop_module, "prune", real)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
    shown = gpp("report", str(run))
    assert shown.returncode == 1 and "has not finished" in shown.stderr and "--resume" in shown.stderr


def test_gpp_report_refuses_a_stale_or_partial_report(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    assert read_report(run)["stopped"]
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").write_text(json.dumps({**report, "run_id": "an-earlier-one"}))
    with pytest.raises(ValueError, match="from an earlier run"):
        read_report(run)
    del report["final"]["params"]
    (run / "report.json").write_text(json.dumps(report))
    shown = gpp("report", str(run))
    assert shown.returncode == 2 and "lacks final.params" in shown.stderr
    (run / "report.json").write_text("{not json")
    shown = gpp("report", str(run))
    assert shown.returncode == 2 and "cannot read" in shown.stderr


# 7 ----------------------------------------------------------------------------------- late failures

class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_late_failures_come_before_any_training(digits, tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="pass factory="):
        GrowPushPrune(UserNet(), digits, LoopConfig(**TINY), out_dir=tmp_path, progress=False)
    wrong = models.build("lenet5", in_channels=1, num_classes=10, input_size=28)
    with pytest.raises(ValueError, match=r"does not accept the data's inputs of shape \[1, 8, 8\] .*; build it "
                                         r"for these inputs: models.build\('lenet5', in_channels=1, input_size=8\)"):
        GrowPushPrune(wrong, digits, LoopConfig(**TINY), out_dir=tmp_path, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the output folder was checked")

    monkeypatch.setattr(loop_module, "fit", no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        GrowPushPrune(lenet(), digits, LoopConfig(**TINY), out_dir=blocker / "out", progress=False).run()
    x, y = data.digits().tensors
    with pytest.raises(ValueError, match=r"test inputs are \[1, 9, 9\] but the training inputs are \[1, 8, 8\]"):
        data.make_splits(TensorDataset(x, y), TensorDataset(torch.zeros(20, 1, 9, 9), torch.arange(20) % 10))
    out = gpp(*COMPRESS, "--out", str(blocker / "out"))
    assert out.returncode == 2 and "cannot write to the output folder" in out.stderr


# 8 ------------------------------------------------------------------------- messages, not tracebacks

def test_damaged_files_give_messages_not_tracebacks(finished_run, tmp_path):
    raw = gzip.compress(bytes(16 + 4))
    (tmp_path / "images.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="damaged or truncated gzip"):
        data.read_idx(tmp_path / "images.gz")
    run = _copy(finished_run, tmp_path)
    whole = (run / "checkpoint.pt").read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):
        (run / "checkpoint.pt").write_bytes(damaged)
        out = gpp(*COMPRESS, "--out", str(run), "--resume")
        assert out.returncode == 2 and "cannot read the checkpoint" in out.stderr and "Traceback" not in out.stderr
    model = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(model[: len(model) // 2])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        io.load(run / "model.pt")


def test_a_foreign_file_as_model_or_weights_is_named_without_torch_advice(tmp_path):
    """A text file (torch's reader fails with KeyError) or random bytes (UnpicklingError, whose text advises
    weights_only=False: running the file's code) given as a model file or as weights: a ValueError naming the
    file and what it should be, without that advice."""
    from gpp_ext.models import sources

    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 2)
    for name in ("text.pt", "noise.pt"):
        for load in (io.load, lambda p: sources.load_weights(lenet(), p)):
            with pytest.raises(ValueError, match="it is not a file written by torch.save or gpp_ext.io.save") as info:
                load(tmp_path / name)
            assert name in str(info.value) and "weights_only" not in str(info.value)
    out = gpp("compress", "--model", str(tmp_path / "text.pt"), "--data", "digits")
    assert out.returncode == 2 and "not a file written by torch.save" in out.stderr and "Traceback" not in out.stderr


# 9 ------------------------------------------------------------------------------------ file integrity

def test_a_corrupted_model_file_is_refused_and_dtypes_survive(tmp_path):
    model = lenet()
    io.save(model, tmp_path / "m.pt")
    raw = bytearray((tmp_path / "m.pt").read_bytes())
    # flip 64 bytes inside the largest tensor's storage (torch's archive does not check its records)
    name = max(model.state_dict().items(), key=lambda kv: kv[1].numel())[0]
    weight = model.state_dict()[name].numpy().tobytes()
    at = bytes(raw).index(weight[:64])
    for i in range(at + 8, at + 72):
        raw[i] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted: its content does not match the checksum"):
        io.load(tmp_path / "bad.pt")
    io.save(model.double(), tmp_path / "f64.pt")
    back = io.load(tmp_path / "f64.pt")
    assert all(p.dtype == torch.float64 for p in back.parameters())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(back.eval()(x), model.eval()(x))


# 11 ----------------------------------------------------------------------------- stray temporary files

def test_temporary_files_of_a_killed_writer_are_cleaned_on_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from gpp_ext.atomic import _host

    stray = tmp_path / f".tmp-{dead.pid}-abc.pt"                       # as writers named them before hosts
    ours = tmp_path / f".tmp-{dead.pid}@{_host()}-abc.pt"
    theirs = tmp_path / f".tmp-{dead.pid}@another.host-abc.pt"         # a writer on another machine (shared disk)
    for path in (stray, ours, theirs):
        path.write_bytes(b"half a file")
    io.save(lenet(), tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.pt", theirs.name])


# 12 ------------------------------------------------------------------------------ trustworthy latency

def test_latency_is_timed_interleaved_and_flagged_when_the_rounds_disagree():
    base, compact = lenet(), lenet(1)
    timed = compare_latency({"base": base, "compact": compact}, (1, 8, 8), 1, rounds=3, repeats=2)
    assert set(timed) == {"base", "compact", "ratio"}
    assert timed["base"]["min_ms"] <= timed["base"]["median_ms"] <= timed["base"]["max_ms"]
    assert timed["ratio"]["min"] <= timed["ratio"]["median"] <= timed["ratio"]["max"]
    ratio = {"median": 2.0, "min": 1.0, "max": 4.0, "reliable": False}
    entry = {"base": {"median_ms": 2.0}, "compact": {"median_ms": 1.0}, "ratio": ratio}
    report = {"base": {"params": 10, "flops": 10, "test_accuracy": 0.9},
              "final": {"params": 5, "flops": 5, "test_accuracy": 0.9}, "latency": {"b1": entry, "b64": entry}}
    table = summary_table(report)
    assert "2.00x faster (1.00-4.00x); unreliable" in table and "the medians' ratio" not in table
    assert "the change the median of the per-round speed-ups" in table
    # the per-round median and the ratio of the two medians shown can disagree (a busy machine): both are said
    entry = {"base": {"median_ms": 3.129}, "compact": {"median_ms": 3.547},
             "ratio": {"median": 1 / 1.02, "min": 0.8, "max": 1.1}}
    table = summary_table({**report, "latency": {"b1": entry}})
    assert "1.02x slower (0.91-1.25x); the medians' ratio: 1.13x slower" in table


def test_a_finished_run_reports_interleaved_latency(finished_run):
    report = read_report(finished_run)
    for batch in ("b1", "b64"):
        assert {"base", "compact", "ratio"} <= set(report["latency"][batch])
    assert "x faster" in summary_table(report) or "x slower" in summary_table(report)


# fault injection ------------------------------------------------------------------------------------

KILLER = """
import os, random, signal, sys
import gpp_ext.atomic as atomic, gpp_ext.io as io
kill_at, mid_write = int(sys.argv[1]), sys.argv[2] == "mid"
real, calls = atomic.write_atomic, {"n": 0}
def write_atomic(path, write):
    calls["n"] += 1
    if calls["n"] == kill_at:
        def half(tmp):  # dies with half of the file written to its temporary name
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, half) if mid_write else (real(path, write), os.kill(os.getpid(), signal.SIGKILL))
    return real(path, write)
atomic.write_atomic = io.write_atomic = write_atomic  # every write: checkpoints, model, reports, plot
from gpp_ext import cli
code = cli.main(sys.argv[3:])
print("writes:", calls["n"])
sys.exit(code)
"""


def _complete(folder):
    """Every named file in a run folder is whole (temporary `.tmp-*` files aside)."""
    for p in folder.iterdir():
        if p.name.startswith(".tmp-"):
            continue
        if p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".json":
            json.loads(p.read_text())


def _comparable(report):
    skip = ("latency_ms_b1", "latency_ms_b64")
    strip = lambda d: {k: v for k, v in d.items() if k not in skip}  # noqa: E731
    return strip(report["base"]), strip(report["final"]), [strip(it) for it in report["iterations"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_killed_at_a_random_write_resumes_to_the_uninterrupted_result(finished_run, tmp_path, seed):
    import random

    rng = random.Random(seed)
    # any of the run's writes: its folder check, a checkpoint after each stage, the model and the reports
    kill_at, mode = rng.randint(1, WRITES[finished_run]), rng.choice(["mid", "after"])
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), mode, *COMPRESS, "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _complete(out)
    resumed = gpp(*COMPRESS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _complete(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert _comparable(read_report(out)) == _comparable(read_report(finished_run))


def test_keep_lists_of_floats_or_bools_are_refused_not_truncated():
    import numpy as np

    from gpp_ext import ChannelGraph

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    for bad in ([0.9, 2.5], [True, 0]):
        with pytest.raises(TypeError, match="must hold int channel indices"):
            ChannelGraph(net, torch.randn(1, 1, 6, 6)).prune({"0": bad})
    ChannelGraph(net, torch.randn(1, 1, 6, 6)).prune({"0": [np.int64(1), 3]})
    assert net[0].out_channels == 2


def test_resume_refuses_another_input_scaling_and_reads_older_checkpoints(tmp_path, digits):
    """Another input scaling (--image-norm) is another run; a checkpoint written before the scaling was recorded is
    compared on what it holds. (The weights are not compared: a resume continues from the checkpoint's model.)"""
    import dataclasses

    from gpp_ext.atomic import read, save_atomic

    run = tmp_path / "run"
    config = LoopConfig(**{**TINY})
    GrowPushPrune(lenet(0), digits, config, out_dir=run, progress=False).run()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    scaled = dataclasses.replace(digits, preprocessing={"scale": 1.0, "mean": [0.5], "std": [0.25]})
    with pytest.raises(ValueError, match=r"belongs to another run \(inputs\.preprocessing"):
        GrowPushPrune(lenet(0), scaled, config, out_dir=run, progress=False).run(resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched
    checkpoint = read(run / "checkpoint.pt", "test", "the checkpoint")
    del checkpoint["identity"]["inputs"]
    save_atomic(checkpoint, run / "checkpoint.pt")
    report = GrowPushPrune(lenet(1), scaled, config, out_dir=run, progress=False).run(resume=True)
    assert report["target_reached"] in (True, False)  # resumed (finished already), not refused


def test_the_output_folder_is_checked_before_the_data_are_read(finished_run, tmp_path, monkeypatch, capsys):
    """A folder holding a run, or an input file the run would write over, is refused before any data is read."""
    from gpp_ext import cli

    def no_data(*args, **kwargs):
        raise AssertionError("the data were read before the output folder was checked")

    monkeypatch.setattr(data, "load_dataset", no_data)
    run = _copy(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert cli.main([*COMPRESS, "--out", str(run)]) == 2 and "holds a run already" in capsys.readouterr().err
    for option in ("--model", "--weights", "--teacher"):
        argv = [*COMPRESS, "--out", str(run), "--overwrite"]
        argv = [a if a != "lenet5" else (str(run / "model.pt") if option == "--model" else a) for a in argv]
        if option != "--model":
            argv += [option, str(run / "model.pt")]
        assert cli.main(argv) == 2, option
        assert f"{option} {run / 'model.pt'} is a file this run writes" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the model file is still there


def test_the_demo_replaces_only_a_demo_and_resumes(finished_run, tmp_path, monkeypatch):
    from gpp_ext import cli

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "_compress_in", lambda args, *rest: seen.append(args) or 0)
    assert cli.main(["demo", "--data", "digits", "--quiet"]) == 0  # an empty runs/demo: a demo takes it
    assert seen[-1].overwrite and (tmp_path / "runs" / "demo" / cli.DEMO_MARKER).exists()
    assert cli.main(["demo", "--data", "digits", "--quiet", "--resume"]) == 0
    assert seen[-1].resume and not seen[-1].overwrite
    shutil.rmtree(tmp_path / "runs" / "demo")
    shutil.copytree(finished_run, tmp_path / "runs" / "demo")   # someone's own run in runs/demo
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "demo").iterdir()}
    calls = len(seen)
    assert cli.main(["demo", "--data", "digits", "--quiet"]) == 2 and len(seen) == calls  # refused, kept
    assert cli.main(["demo", "--data", "digits", "--quiet", "--resume"]) == 0   # (the stub resumes it)
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs" / "demo").iterdir()} == before  # and not marked
    (tmp_path / "runs" / "demo" / cli.DEMO_MARKER).write_text("")  # a demo's folder: replaced
    assert cli.main(["demo", "--data", "digits", "--quiet"]) == 0 and seen[-1].overwrite
    # the same elsewhere (--out): a demo's folder is replaced, someone's run is kept
    assert cli.main(["demo", "--data", "digits", "--quiet", "--out", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / cli.DEMO_MARKER).exists()
    assert cli.main(["demo", "--data", "digits", "--quiet", "--out", "elsewhere"]) == 0 and seen[-1].overwrite
    shutil.copytree(finished_run, tmp_path / "theirs")
    calls = len(seen)
    assert cli.main(["demo", "--data", "digits", "--quiet", "--out", "theirs"]) == 2 and len(seen) == calls


def test_a_neuron_count_the_pre_decision_layer_cannot_hold_is_refused_before_training(digits, tmp_path):
    width = lenet().classifier.in_features
    for neurons in (width + 1, 0.001):
        config = LoopConfig(**{**TINY, "neurons": neurons, "criterion": "lda"})
        with pytest.raises(ValueError, match=rf"neurons={neurons!r} keeps \d+ of the {width} pre-decision neurons"):
            GrowPushPrune(lenet(), digits, config, out_dir=tmp_path / "run", progress=False)
    GrowPushPrune(lenet(), digits, LoopConfig(**{**TINY, "neurons": width + 1, "criterion": "l1"}),
                  out_dir=tmp_path / "run", progress=False)   # a criterion that traces nothing does not read it
