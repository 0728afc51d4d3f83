"""Export for deployment: `gpp export` writes ONNX (run in ONNX Runtime, outputs matching PyTorch to
1e-4 + 1e-5 * max|output|) and TorchScript (loaded back and compared), refuses bad input with a message, and
keeps no unchecked file."""

import json

import pytest
import torch

import gpp_ext
from gpp_ext import data, export, io, models
from gpp_ext.testing import run_cli

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def gpp(*args):
    return run_cli(*args)


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """A pruned LeNet-5 saved as `gpp compress` leaves it (model.pt beside a report.json)."""
    torch.manual_seed(0)
    splits = data.load_dataset("digits")
    loader = list(torch.utils.data.DataLoader(splits.train, batch_size=128))[:3]
    model, _ = gpp_ext.prune(models.build("lenet5", in_channels=1, num_classes=10, input_size=8), loader,
                             torch.zeros(2, 1, 8, 8), criterion="l1", ratio=0.5, progress=False)
    folder = tmp_path_factory.mktemp("run")
    io.save(model, folder / "model.pt")
    (folder / "report.json").write_text(json.dumps({"input_shape": [1, 8, 8]}))
    return folder, model


def test_gpp_export_writes_checked_onnx_and_torchscript(compact, tmp_path):
    folder, model = compact
    out = gpp("export", str(folder / "model.pt"), "--onnx", str(tmp_path / "m.onnx"), "--dynamic-batch",
              "--torchscript", str(tmp_path / "m.ts.pt"))
    assert out.returncode == 0, out.stderr
    assert "max |ONNX Runtime - PyTorch|" in out.stdout and "ONNX Runtime CPU latency b=1" in out.stdout
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    got = torch.as_tensor(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert (got - model.eval()(x)).abs().max() < 1e-4
        assert (torch.jit.load(str(tmp_path / "m.ts.pt"))(x) - model(x)).abs().max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ts.pt"]  # no temporary file left


def test_fixed_batch_onnx_and_the_python_api(compact, tmp_path):
    _, model = compact
    done = export.to_onnx(model, tmp_path / "b1.onnx", (1, 8, 8))
    assert done["checked_batches"] == [1] and done["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "b1.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 8, 8]
    assert export.onnx_latency_ms(tmp_path / "b1.onnx", (1, 8, 8), 1, repeats=2) > 0


def test_export_refuses_bad_input(compact, tmp_path):
    folder, model = compact
    out = gpp("export", str(folder / "model.pt"))
    assert out.returncode == 2 and "--onnx FILE and/or --torchscript FILE" in out.stderr
    out = gpp("export", str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "x.onnx"), "--input-shape", "1,8,8")
    assert out.returncode == 1 and "no model file" in out.stderr
    lone = tmp_path / "lone"
    lone.mkdir()
    io.save(model, lone / "model.pt")
    out = gpp("export", str(lone / "model.pt"), "--torchscript", str(tmp_path / "x.pt"))
    assert out.returncode == 2 and "pass --input-shape" in out.stderr
    out = gpp("export", str(lone / "model.pt"), "--torchscript", str(tmp_path / "x.pt"), "--input-shape", "1,9")
    assert out.returncode == 2 and "does not accept inputs of shape [1, 9]" in out.stderr
    with pytest.raises(ValueError, match="opset must be"):
        export.to_onnx(model, tmp_path / "x.onnx", (1, 8, 8), opset=99)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.pt").exists()


def test_a_model_too_large_for_one_onnx_file_is_refused_before_exporting(compact, tmp_path, monkeypatch):
    """Above 2 GiB torch writes the weights to a second file named after the temporary one, which the atomic
    rename would leave dangling: refused up front (the limit lowered here to this model's size)."""
    _, model = compact
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(export, "ONNX_SINGLE_FILE_LIMIT", size - 1)
    with pytest.raises(ValueError, match="above the 2 GiB an ONNX file holds"):
        export.to_onnx(model, tmp_path / "x.onnx", (1, 8, 8))
    assert list(tmp_path.iterdir()) == []


class _Scaled(torch.nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def test_export_tolerance_scales_with_the_outputs(compact, tmp_path, monkeypatch):
    """Logits of order 1e4 move by more than 1e-4 when the exporter reorders float32 sums; that is rounding, not
    a broken export, so the bound grows with max|output|. A difference above the bound still refuses the file."""
    big = _Scaled(compact[1], 1e4).eval()
    for write, name in ((export.to_onnx, "big.onnx"), (export.to_torchscript, "big.pt")):
        done = write(big, tmp_path / name, (1, 8, 8))
        assert done["max_abs_diff"] <= 1e-4 + 1e-5 * 1e4 * 50 and (tmp_path / name).exists()
    # an exporter that moved the outputs by 1e-3 at scale 1 is refused, and no file is left
    monkeypatch.setattr(export, "_difference", lambda *args: (1e-3, 1.0))
    with pytest.raises(ValueError, match=r"rtol 1e-05 \* max\|output\| 1 = 0.00011"):
        export.to_onnx(compact[1], tmp_path / "off.onnx", (1, 8, 8))
    assert not (tmp_path / "off.onnx").exists()


def test_compare_onnx_latency_times_both_models_interleaved(compact):
    base = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    timed = export.compare_onnx_latency({"base": base, "compact": compact[1]}, (1, 8, 8), batches=(1, 4), rounds=2,
                                        repeats=2)
    assert set(timed) == {"b1", "b4"}
    for t in timed.values():
        assert t["base"]["median_ms"] > 0 and t["compact"]["min_ms"] <= t["compact"]["max_ms"]
        assert t["ratio"]["min"] <= t["ratio"]["median"] <= t["ratio"]["max"]
    with pytest.raises(ValueError, match="at least one model"):
        export.compare_onnx_latency({}, (1, 8, 8))
