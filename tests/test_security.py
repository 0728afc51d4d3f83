"""Hostile files, odd inputs and faults on the user-facing surfaces: no code runs from a model file, no silent wrong
data, no lost or clobbered run (one test or more per item of the security and reliability issue; each failed, ran
code or passed silently before the fix)."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpp_ext import data, export, io, loop as loop_module, models, recipes
from gpp_ext.data.files import image_folder, npz
from gpp_ext.loop import GrowPushPrune, LoopConfig
from gpp_ext.report import read_report
from gpp_ext.run_folder import LOCK_FILE
from gpp_ext.testing import run_cli

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = ["--data", "digits", "--epochs", "0", "--max-iterations", "1", "--push-epochs", "0.2",
        "--finetune-epochs", "0.2", "--target-params", "0.5", "--accuracy-floor", "0.9", "--quiet", "--threads", "1",
        "--no-onnx-latency"]


def gpp(*args, cwd=None, preexec_fn=None, timeout=300):
    """`gpp ARGS` in this process, or in a child process when a resource limit (`preexec_fn`) is needed."""
    return run_cli(*args, cwd=cwd, preexec_fn=preexec_fn, timeout=timeout)


def lenet():
    return models.build("lenet5", in_channels=1, num_classes=10, input_size=8)


def forge(path, spec, model=None):
    """A model file as `gpp_ext.io.save` writes it, edited to record `spec`, its checksum made to match (a forger
    can recompute it: the digest is a check against damage, not a signature)."""
    payload = io.payload(model or lenet())
    payload["spec"] = spec
    payload["sha256"] = io.digest(payload)
    torch.save(payload, path)
    return path


# 1 ------------------------------------------------------------------------ a model file names no code that runs

EVIL = "open({marker!r}, 'w').close()\ndef make(**kwargs):\n    open({marker!r}, 'w').close()\n"


def hostile_specs(tmp_path, marker):
    """Specs a forged model file may record, each of which runs code that creates `marker` when obeyed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (tmp_path / "beside.py").write_text(EVIL.format(marker=str(marker)))  # lies beside the model file
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(marker)))
    depth = "../" * len(tmp_path.parts)
    return {
        "os:system": {"name": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "subprocess:getoutput": {"name": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}},
        "builtins:exec": {"name": "builtins:exec", "kwargs": {"source": f"open({str(marker)!r}, 'w').close()"}},
        "path traversal": {"name": f"{depth}{str(elsewhere).lstrip('/')}/evil.py:make", "kwargs": {}},
        "beside the file": {"name": "beside.py:make", "kwargs": {}},
        "module on the path": {"name": "evilmod:make", "kwargs": {}},
        "relative module": {"name": "..evilmod:make", "kwargs": {}},
    }


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    monkeypatch.chdir(tmp_path)  # the working folder holds beside.py and evilmod.py too
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = hostile_specs(tmp_path, marker)
    files = {name: forge(tmp_path / f"forged-{i}.pt", spec) for i, (name, spec) in enumerate(specs.items())}
    (tmp_path / "report.json").write_text(json.dumps({"input_shape": [1, 8, 8]}))
    return files, marker


def test_a_forged_model_file_runs_nothing_through_io_load(hostile):
    files, marker = hostile
    for name, path in files.items():
        with pytest.raises(ValueError, match=r"names the factory .*trust_code=True.*--trust-model-code"):
            io.load(path)
        assert not marker.exists(), f"{name}: code ran"
    imported = [m for m in list(sys.modules.values()) if str(marker.parent) in str(getattr(m, "__file__", "") or "")]
    assert not imported


