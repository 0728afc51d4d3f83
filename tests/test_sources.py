"""Models from anywhere: a factory in a .py file or a module, recorded so that `gpp_ext.io.load` rebuilds it;
local weights with a head of another size; the errors a user meets first."""

import re
import sys
import textwrap

import pytest
import torch
from torch import nn

from gpp_ext import io, prune
from gpp_ext.models import build, build_source, load_weights, spec_of

NET = textwrap.dedent('''
    import torch.nn as nn

    def make_net(num_classes=10, in_channels=1, width=8):
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def not_a_model():
        return 42
''')


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(NET)
    return path


def _loader():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 4) for _ in range(2)]


def test_file_factory_gets_the_data_shape_and_records_its_spec(net_file):
    model = build_source(f"{net_file}:make_net", num_classes=4, in_channels=1, kwargs={"width": 6})
    assert model[0].out_channels == 6 and model[-1].out_features == 4
    assert spec_of(model) == {"name": f"{net_file}:make_net",
                              "kwargs": {"width": 6, "num_classes": 4, "in_channels": 1}}


def test_pruned_file_model_rebuilds_from_the_file_alone(net_file, tmp_path):
    model = build_source(f"{net_file}:make_net", num_classes=4, in_channels=1).eval()
    x = torch.randn(3, 1, 8, 8)
    compact, report = prune(model, _loader(), x, criterion="l1", ratio=0.5, progress=False)
    assert report.params[1] < report.params[0]
    io.save(compact, tmp_path / "compact.pt")
    with pytest.raises(ValueError, match="names the factory .*mynet.py:make_net.*trust_code=True"):
        io.load(tmp_path / "compact.pt")  # a model file runs no code on its own
    loaded = io.load(tmp_path / "compact.pt", trust_code=True).eval()  # trusted: the recorded source rebuilds it
    assert torch.equal(loaded(x), compact.eval()(x))
    named = io.load(tmp_path / "compact.pt", factory=f"{net_file}:make_net").eval()  # or the caller names it
    assert torch.equal(named(x), compact.eval()(x))


