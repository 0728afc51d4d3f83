"""The grow-push-prune loop end to end on digits, resume after a crash, and the `gpp` command line."""

import copy
import json

import pytest
import torch

import gpp_ext
from gpp_ext import data, loop as loop_module, models
from gpp_ext.loop import GrowPushPrune, LoopConfig
from gpp_ext.recipes import RECIPES, build as build_recipe
from gpp_ext.cost import count_params
from gpp_ext.report import write_reports
from gpp_ext.testing import run_cli

# the v1 recipe (eta schedule, push terms, AdamW at a constant rate), sized for a test
FAST = {**RECIPES["v1"], **dict(epochs=4, push_epochs=1, finetune_epochs=2, max_iterations=3, batch_size=64,
                                lr=3e-3, target_params=0.5, accuracy_floor=0.05, eta_start=0.3, eta_step=0.3)}


def build(name="lenet5", seed=0):
    torch.manual_seed(seed)
    splits = data.load_dataset("digits", seed=0)
    kwargs = {"input_size": 8} if name == "lenet5" else {}
    return models.build(name, in_channels=1, num_classes=10, **kwargs), splits


def test_end_to_end_grows_pushes_prunes_and_reports(tmp_path):
    model, splits = build("inception")
    # a one-epoch base leaves room to grow (after four epochs it scores 0.986, and no module pays for itself)
    config = LoopConfig(**{**FAST, "epochs": 1}, grow=True, grow_epochs=1, max_modules_per_stage=2)
    said = []
    run = GrowPushPrune(model, splits, config, out_dir=tmp_path, progress=False, log=said.append)
    report = run.run()
    write_reports(report, tmp_path, run.final_model)
    assert len(report["growth"]) > 1 and report["growth"][0]["kept"]  # the base entry, then the attempts
    tried = len(report["growth"]) - 1
    kept = sum(g["kept"] for g in report["growth"][1:])
    assert any(line.startswith(f"grown (inception; {tried} candidate{'s' * (tried != 1)} tried, {kept} kept)")
               for line in said), said
    # once the model grew, sizes are shares of the grown model, and the report keeps the model before growth
    assert kept and any("% of the grown model)" in line for line in said)
    assert not any("of the base)" in line for line in said)
    assert report["before_growth"]["params"] == count_params(models.build("inception", in_channels=1,
                                                                          num_classes=10)) < base_params(report)
    assert f"Grown from {report['before_growth']['params']:,} parameters" in (tmp_path / "report.md").read_text()
    assert report["iterations"] and all("val_accuracy_after_prune" in it for it in report["iterations"])
    base, final = report["base"], report["final"]
    assert final["params"] < base["params"]
    assert final["val_accuracy"] >= base["val_accuracy"] - config.accuracy_floor
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["input_shape"] == [1, 8, 8]
    for key in ("params", "flops", "test_accuracy"):
        assert key in saved["base"] and key in saved["final"]
    assert 0 <= saved["final"]["test_accuracy"] <= 1
    assert (tmp_path / "progress.png").stat().st_size > 1000 and "| params |" in (tmp_path / "report.md").read_text()
    assert "## Growth" in (tmp_path / "report.md").read_text() and "| stage 0 |" in (tmp_path / "report.md").read_text()
    assert {g["method"] for g in report["growth"]} == {"inception"}
    compact = gpp_ext.io.load(tmp_path / "model.pt").eval()
    assert gpp_ext.count_params(compact) == final["params"]


def base_params(report):
    return report["base"]["params"]