def test_a_forged_model_file_runs_nothing_through_the_cli(hostile, tmp_path):
    files, marker = hostile
    for name, path in files.items():
        out = gpp("export", path, "--onnx", tmp_path / "x.onnx", cwd=tmp_path)
        assert out.returncode == 2 and "--trust-model-code" in out.stderr, (name, out.stderr)
        out = gpp("compress", "--model", path, *TINY, "--out", tmp_path / "run", cwd=tmp_path)
        assert out.returncode == 2 and "--trust-model-code" in out.stderr, (name, out.stderr)
        assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
        assert not marker.exists(), f"{name}: code ran"
    # gpp report reads report.json and the checkpoint, whose model payload may be forged too
    folder = tmp_path / "folder"
    folder.mkdir()
    forge(folder / "model.pt", {"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    checkpoint = {"format": "gpp_ext.loop/2", "state": {"run_id": "x"},
                  "model": torch.load(folder / "model.pt", weights_only=True)}
    torch.save(checkpoint, folder / "checkpoint.pt")
    (folder / "report.json").write_text("{}")
    out = gpp("report", folder, cwd=tmp_path)
    assert out.returncode == 2 and not marker.exists()


def test_a_forged_checkpoint_runs_nothing_on_resume(tmp_path):
    marker = tmp_path / "MARKER"
    out = tmp_path / "run"
    done = gpp("compress", "--model", "lenet5", *TINY, "--out", out)
    assert done.returncode == 0, done.stderr
    (out / "report.json").unlink()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    payload = checkpoint["model"]
    payload["spec"] = {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}
    payload["sha256"] = io.digest(payload)
    torch.save(checkpoint, out / "checkpoint.pt")
    resumed = gpp("compress", "--model", "lenet5", *TINY, "--out", out, "--resume")
    assert resumed.returncode == 2 and "names the factory 'os:system'" in resumed.stderr, resumed.stderr
    assert not marker.exists()


def test_trusting_the_file_runs_the_code_it_names(hostile, tmp_path):
    """The marker mechanism can fire (so the tests above could fail): trusted, the recorded code runs."""
    files, marker = hostile
    with pytest.raises(ValueError):  # the factory returns None: refused, but only after it ran
        io.load(files["beside the file"], trust_code=True)
    assert marker.exists()


def test_fetching_arguments_and_non_data_kwargs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"include \['weights'\], which fetch or read weights"):
        io.load(forge(tmp_path / "a.pt", {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}))
    with pytest.raises(ValueError) as refused:  # init_weights is not about fetching (torchvision's GoogLeNet)
        io.load(forge(tmp_path / "g.pt", {"name": "torchvision:googlenet", "kwargs": {"init_weights": True}}))
    assert "which fetch or read weights" not in str(refused.value)
    with pytest.raises(ValueError, match="describe a 'lenet5' of 15,000,"):  # sizes edited to exhaust memory
        io.load(forge(tmp_path / "b.pt", {"name": "lenet5", "kwargs": {"in_channels": 10 ** 8, "input_size": 8}}))
    with pytest.raises(ValueError, match="user model without a recorded factory"):
        io.load(forge(tmp_path / "c.pt", None))


# io.load over mutated payloads: never a raw traceback, never code run
MUTATIONS = st.one_of(
    st.tuples(st.just("spec.name"), st.sampled_from(["os:system", "subprocess:run", "builtins:eval", "lenet5",
                                                     "vgg", "nope", "", "x.py:f", "timm:x", "torchvision:nope",
                                                     "../../etc/passwd:x", "a:b:c", "lenet5:"])),
    st.tuples(st.just("spec.kwargs"), st.dictionaries(
        st.sampled_from(["in_channels", "num_classes", "input_size", "conv1", "fc1", "x", "weights"]),
        st.one_of(st.integers(-3, 64), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                  st.lists(st.integers(0, 9), max_size=3)), max_size=3)),
    st.tuples(st.just("spec"), st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers()))),
    st.tuples(st.just("widths"), st.dictionaries(st.sampled_from(["conv1", "fc1", "classifier", "nope", ""]),
                                                 st.one_of(st.dictionaries(st.sampled_from(
                                                     ["out_channels", "in_features", "forward", "weight"]),
                                                     st.one_of(st.integers(-2, 40), st.text(max_size=2),
                                                               st.lists(st.integers(0, 4), max_size=2)),
                                                     max_size=2), st.integers()), max_size=2)),
    st.tuples(st.just("drop"), st.integers(0, 9)),
    st.tuples(st.just("reshape"), st.integers(0, 9), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 9), st.sampled_from([torch.int64, torch.float16, torch.bool,
                                                                    torch.float64, torch.uint8])),
    st.tuples(st.just("extra"), st.text(min_size=1, max_size=8)),
)


