"""Channel planting: planted channels keep the function, only they train (every earlier entry, buffers included,
is bit-for-bit what it was), planting with a teacher raises a starved model's accuracy on real data, growth by
planting chooses its sites by measured validation gain, and the loop and the command line run it."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from gpp_ext import data, growth, models
from gpp_ext.cost import count_params
from gpp_ext.loop import LoopConfig
from gpp_ext.planting import PlantedOnly, grow_by_planting, plant, plantable_groups
from gpp_ext.pruning import ChannelGraph
from gpp_ext.training import evaluate, fit

EXAMPLE = torch.zeros(2, 1, 8, 8)


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def starved(splits):
    """A LeNet-5 too narrow for the digits, trained (copy it before changing it)."""
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8, conv1=2, conv2=4, fc1=8, fc2=8)
    return fit(model, splits.train, 20, lr=4e-3, seed=0, lr_schedule="onecycle").eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_planted_channels_train_and_everything_else_stays_bit_for_bit(splits, starved, device):
    # on CUDA the model is planted on the CPU and moved by `fit`: the masks and saved entries follow it
    model = copy.deepcopy(starved)
    before, x = _state(model), torch.stack([splits.val[i][0] for i in range(64)])
    logits = model(x)
    sizes = {g.name: g.size for g in ChannelGraph(model, EXAMPLE).groups}
    model, planted = plant(model, EXAMPLE, {"conv2": 3, "fc1": 4}, torch.Generator().manual_seed(0))
    assert (model(x) - logits).abs().max() < 1e-5  # the widened model computes what it did
    fresh = _state(model)
    with PlantedOnly(model, EXAMPLE, planted) as frozen:
        assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
        fit(model, splits.train, 1, lr=4e-3, weight_decay=0.1, seed=1, after_step=frozen.after_step, device=device)
    model.cpu()
    assert model.conv1.weight.requires_grad  # released
    changed = _state(model)
    rows = planted["conv2"]
    assert not torch.equal(changed["conv2.weight"][rows], fresh["conv2.weight"][rows])  # the planted rows learnt
    # cutting the planted channels away gives back the trained model exactly: weights, biases, BN statistics
    ChannelGraph(model, EXAMPLE).prune({name: torch.arange(size) for name, size in sizes.items()})
    after = _state(model)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_planting_with_a_teacher_raises_a_starved_models_accuracy(splits, starved):
    model = copy.deepcopy(starved)
    torch.manual_seed(1)
    teacher = fit(models.build("lenet5", input_size=8), splits.train, 10, lr=4e-3, seed=1,
                  lr_schedule="onecycle").eval()
    start = evaluate(model, splits.val)
    groups = plantable_groups(model, EXAMPLE)
    assert set(groups) == {"conv1", "conv2", "fc1", "fc2"}
    model, planted = plant(model, EXAMPLE, {g: 4 for g in groups}, torch.Generator().manual_seed(0))
    with PlantedOnly(model, EXAMPLE, planted) as frozen:
        fit(model, splits.train, 10, lr=4e-3, seed=2, lr_schedule="onecycle", teacher=teacher, distill=0.5,
            after_step=frozen.after_step)
    assert evaluate(model, splits.val) > start + 0.05, (start, evaluate(model, splits.val))


def test_growth_by_planting_measures_each_sites_gain_and_keeps_what_pays(splits, starved):
    model = copy.deepcopy(starved)
    params, start = count_params(model), evaluate(model, splits.val)

    def train(m, after_step):
        return fit(m, splits.train, 6, lr=4e-3, seed=3, lr_schedule="onecycle", after_step=after_step)

    grown, history = grow_by_planting(copy.deepcopy(model), EXAMPLE, train, lambda m: evaluate(m, splits.val),
                                      threshold=0.0, rounds=2, share=1.0, max_params=1.6, progress=False)
    assert history[0].accuracy == pytest.approx(start) and history[0].params == params
    first = history[1]
    assert set(first.gains) == {"conv1", "conv2", "fc1", "fc2"}  # every site measured
    assert first.kept and first.added and set(first.added) <= {n for n, g in first.gains.items() if g > 0}
    kept = [h for h in history if h.kept]
    assert kept[-1].params == count_params(grown) and kept[-1].accuracy == pytest.approx(evaluate(grown, splits.val))
    assert params < count_params(grown) <= 1.6 * params
    assert grown(EXAMPLE).shape == (2, 10)
    with pytest.raises(ValueError, match="max_params"):
        grow_by_planting(model, EXAMPLE, train, lambda m: 0.0, max_params=1.0)


def test_the_growth_registry_and_the_loops_check():
    assert set(growth.names()) >= {"inception", "planting"} and "planting" in growth.describe()
    with pytest.raises(ValueError, match="growth must be one of"):
        LoopConfig(grow=True, growth="nope").validate()
    example = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="growable stages"):
        growth.check_model("inception", models.build("lenet5"), example)
    growth.check_model("planting", models.build("lenet5"), example)
    # a model whose only layer gives the output has nothing to widen: refused before any training
    with pytest.raises(ValueError, match="has none it can widen"):
        growth.check_model("planting", nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), example)
    from gpp_ext.loop import GrowPushPrune

    def linear():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    with pytest.raises(ValueError, match="has none it can widen"):   # the loop asks before training the base
        GrowPushPrune(linear(), data.load_dataset("digits", seed=0), LoopConfig(grow=True, growth="planting"),
                      out_dir="unused", factory=linear, progress=False)
    with pytest.raises(ValueError, match="plant_share"):
        LoopConfig(plant_share=0.0).validate()


def test_gpp_compress_grows_by_planting_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--model", "lenet5", "--data", "digits",
                          "--grow", "planting", "--plant-rounds", "1", "--plant-share", "0.5", "--grow-threshold", "0",
                          "--epochs", "1", "--grow-epochs", "1", "--epoch-budget", "1", "--target-params", "0.5",
                          "--quiet", "--threads", "1", "--no-onnx-latency", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 3), out.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["grow"] and report["config"]["growth"] == "planting"
    assert [g["method"] for g in report["growth"]] == ["planting", "planting"]
    assert "| planting round 1 |" in (tmp_path / "run" / "report.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--model", "vgg", "--data", "digits",
                              "--grow", "--quiet", "--out", str(tmp_path / "vgg")], capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode != 0 and "growth 'planting' grows any model" in refused.stderr
    assert not (tmp_path / "vgg" / "checkpoint.pt").exists()


def test_the_loop_plants_with_a_teacher_and_refuses_a_missing_or_unwanted_one(splits, starved, tmp_path):
    from gpp_ext.loop import GrowPushPrune

    torch.manual_seed(1)
    teacher = fit(models.build("lenet5", input_size=8), splits.train, 10, lr=4e-3, seed=1,
                  lr_schedule="onecycle").eval()
    config = LoopConfig(epochs=0, grow=True, growth="planting", grow_distill=0.5, grow_epochs=4, plant_rounds=1,
                        plant_share=1.0, grow_threshold=0.0, epoch_budget=0.5, target_params=0.9, batch_size=64)
    run = GrowPushPrune(copy.deepcopy(starved), splits, config, out_dir=tmp_path / "a", progress=False,
                        teacher=teacher)
    report = run.run()
    assert report["growth"][0]["method"] == "planting" and len(report["growth"]) == 2
    if report["growth"][1]["kept"]:
        assert report["base"]["params"] > count_params(starved)
    with pytest.raises(ValueError, match="needs teacher="):
        GrowPushPrune(copy.deepcopy(starved), splits, config, out_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="teacher must return logits"):
        GrowPushPrune(copy.deepcopy(starved), splits, config, out_dir=tmp_path / "c", progress=False,
                      teacher=models.build("lenet5", input_size=8, num_classes=3))


def test_a_teacher_file_is_checked_before_the_data_are_read(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"not a model")
    for path, message in ((tmp_path / "missing.pt", "--teacher: no file"), (tmp_path / "teacher.pt", "teacher.pt")):
        out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--model", "lenet5", "--data",
                              "digits", "--grow", "planting", "--grow-distill", "0.5", "--teacher", str(path),
                              "--quiet", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()


class _Sorted(torch.nn.Module):
    def forward(self, x):  # an op the channel graph cannot follow: traced as opaque when ignored
        return torch.sort(x, dim=1).values


class _WithOpaque(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 6, 3)
        self.odd, self.fc = _Sorted(), torch.nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.odd(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_planting_follows_the_models_ignore_list(splits):
    torch.manual_seed(0)
    model = _WithOpaque()
    with pytest.raises(ValueError, match="ignore="):
        plantable_groups(model, EXAMPLE)
    assert plantable_groups(model, EXAMPLE, ignore=["odd"]) == ["conv1"]  # conv2 feeds the opaque module

    def train(m, after_step):
        return fit(m, splits.train, 1, lr=4e-3, seed=3, after_step=after_step)

    before = count_params(model)
    grown, history = grow_by_planting(model, EXAMPLE, train, lambda m: evaluate(m, splits.val), threshold=0.0,
                                      rounds=1, share=1.0, progress=False, ignore=["odd"])
    assert set(history[1].gains) == {"conv1"}
    assert count_params(grown) >= before and grown(EXAMPLE).shape == (2, 10)


def test_planting_measures_and_returns_models_with_re_estimated_batchnorm_statistics(splits):
    """The old channels' norms read the planted channels once those train, so the statistics PlantedOnly kept are
    stale: every measurement and the returned model use re-estimated ones (and a BatchNorm model without
    `recalibrate` gets a warning)."""
    from gpp_ext.training import recalibrate_batchnorm, training_batches

    torch.manual_seed(0)
    model = fit(models.build("vgg", widths=[4, 4, "M", 6, "M"], hidden=8), splits.train, 3, lr=4e-3, seed=0,
                batch_size=64).eval()
    calls = []

    def recalibrate(m):
        calls.append(m)
        recalibrate_batchnorm(m, training_batches(splits.train, 64, 1))

    def train(m, after_step):
        return fit(m, splits.train, 1, lr=4e-3, seed=3, after_step=after_step, batch_size=64)

    before = _state(model)
    grown, history = grow_by_planting(model, EXAMPLE, train, lambda m: evaluate(m, splits.val), threshold=0.0,
                                      rounds=1, share=0.5, progress=False, recalibrate=recalibrate)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    assert len(calls) >= 2 + len(history[1].gains) and all(c is not model for c in calls)
    assert history[1].kept  # a starved net: planting pays here
    assert grown is not model and history[1].accuracy == pytest.approx(evaluate(grown, splits.val))
    again = copy.deepcopy(grown)
    recalibrate_batchnorm(again, training_batches(splits.train, 64, 1))
    for key, value in again.state_dict().items():  # the statistics returned are the re-estimated ones
        assert torch.allclose(value, grown.state_dict()[key], atol=1e-6), key
    with pytest.warns(RuntimeWarning, match="has BatchNorm but no recalibrate"):
        grow_by_planting(model, EXAMPLE, lambda m, a: m, lambda m: 0.5, rounds=1, progress=False)