def test_relative_file_is_found_beside_the_model_file(net_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = build_source("mynet.py:make_net", num_classes=4)
    io.save(model, tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path.parent)  # "mynet.py" no longer resolves from here; the model file's folder has it
    with pytest.raises(ValueError, match="trust_code"):
        io.load(tmp_path / "m.pt")  # never imported on its own
    assert isinstance(io.load(tmp_path / "m.pt", trust_code=True), nn.Sequential)


def test_module_factory(net_file, monkeypatch):
    monkeypatch.syspath_prepend(str(net_file.parent))
    sys.modules.pop("mynet", None)
    model = build("mynet:make_net", num_classes=3)  # models.build takes sources too
    assert model[-1].out_features == 3 and spec_of(model)["name"] == "mynet:make_net"


def test_weights_with_a_head_of_another_size_leave_a_fresh_head(net_file, tmp_path):
    pretrained = build_source(f"{net_file}:make_net", num_classes=7)
    torch.save(pretrained.state_dict(), tmp_path / "w.pt")
    model = build_source(f"{net_file}:make_net", num_classes=4)
    kept = load_weights(model, str(tmp_path / "w.pt"), head="8")
    assert kept == ["8.bias", "8.weight"]
    assert torch.equal(model[0].weight, pretrained[0].weight)
    # a checkpoint wrapping its state dict, saved from DistributedDataParallel ("module." prefixes)
    torch.save({"state_dict": {f"module.{k}": v for k, v in pretrained.state_dict().items()}}, tmp_path / "c.pt")
    assert load_weights(model, str(tmp_path / "c.pt"), head="8") == ["8.bias", "8.weight"]


def test_weights_that_do_not_fit_are_refused_by_name(net_file, tmp_path):
    other = build_source(f"{net_file}:make_net", num_classes=4, kwargs={"width": 5})
    torch.save(other.state_dict(), tmp_path / "w.pt")
    model = build_source(f"{net_file}:make_net", num_classes=4)
    with pytest.raises(ValueError, match=r"does not fit the model: other shapes \['0.weight"):
        load_weights(model, str(tmp_path / "w.pt"), head="8")
    with pytest.raises(FileNotFoundError, match="--weights: no file"):
        load_weights(model, str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("source,error,match", [
    ("nowhere/net.py:make", FileNotFoundError, "no file nowhere/net.py"),
    ("{net}:make_nett", ValueError, "has no callable 'make_nett'; it defines make_net, not_a_model"),
    ("{net}:not_a_model", ValueError, "returned int, not an nn.Module"),
    ("no_such_module_xyz:make", ValueError, "cannot import module 'no_such_module_xyz'"),
    ("lenet6", ValueError, "not a built-in model"),
])
def test_source_errors_name_what_is_wrong(net_file, source, error, match):
    with pytest.raises(error, match=match):
        build_source(source.format(net=net_file), num_classes=4)


def test_factory_failure_names_its_arguments(net_file):
    with pytest.raises(ValueError, match=r"the factory failed with arguments \{'depth': 3"):
        build_source(f"{net_file}:make_net", kwargs={"depth": 3})


def test_missing_optional_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import fails as if it were not installed
    with pytest.raises(ValueError, match="timm is not installed"):
        build_source("timm:resnet18", num_classes=10)


def _gpp(*args, cwd=None):
    from gpp_ext.testing import run_cli

    return run_cli(*args, cwd=cwd)


@pytest.mark.parametrize("args,match", [
    (["--model", "{net}:make_net", "--model-args", "[1, 2]"], "--model-args: give a JSON object"),
    (["--model", "{net}:make_net", "--model-args", "{{width: 3}}"], "--model-args: not JSON"),
    (["--model", "{net}:make_net", "--num-classes", "7"], "--num-classes 7: the data \\(digits\\) has 10 classes"),
    (["--model", "{net}:make_net", "--ignore", "9,features"],
     "--ignore: the model has no modules \\['9', 'features'\\]"),
    (["--model", "{net}:make_net", "--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--model", "{net}:make_net", "--round-to", "0"], "argument --round-to: must be a finite integer >= 1, got 0"),
    (["--model", "{net}:make_net", "--schedule", "budget", "--push", "fade", "--fade-end", "1.5"],
     "argument --fade-end: must be a finite number in \\(0, 1\\], got 1.5"),
    (["--model", "missing.py:make"], "--model 'missing.py:make': no file missing.py"),
    (["--model", "{net}:make_net", "--weights", "nowhere.pth"], "--weights: no file nowhere.pth"),
])
def test_cli_model_options_are_checked_before_training(net_file, tmp_path, args, match):
    out = _gpp("compress", *[a.format(net=net_file) for a in args], "--out", str(tmp_path / "o"), "--epochs", "50")
    assert out.returncode in (1, 2), out.stdout
    assert re.search(match, out.stderr), out.stderr
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals on a machine without CUDA")
def test_cli_cuda_and_amp_refused_without_a_gpu(tmp_path):
    out = _gpp("compress", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "CUDA is not available here" in out.stderr
    out = _gpp("compress", "--amp", "--out", str(tmp_path / "o"))  # auto resolves to the CPU here
    assert out.returncode == 2 and "--amp: mixed precision needs a CUDA device" in out.stderr


def test_fit_refuses_amp_on_the_cpu():
    from torch.utils.data import TensorDataset

    from gpp_ext.training import fit

    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
    with pytest.raises(ValueError, match="amp .* needs a CUDA device"):
        fit(nn.Linear(4, 2), data, 1, amp=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_with_amp_on_cuda_trains():
    from torch.utils.data import TensorDataset

    from gpp_ext.training import evaluate, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    model = fit(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), TensorDataset(x, y), 20, lr=1e-2,
                device="cuda", amp=True)
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32 under autocast
    assert evaluate(model, TensorDataset(x, y), device="cuda") > 0.9