@FUZZ
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_io_load_of_mutated_payloads_gives_a_model_or_a_clear_error(tmp_path, mutations):
    payload = io.payload(lenet())
    keys = sorted(payload["state_dict"])
    for mutation in mutations:
        kind = mutation[0]
        if kind == "spec.name":
            payload["spec"] = {**(payload["spec"] if isinstance(payload["spec"], dict) else {}), "name": mutation[1]}
        elif kind == "spec.kwargs":
            if isinstance(payload["spec"], dict):
                payload["spec"]["kwargs"] = {**payload["spec"].get("kwargs", {}), **mutation[1]}
        elif kind == "spec":
            payload["spec"] = mutation[1]
        elif kind == "widths":
            payload["widths"] = {**payload["widths"], **mutation[1]}
        elif kind == "drop":
            payload["state_dict"].pop(keys[mutation[1] % len(keys)], None)
        elif kind == "reshape":
            key = keys[mutation[1] % len(keys)]
            if key in payload["state_dict"]:
                payload["state_dict"][key] = torch.zeros(mutation[2])
        elif kind == "dtype":
            key = keys[mutation[1] % len(keys)]
            if key in payload["state_dict"]:
                payload["state_dict"][key] = payload["state_dict"][key].to(mutation[2])
        elif kind == "extra":
            payload["state_dict"][mutation[1]] = torch.ones(2)
    marker = tmp_path / "MARKER"
    payload["sha256"] = io.digest(payload)
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    try:
        model = io.load(path)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        assert str(path) in str(error), error
    else:
        assert isinstance(model, torch.nn.Module)
    assert not marker.exists()


# 2 -------------------------------------------------------------------------- a model .py that calls sys.exit()

