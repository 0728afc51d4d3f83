"""The README's Python examples (```python blocks; ```py marks a fragment) run as written, in order in one
namespace as a reader follows them, and print what they say."""

import contextlib
import io
import pathlib
import re

from gpp_ext.pruning import criteria

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pruning example writes a model file
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    namespace = {}
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, "README.md", "exec"), namespace)
    finally:
        criteria.unregister("l2")  # the README registers a criterion; the registry is process-wide
    lines = out.getvalue().splitlines()
    assert lines[0] == "tensor([0, 1, 2, 3]) tensor([0, 1, 2, 3])"
    assert lines[1] == "torch.Size([2, 16, 15, 15])"
    assert any(line.startswith("params ") and "criterion lda" in line for line in lines)
    assert (tmp_path / "lenet5-digits.pt").exists()
    assert "l2 L2 norm of each output filter." in lines  # the custom criterion pruned by name
    lossless = next(line for line in lines if line.startswith("cut to "))
    before, after = lossless.split("test accuracy ")[1].split(" -> ")
    assert before == after  # the faded set is exactly zero, and LeNet-5 has no BatchNorm to recalibrate
    kept = next(line for line in lines if line.startswith("Torch-Pruning kept"))
    full = next(line for line in lines if line.startswith("test accuracy ") and "params " in line)
    full = int(full.split("params ")[1].split(" -> ")[0].replace(",", ""))
    assert 0 < int(kept.split()[2]) < 0.5 * full  # half of every layer's channels gone


def test_readme_layout_matches_the_tracked_files():
    """Every module of the package and every benchmark script is in the README's Layout, and every file the
    Layout names exists."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "gpp_ext",
                                  "benchmarks", "csrc"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        import pytest

        pytest.skip("not a git checkout")
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[layout.index("```"):layout.index("```", layout.index("```") + 3)]
    named = set(re.findall(r"(?<![<>\w.])[\w.]+\.(?:py|cpp|cmake)\b", layout))
    modules = [p for p in tracked if p.endswith(".py") and p.startswith("gpp_ext/")
               and not (p.endswith("/__init__.py") and p.count("/") > 1)]
    scripts = [p for p in tracked if p.startswith("benchmarks/") and p.count("/") == 1 and p.endswith(".py")
               and not p.endswith("conftest.py")]
    missing = [p for p in modules + scripts if p.rsplit("/", 1)[1] not in named]
    assert not missing, f"README Layout does not name {missing}"
    everything = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
    basenames = {p.rsplit("/", 1)[-1] for p in everything}
    assert "docs/design.md" in everything and "docs/design.md" in layout
    assert not named - basenames, f"README Layout names files that do not exist: {named - basenames}"
    for folder in ("gpp_ext/pruning/", "gpp_ext/models/", "gpp_ext/data/", "benchmarks/compression/", "csrc/common/"):
        assert folder.split("/")[-2] + "/" in layout, folder


def _own_model_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Compress your own model")
    return text[start:text.index("\n## ", start + 3)]


def test_readme_own_model_commands_run_as_written(tmp_path):
    """The "Compress your own model" commands, run in a fresh folder with this Python's `gpp` first on PATH: a
    user model in a .py file compressed on an image folder, exported to ONNX and checked in ONNX Runtime to
    1e-4, compressed further from its model file, and a built-in model on .npz arrays."""
    import json
    import os
    import subprocess
    import sys

    blocks = re.findall(r"```bash\n(.*?)```", _own_model_section(), re.S)
    assert len(blocks) == 1
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               GPP_EXT_ONNX_LATENCY="1")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    diff = re.search(r"max \|ONNX Runtime - PyTorch\| = ([0-9.e+-]+)", out.stdout)
    assert diff and float(diff.group(1)) <= 1e-4, out.stdout
    report = json.loads((tmp_path / "runs" / "mynet" / "report.json").read_text())
    assert report["final"]["params"] <= 0.5 * report["base"]["params"] * 1.05, (report["stopped"],
                                                                               report["iterations"])
    assert report["config"]["round_to"] == 8 and report["config"]["allocation"] == "fisher"
    assert report["target_reached"]
    assert report["preprocessing"]["channels"] == 1 and report["dataset"].startswith("imagefolder:")
    onnx = report["onnx_latency"]  # ONNX Runtime CPU latency of base and compact, beside eager PyTorch
    assert {"b1", "b64"} <= set(onnx) and onnx["b64"]["compact"]["median_ms"] > 0
    assert "ONNX Runtime b=64 (ms)" in (tmp_path / "runs" / "mynet" / "report.md").read_text()
    more = json.loads((tmp_path / "runs" / "mynet-more" / "report.json").read_text())
    assert more["base"]["params"] == report["final"]["params"]  # it started from the compact model
    assert more["final"]["params"] < more["base"]["params"]
    assert (tmp_path / "runs" / "lenet5-npz" / "model.pt").exists()
    # the exported file is a real ONNX model: run it once more here, on the model's own input shape
    import numpy as np
    import onnxruntime as ort

    from gpp_ext import io as gio

    session = ort.InferenceSession(str(tmp_path / "mynet.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    old = os.getcwd()
    os.chdir(tmp_path)  # the model file names its factory file relative to where gpp ran
    try:
        model = gio.load("runs/mynet/model.pt", trust_code=True).eval()
    finally:
        os.chdir(old)
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x})[0] - expected).max() <= 1e-4


def test_readme_own_model_torchvision_command(tmp_path):
    """The torchvision line of the section, without the GPU flags, where torchvision is installed."""
    import pytest

    pytest.importorskip("torchvision")
    import os
    import subprocess
    import sys

    from gpp_ext.testing import digits_image_folder

    line = next(line for line in re.findall(r"```sh\n(.*?)```", _own_model_section(), re.S)[0].replace(
        "\\\n", " ").splitlines() if "torchvision:resnet18" in line)
    assert "--weights resnet18-imagenet.pth" in line and "--device cuda --amp" in line
    import torch

    from gpp_ext.models import build_source

    torch.save(build_source("torchvision:resnet18", num_classes=1000).state_dict(), tmp_path / "resnet18-imagenet.pth")
    digits_image_folder(tmp_path / "photos", per_class=12, size=32, rgb=True)
    args = line.split()[1:]
    args = [a for a in args if a not in ("--amp",)]
    args[args.index("--device") + 1] = "auto" if torch.cuda.is_available() else "cpu"
    args += ["--epochs", "1", "--max-iterations", "1", "--finetune-epochs", "1", "--push-epochs", "0",
             "--target-params", "0.5", "--quiet", "--image-size", "32",
             "--accuracy-floor", "0.5"]   # untrained weights, one epoch: near chance, no floor to keep
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1200, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "head 'fc' re-initialised for 10 classes" in out.stdout
    assert (tmp_path / "runs" / "resnet18" / "model.pt").exists()