def test_the_base_is_measured_with_the_statistics_of_its_final_weights(tmp_path):
    """Two epochs on digits are 22 steps: BatchNorm's running averages still hold much of their starting values,
    and the trained base scored at chance (0.098) with them, which set the accuracy floor and each growth
    candidate's comparison. The loop re-estimates them after training the base."""
    model, splits = build("inception")
    said = []
    config = build_recipe("gpp-cut", epochs=2, epoch_budget=0.5, target_params=0.9)   # batches of 128
    report = GrowPushPrune(model, splits, config, out_dir=tmp_path, progress=False, log=said.append).run()
    assert report["base"]["val_accuracy"] > 0.5 and "no_floor" not in report, report["base"]
    assert report["accuracy_floor"] == pytest.approx(report["base"]["val_accuracy"] - config.accuracy_floor)
    assert any(line.startswith("base model: ") and "after 2 epochs" in line for line in said)
    # a growth that cannot add a module says why, and the model it leaves is the base
    said.clear()
    config = build_recipe("gpp-cut", epochs=2, epoch_budget=0.5, target_params=0.9, grow=True, growth="inception",
                          max_modules_per_stage=1)
    report = GrowPushPrune(build("inception")[0], splits, config, out_dir=tmp_path / "grown", progress=False,
                           log=said.append).run()
    grown = [line for line in said if line.startswith("grown (")]
    assert len(grown) == 1 and grown[0].startswith("grown (inception; nothing tried: every stage already holds 1 "
                                                   "module (--max-modules-per-stage)): ")
    assert "the model is unchanged (" in grown[0]
    assert "before_growth" not in report and any("% of the base)" in line for line in said)


