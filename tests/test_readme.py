"""The README's Python examples (```python blocks; ```py marks a fragment) run as written and print what they
say."""

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pruning example writes a model file
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "tensor([0, 1, 2, 3]) tensor([0, 1, 2, 3])"
    assert lines[1] == "torch.Size([2, 16, 15, 15])"
    assert any(line.startswith("params ") and "criterion lda" in line for line in lines)
    assert (tmp_path / "lenet5-digits.pt").exists()
