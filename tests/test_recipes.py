"""Recipes, the push-method registry, one training schedule for every phase, and a run that misses its size
target says so with its own exit status."""

import json
from dataclasses import asdict, fields

import pytest
import torch

from gpp_ext import data, models, pushes, recipes
from gpp_ext.loop import LoopConfig, push_stage
from gpp_ext.training import LR_SCHEDULES, fit, lr_factor
from gpp_ext.testing import run_cli


def gpp(*args, timeout=600):
    return run_cli(*args, timeout=timeout)


def test_lr_schedules_warm_up_and_anneal_to_zero():
    total = 1000
    assert [lr_factor("constant", i, total) for i in (0, 500, 1000)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, total) == 1.0 and lr_factor("cosine", total, total) == pytest.approx(0.0)
    assert lr_factor("warmup-cosine", 0, total) == 0.0 and lr_factor("warmup-cosine", 100, total) == 1.0
    assert lr_factor("onecycle", 0, total) == pytest.approx(1 / 25) and lr_factor("onecycle", 100, total) == 1.0
    for schedule in ("cosine", "warmup-cosine", "onecycle"):
        values = [lr_factor(schedule, i, total) for i in range(100, total + 1)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # never rises after the warm-up
        assert values[-1] < 1e-4


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fit_trains_with_every_schedule_and_optimizer(schedule, optimizer):
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, splits.train, 0.5, lr=0.05 if optimizer == "sgd" else 2e-3, lr_schedule=schedule,
        optimizer=optimizer)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit(model, splits.train, 0.5, optimizer="lbfgs")
    with pytest.raises(ValueError, match="warmup must be in"):
        fit(model, splits.train, 0.5, warmup=1.0)


def test_recipes_build_validated_configs_and_gpp_is_loopconfigs_defaults():
    assert recipes.build("gpp") == LoopConfig()
    v1 = recipes.build("v1")
    assert (v1.schedule, v1.push, v1.lr_schedule) == ("eta", "loss", "constant")
    assert recipes.build("fade", target_params=0.2).target_params == 0.2
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipes.build("best")
    with pytest.raises(ValueError, match=r"no settings \['learning_rate'\]"):
        recipes.build("gpp", learning_rate=0.1)
    with pytest.raises(ValueError, match="push='fade' .* needs schedule='budget'"):
        recipes.build("v1", push="fade")
    # the default the benchmark validated pushes with the fade for 15% of the epochs (no push terms), with or
    # without an epoch budget; gpp-cut is the cut at once
    config = LoopConfig()
    assert (config.push, config.push_share, config.alpha) == ("fade", pytest.approx(0.15), 0.0)
    assert config.push_epochs / (config.push_epochs + config.finetune_epochs) == pytest.approx(config.push_share)
    assert (recipes.build("gpp-cut").push, recipes.build("gpp-cut").push_epochs) == ("none", 0)
    with pytest.raises(ValueError, match="alpha, beta and gamma are all 0"):
        recipes.build("v1", alpha=0.0, beta=0.0, gamma=0.0)


def test_run_settings_leave_out_what_the_push_never_reads():
    from gpp_ext.loop import run_settings

    cut = recipes.build("gpp-cut")
    # the fade's knobs and the push terms are not read by the cut at once: configs differing only there agree
    assert run_settings(cut) == run_settings(recipes.build("gpp-cut", fade_end=1.0, alpha=0.3))
    assert run_settings(recipes.build("gpp")) != run_settings(recipes.build("gpp", fade_end=1.0))
    assert "sparsity" in run_settings(recipes.build("hgs")) and "sparsity" not in run_settings(cut)
    # with an epoch budget the per-iteration epochs are replaced by the push's share, and the other way round
    budgeted = run_settings(recipes.build("gpp", epoch_budget=3.0))
    assert "push_share" in budgeted and "push_epochs" not in budgeted
    assert "push_share" not in run_settings(cut) and run_settings(cut)["push_epochs"] == 0
    # a recorded config (a dict) is read the same way
    assert run_settings(asdict(cut)) == run_settings(cut)
    with pytest.raises(ValueError, match="outside PUSH_SETTINGS"):
        pushes.register("test-reads", "reads an unknown setting", reads=("lr",))
    assert "test-reads" not in pushes.names()