def test_a_base_checkpointed_before_the_re_estimate_is_re_estimated_when_resumed(tmp_path, monkeypatch):
    """A run whose base was trained and checkpointed by a loop that did not yet re-estimate BatchNorm, resumed
    before its first push: the base is re-estimated and measured again, so the floor is not set from a base at
    chance."""
    from gpp_ext.atomic import read, save_atomic

    config = build_recipe("gpp-cut", epochs=2, epoch_budget=0.5, target_params=0.9)
    real = loop_module.recalibrate_batchnorm
    monkeypatch.setattr(loop_module, "recalibrate_batchnorm", lambda model, *a, **k: model)   # the old loop
    monkeypatch.setattr(loop_module, "push_stage", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        GrowPushPrune(*build("inception"), config, out_dir=tmp_path, progress=False).run()
    checkpoint = tmp_path / "checkpoint.pt"
    data = read(checkpoint, "test")
    assert data["state"]["stage"] == 1 and data["state"]["base"]["val_accuracy"] < 0.2   # stale statistics
    del data["state"]["settled"]   # as a checkpoint of the old loop has it
    save_atomic(data, checkpoint)
    monkeypatch.undo()
    said = []
    report = GrowPushPrune(*build("inception"), config, out_dir=tmp_path, progress=False,
                           log=said.append).run(resume=True)
    assert report["base"]["val_accuracy"] > 0.5 and "no_floor" not in report
    assert any(line.startswith("the base's BatchNorm statistics re-estimated") for line in said)
    assert loop_module.recalibrate_batchnorm is real


def test_an_untrained_base_sets_no_accuracy_floor(tmp_path):
    """A base no better than always answering the most frequent class (an untrained one, as recipe gap starts
    from) has no accuracy to keep: the run applies no floor and says so, instead of a floor below chance."""
    model, splits = build()
    said = []
    config = build_recipe("gpp-cut", epochs=0, epoch_budget=1, target_params=0.5, batch_size=64)
    report = GrowPushPrune(model, splits, config, out_dir=tmp_path / "run", progress=False, log=said.append).run()
    assert report["base"]["val_accuracy"] < 0.2 and "at chance" in report["no_floor"]
    assert report["accuracy_floor"] is None and report["accuracy_floor_met"] is None
    assert any(line.startswith("no accuracy floor: ") for line in said) and "(no floor)" in said[-1]
    write_reports(report, tmp_path / "run")
    assert "No accuracy floor applied: the base model's validation accuracy" in (tmp_path / "run" / "report.md"
                                                                                 ).read_text()
    shown = gpp("report", str(tmp_path / "run"))
    assert shown.returncode == 0 and "No accuracy floor applied" in shown.stdout and "MISSED" not in shown.stdout


def test_chance_is_the_most_frequent_class_within_three_standard_errors():
    from torch.utils.data import TensorDataset

    half = TensorDataset(torch.zeros(100, 1), torch.tensor([0] * 50 + [1] * 50))   # 0.5 +- 3 * 0.05
    assert loop_module._at_chance(0.64, half) and not loop_module._at_chance(0.66, half)
    skewed = TensorDataset(torch.zeros(400, 1), torch.tensor([0] * 360 + [1] * 40))   # 0.9 +- 3 * 0.015
    assert loop_module._at_chance(0.93, skewed) and not loop_module._at_chance(0.95, skewed)


def _comparable(report):
    drop = ("latency_ms_b1", "latency_ms_b64")
    its = [{k: v for k, v in it.items() if k not in drop} for it in report["iterations"]]
    return {k: v for k, v in report["final"].items() if k not in drop}, its


def _crash_and_resume(config, out, monkeypatch, crash_at: int, seed: int) -> dict:
    """Runs the loop with a KeyboardInterrupt at the `crash_at`-th prune, then resumes it from the checkpoint
    with a model built from another seed, and returns the resumed report."""
    calls = {"n": 0}
    real_prune = loop_module.prune

    def crashing_prune(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(loop_module, "prune", crashing_prune)
    with pytest.raises(KeyboardInterrupt):
        GrowPushPrune(*build(), config, out_dir=out, progress=False).run()
    monkeypatch.setattr(loop_module, "prune", real_prune)
    return GrowPushPrune(*build(seed=seed), config, out_dir=out, progress=False).run(resume=True)


def test_a_growth_interrupted_half_way_resumes_inside_the_growth(tmp_path, monkeypatch):
    """The grow stage saves the net kept so far after every attempt: killed after the first attempt, a resumed run
    trains only the attempts after it and ends where the uninterrupted run ends."""
    import gpp_ext.grow as grow_module

    config = LoopConfig(**{**FAST, "max_iterations": 1}, grow=True, grow_epochs=1, max_modules_per_stage=2)
    straight = GrowPushPrune(*build("inception"), config, out_dir=tmp_path / "a", progress=False).run()
    real_grow, trained = grow_module.grow, []

    def interrupted(model, train, evaluate, *args, after_step=None, **kwargs):
        def counted(m):
            trained.append(sum(len(s) for s in m.stages))
            return train(m)

        def step(m, history):
            after_step(m, history)
            if len(history) == 2 and kwargs.get("history") is None:
                raise KeyboardInterrupt
        return real_grow(model, counted, evaluate, *args, after_step=step, **kwargs)

    monkeypatch.setattr(grow_module, "grow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        GrowPushPrune(*build("inception"), config, out_dir=tmp_path / "b", progress=False).run()
    assert trained == [3]
    resumed = GrowPushPrune(*build("inception", seed=7), config, out_dir=tmp_path / "b", progress=False).run(
        resume=True)
    assert len(trained) == len(straight["growth"]) - 1   # the first attempt was not trained again
    assert resumed["growth"] == straight["growth"]
    assert _comparable(resumed) == _comparable(straight)


def test_resume_after_a_crash_gives_the_same_result(tmp_path, monkeypatch):
    config = LoopConfig(**FAST)
    model, splits = build()
    straight = GrowPushPrune(model, splits, config, out_dir=tmp_path / "a", progress=False).run()

    # as if Ctrl-C hit the second prune; whatever the caller builds then, the checkpoint's model is used
    resumed = _crash_and_resume(config, tmp_path / "b", monkeypatch, crash_at=2, seed=123)
    assert _comparable(resumed) == _comparable(straight)
    model, splits = build()

    other = LoopConfig(**{**FAST, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 -> 0.001\)"):
        GrowPushPrune(model, splits, other, out_dir=tmp_path / "b", progress=False).run(resume=True)


def gpp(*args, process=False):
    return run_cli(*args, process=process, timeout=300)


def test_cli_help_errors_and_missing_data(tmp_path):
    out = gpp("--help", process=True)  # the entry point itself, in a fresh interpreter
    assert out.returncode == 0 and "compress" in out.stdout and "demo" in out.stdout
    out = gpp("compress", "--help")
    assert out.returncode == 0 and "--target-params" in out.stdout
    out = gpp("compress", "--target-params", "2")
    assert out.returncode == 2 and "--target-params: must be a finite number in (0, 1], got 2" in out.stderr
    # an argument error is the usage line and the error, not the page of every option's usage
    assert out.stderr.splitlines()[0] == "usage: gpp compress [options]   (gpp compress --help lists them)"
    assert len(out.stderr.splitlines()) == 2
    out = gpp("compress", "--model", "alexnet")
    assert out.returncode == 2 and "--model 'alexnet': not a built-in model and no such file" in out.stderr
    out = gpp("compress", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert out.returncode == 1 and "apt-get install dataset-fashion-mnist" in out.stderr
    out = gpp("report", str(tmp_path))
    assert out.returncode == 1 and "no report.json" in out.stderr


def test_cli_compress_runs_and_reports(tmp_path):
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps([{"method": "l1", "model": "lenet5", "dataset": "digits", "params": 5000,
                                  "test_accuracy": 0.9}, {"method": "l1", "model": "vgg", "dataset": "digits",
                                                          "params": 1, "test_accuracy": 0.1}]))
    out = gpp("compress", "--model", "lenet5", "--data", "digits", "--epochs", "3", "--max-iterations", "2",
              "--finetune-epochs", "1", "--target-params", "0.5", "--out", str(tmp_path), "--quiet",
              "--peers", str(peers))
    assert out.returncode == 0, out.stderr
    assert "| params |" in out.stdout
    assert [p["method"] for p in json.loads((tmp_path / "report.json").read_text())["peers"]] == ["l1"]
    shown = gpp("report", str(tmp_path))
    assert shown.returncode == 0 and "| test accuracy |" in shown.stdout
    assert gpp("report", str(tmp_path / "report.json")).stdout == shown.stdout   # the file itself, too
    # the stage lines on stderr (a run whose output goes to a file shows how far it got)
    assert "gpp: base model: " in out.stderr and "gpp: iteration 1: pruned to " in out.stderr


def test_budget_schedule_reaches_the_target_in_its_iterations(tmp_path):
    """schedule="budget": iteration i of n keeps target ** (i / n) of the base parameters, in `cuts` cuts."""
    config = LoopConfig(**{**FAST, "target_params": 0.3, "max_iterations": 2, "accuracy_floor": 0.5,
                           "schedule": "budget", "cuts": 2})
    model, splits = build()
    run = GrowPushPrune(model, splits, config, out_dir=tmp_path, progress=False)
    report = run.run()
    base = report["base"]["params"]
    assert [it["iteration"] for it in report["iterations"]] == [1, 2]
    for it in report["iterations"]:
        assert it["eta"] is None and it["params"] <= it["goal_params"] * base
    assert report["iterations"][0]["goal_params"] == pytest.approx(0.3 ** 0.5)
    assert report["stopped"] == "size target reached"
    write_reports(report, tmp_path, run.final_model)
    assert "params |" in (tmp_path / "report.md").read_text()


def test_loop_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="schedule must be one of"):
        LoopConfig(schedule="cosine").validate()
    with pytest.raises(ValueError, match="needs schedule='budget'"):
        LoopConfig(schedule="eta", cuts=2).validate()
    with pytest.raises(ValueError, match="criterion must be one of"):
        LoopConfig(criterion="magic").validate()
    with pytest.raises(ValueError, match="separation must be 'fisher' or 'lda', got 'ratio'"):
        LoopConfig(separation="ratio").validate()   # once offered by `gpp compress --separation`


def test_every_loop_flag_has_its_own_help_and_the_choices_the_loop_accepts():
    from dataclasses import fields

    from gpp_ext import cli

    assert all(f.name in cli.CONFIG_HELP for f in fields(LoopConfig) if f.name not in cli._OTHER_FIELDS)
    for name, choices in cli._CHOICES.items():
        for value in choices:   # each value the command line offers is one the loop's own check accepts
            target = {f"target_{value}": 0.5} if value in ("flops", "latency") else {}
            try:     # (another setting may need changing with it: that is not this value refused)
                LoopConfig(**{name: value, **target}).validate()
            except ValueError as error:  # a refusal of the value itself ends "got <value>"
                assert f"got {value!r}" not in str(error), (name, value, error)


def test_the_command_line_s_targets_conflicts_and_messages_in_its_own_words(capsys):
    from gpp_ext import cli

    for argv, meant in ((["compress", "--recipe", "gpp_cut"], "'gpp-cut'"), (["compres"], "'compress'")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"did you mean {meant}?" in capsys.readouterr().err, argv

    def config(*argv):
        return cli._config(cli._parser().parse_args(["compress", *argv]), "lenet5")

    alone = config("--target-flops", "0.3")   # a FLOP target alone is the only target
    assert (alone.budget_kind, alone.target_flops, alone.target_params) == ("flops", 0.3, 1.0)
    both = config("--target-flops", "0.3", "--target-params", "0.2")   # with a parameter target: both
    assert (both.budget_kind, both.target_flops, both.target_params) == ("params", 0.3, 0.2)
    assert config("--target-latency", "0.5").budget_kind == "latency"
    for argv, said in ((["--grow", "planting", "--no-grow"], "--grow planting and --no-grow contradict"),
                       (["--epoch-budget", "2", "--push-epochs", "1"], "--push-epochs would be ignored"),
                       (["--fade-gradual", "--no-fade-fixed-widths"], "gpp: --fade-gradual needs --fade-fixed-widths"),
                       (["--budget-kind", "flops"], "gpp: --budget-kind must be 'params', 'flops' (which needs "
                                                    "--target-flops)")):
        assert cli.main(["compress", "--data", "digits", "--out", "unused", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "LoopConfig" not in err and "Traceback" not in err, err


def test_a_size_target_below_the_smallest_reachable_model_is_refused_before_training(tmp_path, monkeypatch):
    """LeNet-5 on digits with every prunable layer at one channel keeps ~0.4% of its parameters and ~3% of its
    FLOPs (the classifier stays whole): a target below that is refused, naming it and the smallest reachable
    fraction, before any training; a target just above it is accepted."""
    monkeypatch.setattr(loop_module, "fit", lambda *a, **k: pytest.fail("trained before refusing the target"))
    model, splits = build()
    graph = gpp_ext.pruning.ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    narrowest = {g.name: 1 for g in graph.groups if g.prunable}
    for kind, field in (("params", "target_params"), ("flops", "target_flops")):
        cost = gpp_ext.pruning.costs.CostModel(graph, kind)
        least = cost.cost(narrowest) / cost.cost({})
        cut = copy.deepcopy(model)
        # the cost model's smallest model is the real one-channel cut
        real = gpp_ext.pruning.ChannelGraph(cut, torch.zeros(2, 1, 8, 8)).prune(
            {n: torch.tensor([0]) for n in narrowest})
        counted = gpp_ext.count_params(real) if kind == "params" else gpp_ext.count_flops(real, torch.zeros(2, 1, 8, 8))
        assert counted == cost.cost(narrowest)
        settings = {field: least * 0.9, "budget_kind": kind} if kind == "flops" else {field: least * 0.9}
        with pytest.raises(ValueError, match=rf"a target of .*{field}, gpp: --{field.replace('_', '-')}\) cannot be "
                                             rf"met: the smallest model pruning can reach keeps {100 * least:.1f}%"):
            GrowPushPrune(model, splits, LoopConfig(**{**FAST, **settings}), out_dir=tmp_path / kind,
                          progress=False)
        settings[field] = least * 1.1
        GrowPushPrune(model, splits, LoopConfig(**{**FAST, **settings}), out_dir=tmp_path / kind, progress=False)
    # round_to=8 narrows what the prune stage can reach (8.4% of the parameters here), but not what a push that
    # selects the keep-set itself (Group Fisher, grow-and-prune) can: 5% is refused for the fade only
    for push, refused in (("fade", True), ("group_fisher", False), ("gap", False)):
        config = build_recipe("gpp", push=push, round_to=8, target_params=0.05)
        try:
            GrowPushPrune(model, splits, config, out_dir=tmp_path / push, progress=False)
        except ValueError as error:
            assert refused and "keeps 8.4% of the parameters (every prunable layer at 8 channels" in str(error)
        else:
            assert not refused, push


def test_the_readme_python_loop_runs_after_import_gpp_ext_alone_and_logs_each_stage(tmp_path):
    """The README's Python form of `gpp compress`, in a fresh interpreter where only `import gpp_ext` ran (the
    loop, recipes and report modules load on first use); `log` gets a line per stage and `write_reports` makes
    the folder `gpp compress` makes."""
    import subprocess
    import sys

    script = f"""
import torch, gpp_ext
torch.manual_seed(0)
model = gpp_ext.models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
lines = []
loop = gpp_ext.loop.GrowPushPrune(model, gpp_ext.data.load_dataset("digits"),
                                  gpp_ext.recipes.build("gpp", target_params=0.5, epochs=2, epoch_budget=1,
                                                        accuracy_floor=0.5),
                                  out_dir={str(tmp_path)!r}, log=lines.append, progress=False, onnx_latency=False)
report = loop.run()
gpp_ext.report.write_reports(report, {str(tmp_path)!r}, loop.final_model)
print("\\n".join(lines))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("base model: 21,386 params") and "validation accuracy" in lines[0], lines
    assert any(line.startswith("iteration 1: pruned to ") for line in lines), lines
    assert lines[-1].startswith("iteration ") and "stopping: size target reached" in lines[-1], lines
    assert {"report.json", "report.md", "model.pt", "checkpoint.pt"} <= {p.name for p in tmp_path.iterdir()}


def test_fade_loop_cuts_only_zeros_and_resumes_between_push_and_cut(tmp_path, monkeypatch):
    """push="fade" with an epoch budget: each cut removes the faded set, so accuracy right after the cut is the
    accuracy at the end of the push (BatchNorm recalibration aside; LeNet-5 has none), and a crash between the
    push and its cut resumes to the same result."""
    config = LoopConfig(**{**FAST, "target_params": 0.3, "max_iterations": 2, "accuracy_floor": 0.5,
                           "schedule": "budget", "push": "fade", "epoch_budget": 3, "push_share": 0.5,
                           "fade_reselect": 2})
    model, splits = build()
    straight = GrowPushPrune(model, splits, config, out_dir=tmp_path / "a", progress=False).run()
    for it in straight["iterations"]:
        assert it["val_accuracy_after_prune"] == it["val_accuracy_end_of_push"]
        assert it["params"] <= it["goal_params"] * straight["base"]["params"]
    resumed = _crash_and_resume(config, tmp_path / "b", monkeypatch, crash_at=1, seed=5)
    assert _comparable(resumed) == _comparable(straight)


def test_epoch_budget_splits_the_training():
    from gpp_ext.loop import stage_epochs

    assert stage_epochs(LoopConfig(epoch_budget=3, max_iterations=3, push_share=0.25)) == (0.25, 0.75)
    assert stage_epochs(LoopConfig(push_epochs=1, finetune_epochs=2)) == (1, 2)
    with pytest.raises(ValueError, match="needs schedule='budget'"):
        LoopConfig(schedule="eta", push="fade").validate()
    with pytest.raises(ValueError, match="push must be one of"):
        LoopConfig(push="shove").validate()


def test_the_prune_stage_draws_its_randomness_from_the_run_seed():
    """A criterion or width search that draws random numbers (random, the genetic search, loss-increase samples)
    draws them from the stage's seed: two seeds cut differently, one seed the same way twice."""
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    base = models.build("lenet5", input_size=8)
    config = LoopConfig(criterion="random", target_params=0.5, allocation="uniform")

    def kept(seed):
        model, _ = loop_module.prune_stage(copy.deepcopy(base), splits, config, 1, gpp_ext.count_params(base),
                                           seed=seed)
        return [t.detach().clone() for t in model.state_dict().values()]

    same, other = kept(3), kept(4)
    assert all(torch.equal(a, b) for a, b in zip(same, kept(3)))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(same, other))


def test_the_fade_prepares_from_the_stage_seed_whatever_ran_before():
    """A criterion that draws from the global generator (a user's own, or dropout in its passes) chooses the fade's
    first removal set: it must draw from the stage's seed, so a resumed run (which starts with another state)
    prepares the same cut as an uninterrupted one."""
    from gpp_ext.loop import push_stage
    from gpp_ext.pruning import criteria

    def noisy(graph, context):
        """Random scores from the global generator (test)."""
        return {g.name: torch.rand(g.size, dtype=torch.float64) for g in graph.groups}

    criteria.register("test-noisy", noisy)
    try:
        config = LoopConfig(push="fade", criterion="test-noisy", schedule="budget", push_epochs=0.05,
                            target_params=0.4, allocation="global", normalize="mean")
        config.validate()
        splits = data.load_dataset("digits", seed=0)
        keeps = []
        for before in (1, 2):
            torch.manual_seed(0)
            model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
            torch.manual_seed(before)   # what ran before the stage (or nothing, after a resume)
            _, keep = push_stage(model, splits, config, seed=3, iteration=1)
            keeps.append({name: k.tolist() for name, k in keep.items()})
        assert keeps[0] == keeps[1]
    finally:
        criteria.unregister("test-noisy")