def test_a_model_file_that_calls_sys_exit_is_an_error_not_a_silent_exit(tmp_path):
    (tmp_path / "exiting.py").write_text("import sys\nsys.exit(3)\ndef make(**kw):\n    pass\n")
    out = gpp("compress", "--model", "exiting.py:make", *TINY, "--out", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "importing" in out.stderr and "exiting.py failed (it called sys.exit(3))" in out.stderr
    (tmp_path / "quitting.py").write_text("import sys\ndef make(**kw):\n    sys.exit('bye')\n")
    out = gpp("compress", "--model", "quitting.py:make", *TINY, "--out", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2 and "the factory failed" in out.stderr and "sys.exit('bye')" in out.stderr


# 3 --------------------------------------------------- a model the channel graph cannot handle: refused up front

UNPRUNABLE = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, kind, num_classes=10, in_channels=1):
            super().__init__()
            self.kind = kind
            self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.conv(x)
            if self.kind == "roll":
                x = torch.roll(x, 1, dims=1)
            elif self.kind == "einsum":
                x = torch.einsum("nchw,c->nchw", x, torch.ones(8))
            elif x.sum() > 0:  # control flow on the data
                x = -x
            return self.head(x.mean((2, 3)))

    def make(kind, num_classes=10, in_channels=1):
        return Net(kind, num_classes, in_channels)
''')


@pytest.mark.parametrize("kind", ["roll", "einsum", "data-if"])
def test_a_model_the_graph_cannot_handle_is_refused_before_training(tmp_path, monkeypatch, kind):
    (tmp_path / "unprunable.py").write_text(UNPRUNABLE)
    model = models.build_source(f"{tmp_path / 'unprunable.py'}:make", kwargs={"kind": kind})

    def no_training(*args, **kwargs):
        raise AssertionError("trained a model that cannot be pruned")

    monkeypatch.setattr(loop_module, "fit", no_training)
    for config in (LoopConfig(epochs=1), recipes.build("sss", epochs=1),   # the pushes' and the growths' checks
                   LoopConfig(epochs=1, grow=True, growth="planting")):       # trace it too: this message first
        with pytest.raises(ValueError, match="cannot be pruned as it is"):
            GrowPushPrune(model, data.load_dataset("digits"), config, out_dir=tmp_path / "o", progress=False)
    out = gpp("compress", "--model", "unprunable.py:make", "--model-args", json.dumps({"kind": kind}), *TINY,
              "--epochs", "50", "--out", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2 and "cannot be pruned as it is" in out.stderr and "--ignore" in out.stderr
    assert not (tmp_path / "run").exists()  # the folder is as it was: the corrected command needs no --overwrite


# 4 ------------------------------------------------------------------- a model whose code changed since it was saved

def test_a_saved_model_whose_code_changed_is_named_not_a_traceback(tmp_path):
    net = tmp_path / "mynet.py"
    net.write_text("import torch.nn as nn\ndef make(num_classes=10):\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    io.save(models.build_source(f"{net}:make"), tmp_path / "m.pt")
    net.write_text("import torch.nn as nn\ndef make(num_classes=10):\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    for name in [m for m in sys.modules if m.startswith("gpp_ext_user_")]:  # as a fresh process would import it
        del sys.modules[name]
    out = gpp("export", tmp_path / "m.pt", "--trust-model-code", "--onnx", tmp_path / "m.onnx", "--input-shape",
              "1,8,8", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "does not match the one saved in it" in out.stderr and "changed since" in out.stderr
    assert not (tmp_path / "m.onnx").exists()


# 5 ------------------------------------------------------------------------------- 16-bit images, mixed channels

def _png(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_16_bit_pngs_are_scaled_to_the_unit_range_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for label in ("a", "b"):
        for i in range(10):
            a = rng.integers(0, 65536, size=(6, 6)).astype(np.uint16)
            arrays[f"{label}/{i}.png"] = a
            _png(str(tmp_path / "f" / label / f"{i}.png"), a)
    splits = image_folder(tmp_path / "f", progress=False, val_fraction=0.2, test_fraction=0.2)
    assert splits.input_shape == (1, 6, 6) and splits.preprocessing["scale"] == 1 / 65535
    base = splits.train.dataset
    x, _ = base[0]  # sorted: a/0.png
    assert np.abs(x[0].numpy() - arrays["a/0.png"] / 65535).max() < 1e-6  # not 1.0 everywhere (clipped)
    assert float(x.std()) > 0.1


def test_a_mostly_rgb_folder_whose_first_image_is_gray_loads_as_rgb(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(5, 5)).astype(np.uint8)
    _png(str(tmp_path / "f" / "a" / "0.png"), gray)  # the first file
    for label in ("a", "b"):
        for i in range(1, 8):
            _png(str(tmp_path / "f" / label / f"{i}.png"), rng.integers(0, 256, size=(5, 5, 3)).astype(np.uint8))
    splits = image_folder(tmp_path / "f", progress=False, val_fraction=0.2, test_fraction=0.2)
    assert splits.input_shape == (3, 5, 5)
    x, _ = splits.train.dataset[0]
    assert np.allclose(x.numpy(), np.repeat(gray[None] / 255.0, 3, axis=0), atol=1e-7)  # repeated, nothing lost
    assert image_folder(tmp_path / "f", channels=1, progress=False, val_fraction=0.2,
                        test_fraction=0.2).input_shape == (1, 5, 5)


MODES = st.sampled_from(["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "I", "F"])


def _image(mode, rng, size):
    """(PIL image, its true intensity per channel in [0, 1] as [C, H, W], whether it has colour)."""
    from PIL import Image

    if mode == "I;16":
        a = rng.integers(0, 65536, size=size).astype(np.uint16)
        return Image.fromarray(a), (a / 65535.0)[None], False
    if mode == "I":
        a = rng.integers(0, 65536, size=size).astype(np.int32)
        return Image.fromarray(a), (a / 65535.0)[None], False
    if mode == "F":
        a = rng.random(size).astype(np.float32)
        return Image.fromarray(a), a[None].astype(np.float64), False
    if mode in ("L", "1", "LA"):
        a = rng.integers(0, 256, size=size).astype(np.uint8)
        if mode == "1":
            a = (a > 127).astype(np.uint8) * 255
        im = Image.fromarray(a).convert(mode)
        return im, (a / 255.0)[None], False
    a = rng.integers(0, 256, size=(*size, 3)).astype(np.uint8)
    im = Image.fromarray(a).convert(mode)
    if mode == "P":  # the palette quantises: the truth is what the palette holds
        a = np.asarray(im.convert("RGB"))
    return im, a.transpose(2, 0, 1) / 255.0, True


@FUZZ
@given(modes=st.lists(MODES, min_size=8, max_size=12), seed=st.integers(0, 2 ** 16),
       channels=st.sampled_from([None, 1, 3]))
def test_image_folders_of_any_mode_bit_depth_and_channel_mix_load_their_true_intensities(tmp_path_factory, modes, seed,
                                                                                         channels):
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("images")
    truths, colour = [], False
    for i, mode in enumerate(modes):
        im, truth, has_colour = _image(mode, rng, (4, 4))
        colour |= has_colour
        label = "ab"[i % 2]
        os.makedirs(folder / label, exist_ok=True)
        im.save(folder / label / f"{i // 2:02d}-{i}.{'tif' if mode in ('I', 'F') else 'png'}")
        truths.append((label, f"{i // 2:02d}-{i}", truth, has_colour))
    try:
        splits = image_folder(folder, channels=channels, progress=False, val_fraction=0.25, test_fraction=0.25)
    except ValueError as error:  # too few images of a class to split: said so, naming the data
        assert "imagefolder" in str(error) or "class" in str(error), error
        return
    want_c = channels or (3 if colour else 1)
    assert splits.input_shape == (want_c, 4, 4)
    base = splits.train.dataset
    order = sorted(truths, key=lambda t: (t[0], t[1]))
    for k, (_, _, truth, has_colour) in enumerate(order):
        x = base[k][0].numpy().astype(np.float64)
        assert 0 <= x.min() and x.max() <= 1
        if want_c == 3 and truth.shape[0] == 1:
            truth = np.repeat(truth, 3, axis=0)
        if want_c == 1 and has_colour:
            continue  # a luminance conversion of colour, Pillow's formula
        tolerance = 1 / 255 + 1e-6 if any(m in ("I;16", "I", "F") for m in modes) else 1e-6
        assert np.abs(x - truth).max() <= tolerance, (modes, k)


# 6 ---------------------------------------------------------------------------------------- .npz object arrays

def test_an_npz_with_an_object_array_names_the_file(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([[1, 2], [3]], dtype=object), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"objects.npz: array 'x' holds Python objects"):
        npz(path)


NPZ_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32,
                              np.float64, np.bool_, np.complex64, ">u2", "<U3"])


@FUZZ
@given(dtype=NPZ_DTYPES, high=st.sampled_from([1, 255, 256, 65535]), seed=st.integers(0, 1000),
       label_dtype=st.sampled_from([np.int64, np.uint8, np.float32, np.float64, np.int8]))
def test_npz_of_any_dtype_loads_on_its_scale_or_is_refused_by_name(tmp_path_factory, dtype, high, seed, label_dtype):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, high + 1, size=(40, 1, 3, 3))
    x = raw.astype(str) if dtype == "<U3" else raw.astype(dtype)
    y = (np.arange(40) % 2).astype(label_dtype)
    path = tmp_path_factory.mktemp("npz") / "arrays.npz"
    np.savez(path, x=x, y=y)
    kind = np.dtype(dtype).kind
    scaled = np.dtype(dtype).newbyteorder("=") in (np.dtype(np.uint8), np.dtype(np.uint16))
    refused = kind in "Uc" or (kind in "iu" and not scaled and raw.max() > 255) \
        or (kind == "f" and not np.all(np.isfinite(x)))
    try:
        splits = npz(path)
    except ValueError as error:
        assert "arrays.npz" in str(error), error
        assert refused, (dtype, raw.max(), error)
        return
    assert not refused, (dtype, raw.max())
    full = {1: 255.0, 2: 65535.0}[np.dtype(dtype).itemsize] if scaled else 255.0 if kind in "iu" else 1.0
    got = splits.train.dataset.tensors[0].numpy().astype(np.float64)
    assert np.allclose(got, x.astype(np.float64) / full, rtol=1e-6, atol=1e-7)  # float32 rounding


# 7 ---------------------------------------------------------------------------------- options checked up front

@pytest.mark.parametrize("option,value,match", [
    ("--threads", "-1", "argument --threads: must be a finite integer >= 1, got -1"),
    ("--lr", "inf", "argument --lr: must be a finite number > 0, got inf"),
    ("--lr", "0", "argument --lr: must be a finite number > 0, got 0"),
    ("--epoch-budget", "nan", "argument --epoch-budget: must be a finite number >= 0, got nan"),
    ("--distill", "nan", "argument --distill: must be a finite number >= 0, got nan"),
    ("--push-share", "1.5", r"argument --push-share: must be a finite number in \[0, 1\], got 1.5"),
    ("--batch-size", "0", "argument --batch-size: must be a finite integer >= 1, got 0"),
    ("--epochs", "two", "argument --epochs: expected an integer, got 'two'"),
])
def test_bad_option_values_are_refused_naming_the_option(tmp_path, option, value, match):
    import re

    out = gpp("compress", "--model", "lenet5", "--data", "digits", option, value, "--out", tmp_path / "o")
    assert out.returncode == 2 and re.search(match, out.stderr), out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("epoch_budget", float("nan")),
                                         ("distill", float("nan")), ("push_share", float("nan")),
                                         ("weight_decay", -1.0), ("seed", -1), ("batch_size", 2.5)])
def test_loop_config_refuses_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        LoopConfig(**{field: value}).validate()


# 8 ------------------------------------------------------------------------------------- one run per --out folder

def test_a_second_run_on_a_busy_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gpp_ext.cli", "compress", "--model", "lenet5", *TINY,
                              "--epochs", "400", "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        lock = out / LOCK_FILE
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = gpp("compress", "--model", "lenet5", *TINY, "--out", out)
        assert second.returncode == 2, second.stderr
        assert f"{out} is in use by another run (process {first.pid} on {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK_FILE).exists()  # killed: its lock file stays, but the lock died with the process
    third = gpp("compress", "--model", "lenet5", *TINY, "--out", out)
    assert third.returncode == 0, third.stderr
    assert not (out / LOCK_FILE).exists() and read_report(out)["stopped"]


# 9 ---------------------------------------------------------------------------------------------- a full disk

def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))


def test_a_write_the_disk_refuses_is_one_line_naming_the_file_with_nothing_partial(tmp_path):
    out = gpp("compress", "--model", "lenet5", *TINY, "--out", tmp_path / "run", preexec_fn=_limit_file_size)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"gpp: {tmp_path / 'run' / 'checkpoint.pt'}: cannot write it: File "
                                                   f"too large; the file system or a limit (ulimit -f) refuses a file "
                                                   f"this large")
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()  # nothing written: the folder is gone
    io.save(lenet(), tmp_path / "m.pt")
    for option, target in (("--torchscript", "m.ts.pt"), ("--onnx", "m.onnx")):
        out = gpp("export", tmp_path / "m.pt", option, tmp_path / target, "--input-shape", "1,8,8",
                  preexec_fn=_limit_file_size)
        assert out.returncode == 1 and f"{tmp_path / target}: cannot write it: File too large" in out.stderr
        assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no partial or temporary file


# 10, 11 ------------------------------------------------------------------------------------------ gpp export

def test_export_opset_is_honoured_or_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    io.save(lenet(), tmp_path / "m.pt")
    out = gpp("export", tmp_path / "m.pt", "--onnx", tmp_path / "m.onnx", "--opset", "7", "--input-shape", "1,8,8")
    assert out.returncode == 2 and r"argument --opset: must be a finite integer in [14, 23], got 7" in out.stderr
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match=r"opset must be an int in \[14, 23\]"):
        export.to_onnx(lenet(), tmp_path / "m.onnx", (1, 8, 8), opset=7)
    out = gpp("export", tmp_path / "m.pt", "--onnx", tmp_path / "m.onnx", "--opset", "15", "--input-shape", "1,8,8")
    assert out.returncode == 0 and "opset 15" in out.stdout and "Traceback" not in out.stderr
    assert [o.version for o in onnx.load(tmp_path / "m.onnx").opset_import if o.domain in ("", "ai.onnx")] == [15]


def test_export_refuses_its_own_input_and_a_folder_as_target(tmp_path):
    io.save(lenet(), tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    for option in ("--onnx", "--torchscript"):
        out = gpp("export", tmp_path / "m.pt", option, tmp_path / "." / "m.pt", "--input-shape", "1,8,8")
        assert out.returncode == 2 and "that is the model file being exported" in out.stderr
        out = gpp("export", tmp_path / "m.pt", option, tmp_path, "--input-shape", "1,8,8")
        assert out.returncode == 2 and "is a folder" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "m.pt").read_bytes() == before


# 12 ------------------------------------------------------------------------------------------------ gpp report

@pytest.mark.parametrize("edit,match", [
    ({"seconds": None}, "seconds is None, not a number"),
    ({"iterations": 3}, "iterations is int, not a list"),
    ({"stopped": 7}, "stopped is 7, not text"),
    ({"base": {"params": "many", "flops": 1, "test_accuracy": 0.9}}, "base.params is 'many', not a count"),
    ({"final": {"params": 1, "flops": 1, "test_accuracy": None}}, "final.test_accuracy is None"),
    ({"latency": {"b1": {"base": {"median_ms": "x"}}}}, "latency.b1.base.median_ms is not a number"),
])
def test_gpp_report_validates_types_not_only_keys(tmp_path, edit, match):
    report = {"base": {"params": 10, "flops": 20, "test_accuracy": 0.9},
              "final": {"params": 5, "flops": 10, "test_accuracy": 0.85}, "stopped": "done", "iterations": [],
              "seconds": 1.0}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert gpp("report", tmp_path).returncode == 0
    (tmp_path / "report.json").write_text(json.dumps({**report, **edit}))
    out = gpp("report", tmp_path)
    assert out.returncode == 2 and "wrong type" in out.stderr and match in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


class _Touch:
    """A pickle that would run `os.system` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_object_is_refused_as_code_not_called_damaged(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_Touch(marker), tmp_path / "evil.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")   # torch.save(model): the classic mistake
    with pytest.raises(ValueError, match=r"evil\.pt: it is a pickled Python object .*it names (posix|os|nt)\.system"):
        io.load(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"whole\.pt: it is a pickled Python object .*state_dict\(\).*it names "
                                         r"torch\.nn\.modules\.linear\.Linear"):
        io.load(tmp_path / "whole.pt")
    assert not marker.exists()
