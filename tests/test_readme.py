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