def test_a_registered_push_method_runs_in_the_loop():
    calls = []

    @pushes.register("test-count", "counts its calls (test)")
    def count(ctx):
        calls.append((ctx.epochs, ctx.goal))
        return fit(ctx.model, ctx.splits.train, ctx.epochs, **ctx.fit_kwargs), None

    try:
        assert "test-count" in pushes.names() and "test-count" in pushes.describe()
        config = LoopConfig(push="test-count", schedule="budget", push_epochs=0.25, target_params=0.5)
        config.validate()
        splits = data.load_dataset("digits", seed=0)
        model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
        push_stage(model, splits, config, seed=0, iteration=1)
        assert calls == [(0.25, pytest.approx(0.5))]
        with pytest.raises(ValueError, match="new non-empty string"):
            pushes.register("test-count", "again")
    finally:
        pushes._REGISTRY.remove("test-count")
    with pytest.raises(ValueError, match="push must be one of"):
        LoopConfig(push="test-count").validate()


def test_every_loop_setting_has_a_flag_defaulting_to_the_recipe():
    from gpp_ext.cli import _OTHER_FIELDS, _config, _parser

    parser = _parser()
    args = parser.parse_args(["compress"])
    assert _config(args, "lenet5") == recipes.build("gpp")
    args = parser.parse_args(["compress", "--recipe", "v1", "--lr", "0.01", "--fade-schedule", "linear",
                              "--alpha", "0", "--budget-kind", "params", "--weight-decay", "0"])
    config = _config(args, "lenet5")
    assert (config.schedule, config.lr, config.fade_schedule, config.alpha, config.weight_decay) == \
        ("eta", 0.01, "linear", 0.0, 0.0)
    help_text = parser._subparsers._group_actions[0].choices["compress"].format_help()
    for f in fields(LoopConfig):
        if f.name not in _OTHER_FIELDS:
            assert "--" + f.name.replace("_", "-") in help_text, f.name
    # a default is stated once, and only when there is one to state
    import re

    flat = " ".join(help_text.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "(default: lenet5)" in flat and "(default: auto)" in flat
    entries = re.split(r"\s(?=--[a-z])", flat)
    twice = [e for e in entries if e.count("(default:") + e.count("(gpp: ") > 1]
    assert not twice, twice


def test_the_default_recipe_reaches_the_target_and_a_missed_target_exits_3(tmp_path):
    out = gpp("compress", "--model", "lenet5", "--data", "digits", "--epochs", "2", "--target-params", "0.3",
              "--quiet", "--threads", "1", "--no-onnx-latency", "--out", tmp_path / "default")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["target_reached"] and report["final"]["params"] <= 0.3 * report["base"]["params"]
    # v1 in one iteration prunes only below its first threshold: far from 10% of the parameters
    out = gpp("compress", "--recipe", "v1", "--model", "lenet5", "--data", "digits", "--epochs", "1",
              "--max-iterations", "1", "--target-params", "0.1", "--quiet", "--threads", "1", "--no-onnx-latency",
              "--out", tmp_path / "missed")
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert "MISSED the target" in out.stderr and "exit status 3" in out.stderr
    report = json.loads((tmp_path / "missed" / "report.json").read_text())
    assert report["target_reached"] is False
    assert "missed the size target" in (tmp_path / "missed" / "report.md").read_text()
    shown = gpp("report", tmp_path / "missed")   # the summary says it too, not only the run's last lines
    assert shown.returncode == 0 and "MISSED: The compact model missed the size target." in shown.stdout


def test_a_run_whose_every_compact_model_falls_below_the_accuracy_floor_exits_3(tmp_path):
    # 5% of LeNet-5's parameters in one iteration on a 3-epoch base: the size is met, the accuracy is not (with
    # --accuracy-floor 0 any drop breaks it). The size alone once made this exit 0.
    out = gpp("compress", "--model", "lenet5", "--data", "digits", "--epochs", "3", "--target-params", "0.05",
              "--max-iterations", "1", "--accuracy-floor", "0", "--quiet", "--threads", "1", "--no-onnx-latency",
              "--out", tmp_path / "below")
    report = json.loads((tmp_path / "below" / "report.json").read_text())
    assert report["target_reached"] and report["accuracy_floor_met"] is False, report["stopped"]
    assert report["final"]["val_accuracy"] < report["accuracy_floor"] == report["base"]["val_accuracy"]
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert "MISSED the accuracy floor" in out.stderr and "most accurate model met" in out.stderr
    assert "smallest model above the accuracy floor" not in out.stderr
    assert "No compact model stayed at or above the accuracy floor" in (tmp_path / "below" / "report.md").read_text()
    shown = gpp("report", tmp_path / "below")
    assert "MISSED: No compact model stayed at or above the accuracy floor" in shown.stdout
    assert "missed the size target" not in shown.stdout


def test_a_trained_model_from_weights_is_not_trained_again_unless_its_head_is_new(tmp_path):
    torch.manual_seed(0)
    torch.save(models.build("lenet5", num_classes=10, input_size=8).state_dict(), tmp_path / "same.pt")
    torch.save(models.build("lenet5", num_classes=5, input_size=8).state_dict(), tmp_path / "other.pt")
    for weights, epochs in (("same.pt", 0), ("other.pt", 1)):
        out = gpp("compress", "--model", "lenet5", "--data", "digits", "--weights", tmp_path / weights,
                  "--target-params", "0.5", "--finetune-epochs", "0.2", "--accuracy-floor", "0.9", "--quiet",
                  "--threads", "1", "--no-onnx-latency", "--out", tmp_path / weights.replace(".pt", ""))
        assert out.returncode == 0, out.stderr
        report = json.loads((tmp_path / weights.replace(".pt", "") / "report.json").read_text())
        assert report["config"]["epochs"] == epochs, weights
        assert f"{epochs} epoch" in out.stdout


def test_the_last_fine_tuning_can_train_on_train_and_val(tmp_path, monkeypatch):
    import gpp_ext.loop as loop_module
    from gpp_ext.loop import GrowPushPrune

    monkeypatch.setenv("GPP_EXT_ONNX_LATENCY", "0")
    seen = []
    real = loop_module.fit

    def recording(model, dataset, epochs, **kwargs):
        seen.append((kwargs.get("desc"), len(dataset)))
        return real(model, dataset, epochs, **kwargs)

    monkeypatch.setattr(loop_module, "fit", recording)
    splits = data.load_dataset("digits", seed=0)
    config = recipes.build("gpp", epochs=1, finetune_epochs=0.2, target_params=0.5, max_iterations=2,
                           accuracy_floor=0.9, final_finetune="train+val")
    report = GrowPushPrune(models.build("lenet5", input_size=8), splits, config, out_dir=tmp_path / "r",
                           progress=False).run()
    train, both = len(splits.train), len(splits.train) + len(splits.val)
    assert seen == [("training", train), ("fine-tune 1", train), ("fine-tune 2", both)]
    assert report["iterations"][-1]["val_seen_in_training"] and "val_seen_in_training" not in report["iterations"][0]
    with pytest.raises(ValueError, match="final_finetune"):
        recipes.build("gpp", final_finetune="val")


def test_fine_tuning_can_distil_from_the_base_model(tmp_path, monkeypatch):
    import gpp_ext.loop as loop_module
    from gpp_ext.loop import GrowPushPrune

    monkeypatch.setenv("GPP_EXT_ONNX_LATENCY", "0")
    teachers = []
    real = loop_module.fit

    def recording(model, dataset, epochs, **kwargs):
        if kwargs.get("desc", "").startswith("fine-tune"):
            teachers.append((kwargs.get("teacher"), kwargs.get("distill"), kwargs.get("temperature")))
        return real(model, dataset, epochs, **kwargs)

    monkeypatch.setattr(loop_module, "fit", recording)
    splits = data.load_dataset("digits", seed=0)
    config = recipes.build("gpp", epochs=1, finetune_epochs=0.2, target_params=0.5, accuracy_floor=0.9,
                           finetune_distill=0.7, temperature=3.0)
    loop = GrowPushPrune(models.build("lenet5", input_size=8), splits, config, out_dir=tmp_path / "d", progress=False)
    loop.run()
    (teacher, weight, temperature), = teachers
    assert (weight, temperature) == (0.7, 3.0)
    base = loop_module.io.from_payload(loop.state.base_model)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), base.state_dict().values()))
    assert sum(p.numel() for p in teacher.parameters()) > sum(p.numel() for p in loop.final_model.parameters())
    with pytest.raises(ValueError, match="finetune_distill"):
        recipes.build("gpp", finetune_distill=-1.0)
