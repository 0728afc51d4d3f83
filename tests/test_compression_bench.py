"""The compression benchmark harness runs end to end (tiny digits runs), writes what issue 6 asks for, runs
GPP's rows as the loop users run with the validated default recipe, and resumes an interrupted run without
redoing or changing what it already measured."""

import importlib
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("method", "model", "dataset", "budget_kind", "budget", "seed", "params", "flops", "acc_end_of_prep",
          "acc_after_cut", "acc_after_recal", "ft_curve", "test_accuracy", "val_accuracy", "latency_ms_b1",
          "latency_ms_b64", "harness", "seconds", "train")


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    yield importlib.import_module("benchmarks.compression.__main__")
    sys.modules.pop("benchmarks.compression.__main__", None)


def smoke(harness, tmp_path, *extra):
    out = tmp_path / "compression.json"
    code = harness.main(["--smoke", "--data", "digits", "--out", str(out), "--cache", str(tmp_path / "cache"),
                         *extra])
    return code, out


def score_first(harness, monkeypatch, candidate):
    """Recipe candidate `candidate`'s validation trials score 1.0 (the others as measured)."""
    real = harness.protocol.measure

    def rigged(method, base, setup, cache, stem, keep=True):
        m = real(method, base, setup, cache, stem, keep)
        if not keep and setup.knobs == harness.choosing.CANDIDATES[candidate]:
            m = {**m, "val_accuracy": 1.0}
        return m

    monkeypatch.setattr(harness.protocol, "measure", rigged)


def test_harness_smoke(harness, tmp_path, monkeypatch):
    # the rows and tables are under test here, not the choice (the next test checks a default that loses): the
    # default recipe's trial is scored first on validation, since one epoch on digits says nothing about it
    score_first(harness, monkeypatch, "gpp-fade-taylor")
    code, out = smoke(harness, tmp_path)
    assert code == 0
    records = json.loads(out.read_text())
    methods = {r["method"] for r in records}
    assert set(harness.default_methods(harness.MODES["smoke"]["methods"]["vgg"], True)) == methods
    assert {"gpp", "gpp-nopush"} <= methods  # the default (the fade) and its variant without a push
    for r in records:
        for key in FIELDS:
            assert key in r, key
        assert r["params"] < r["base_params"]
        assert 0 <= r["test_accuracy"] <= 1 and r["seconds"] >= 0
        assert 0 < r["cpu_seconds"] <= r["seconds"] * torch.get_num_threads() + 1   # CPU time of the run itself
        assert r["prep_epochs_used"] + r["finetune_epochs"] == pytest.approx(r["epochs"])  # equal training
        assert r["train"] == records[0]["train"]  # every method trains with the loop's recipe
    from gpp_ext import recipes
    from gpp_ext.loop import train_kwargs

    assert records[0]["train"]["lr_schedule"] == train_kwargs(recipes.build("gpp"))["lr_schedule"]
    gpp = next(r for r in records if r["method"] == "gpp")
    # GPP's row is the loop with the default recipe, given only the budget, epochs and seed
    assert gpp["config"]["push"] == recipes.build("gpp").push and gpp["config"]["epochs"] == 0
    assert gpp["config"]["epoch_budget"] == gpp["epochs"] and gpp["target_reached"]
    assert gpp["config"]["push"] == "fade" and gpp["prep_epochs_used"] > 0
    cut = next(r for r in records if r["method"] == "gpp-nopush")
    assert cut["config"]["push"] == "none" and cut["prep_epochs_used"] == 0
    one_shot = next(r for r in records if r["method"] == "l1")
    assert one_shot["prep_epochs_used"] == 0 and one_shot["acc_end_of_prep"] == one_shot["base_test_accuracy"]
    choices = json.loads((tmp_path / "compression-choices.json").read_text())
    assert {c["what"] for c in choices} >= {"slimming reg", "gpp recipe", "gpp ablation"}
    assert all(c["commit"] and c["machine"] for c in choices)  # every figure says where it was made
    recipe = [c for c in choices if c["what"] == "gpp recipe"]
    assert {c["setting"] for c in recipe} == {"gpp-cut", "gpp-fade-taylor"}
    assert sum(c["chosen"] for c in recipe) == 1
    assert sum(c.get("chosen", False) for c in choices if c["what"] == "slimming reg") == 1
    # Group Fisher's knob is its schedule: the share of the epochs spent removing channels (the smoke mode tries
    # only the recipe's own), and its rows run with the chosen one
    fisher = [c for c in choices if c["what"] == "group_fisher push_share"]
    assert [c["setting"] for c in fisher] == ["push_share=0.333333"] and fisher[0]["chosen"]
    assert next(r for r in records if r["method"] == "group_fisher")["knobs"] == {"push_share": 1 / 3}
    # every method starts from the same reference and meets its budget
    assert len({r["base_test_accuracy"] for r in records}) == 1
    assert all(r["met_budget"] for r in records)
    table = (tmp_path / "compression.md").read_text()
    results, chosen = table.split("## GPP's recipe, chosen on validation")
    assert results.count("| vgg | 30% |") == len(methods) + 1  # every method, plus the 'who wins' row
    assert "## Ablation" in chosen and "| uniform x cut x onecycle |" in chosen
    assert (tmp_path / "compression.png").stat().st_size > 1000


def test_no_gpp_row_runs_when_another_candidate_beats_the_default(harness, tmp_path, monkeypatch, capsys):
    # a candidate that cannot lose: the cut at once is scored above the default recipe's loop on validation
    score_first(harness, monkeypatch, "gpp-cut")
    code, out = smoke(harness, tmp_path, "--methods", "gpp,gpp-fade,l1")
    assert code == 0
    assert [r["method"] for r in json.loads(out.read_text())] == ["l1"]
    assert "candidate 'gpp-cut' beats the default recipe ('gpp-fade-taylor')" in capsys.readouterr().err


def test_resume_keeps_records_and_runs_only_the_missing(harness, tmp_path):
    code, out = smoke(harness, tmp_path, "--methods", "l1")
    assert code == 0
    first = json.loads(out.read_text())
    assert [r["method"] for r in first] == ["l1"]
    code, out = smoke(harness, tmp_path, "--methods", "l1,random", "--resume")
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["l1", "random"]
    assert records[0] == first[0]  # not rerun
    # the cached base made both: the reference accuracy is shared
    assert records[0]["base_test_accuracy"] == records[1]["base_test_accuracy"]


def test_render_only_redraws_from_the_records(harness, tmp_path):
    code, out = smoke(harness, tmp_path, "--methods", "l1")
    assert code == 0
    (tmp_path / "compression.md").unlink()
    assert smoke(harness, tmp_path, "--render")[0] == 0
    assert "| vgg | 30% | l1 |" in (tmp_path / "compression.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert harness.main(["--smoke", "--data", "digits", "--render", "--out", str(empty / "c.json")]) == 1


def test_latency_pass_times_the_kept_compact_models_in_one_window(harness, tmp_path):
    code, out = smoke(harness, tmp_path, "--methods", "l1,random")
    assert code == 0
    kept = sorted((tmp_path / "cache" / "compact").glob("*.pt"))
    assert [p.name for p in kept] == ["vgg-digits-smoke-seed0-params0.3-l1.pt",
                                      "vgg-digits-smoke-seed0-params0.3-random.pt"]
    before = json.loads(out.read_text())
    kept[1].unlink()  # a compact model that is gone (a fresh checkout): rebuilt from its record's widths
    assert smoke(harness, tmp_path, "--latency")[0] == 0
    records = json.loads(out.read_text())
    timed = {r["method"]: r for r in records}
    lat = timed["l1"]["latency"]
    assert lat["models_in_window"] == 3  # the base, the kept compact model and the rebuilt one
    for runtime in ("eager",) + (("onnxruntime",) if "onnxruntime" in lat else ()):
        for b in (1, 64):
            assert lat[runtime][f"b{b}_ms"] > 0 and lat[runtime][f"speedup_b{b}"] > 0
    assert lat["eager"]["speedup_b64"] == pytest.approx(lat["base_ms"]["b64"] / lat["eager"]["b64_ms"])
    assert timed["random"]["latency"]["eager"]["b1_ms"] > 0
    for r, old in zip(records, before):
        assert {k: v for k, v in r.items() if k != "latency"} == old  # nothing else changes
    table = (tmp_path / "compression.md").read_text()
    assert "## Speed of the compact models" in table
    assert table.count(" *|") == 0 and table.count(" * |") == 0  # no in-run latency left
    # the rebuilt architecture is the compact model's: same widths, same parameters
    import gpp_ext

    compact = gpp_ext.io.load(kept[0])
    base = gpp_ext.io.load(next((tmp_path / "cache").glob("vgg-digits-smoke-seed0-base*.pt")))
    rebuilt = harness.latency.from_widths(base, timed["l1"], torch.zeros(2, 1, 8, 8))
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [tuple(p.shape) for p in compact.parameters()]
    # a record without widths and without its model is not timed
    kept[0].unlink()
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "widths"} for r in records]))
    assert smoke(harness, tmp_path, "--latency")[0] == 1  # nothing left to time


def test_resume_refuses_other_settings(harness, tmp_path):
    out = tmp_path / "compression.json"
    out.write_text(json.dumps([{"method": "l1", "model": "vgg", "dataset": "digits", "budget": 0.3, "seed": 0,
                                "mode": "quick", "epochs": 5, "prep_epochs": 1, "finetune_epochs": 2, "lr": 2e-3,
                                "harness": 2}]))
    with pytest.raises(SystemExit, match="other settings"):
        smoke(harness, tmp_path, "--methods", "l1", "--resume")
    assert json.loads(out.read_text())[0]["mode"] == "quick"  # the user's file is untouched


def test_a_second_run_on_the_same_results_stops_before_touching_them(harness, tmp_path):
    """A `--latency` pass or a `--resume` started beside a running harness would overwrite its records: it stops
    at once, naming the running one's pid, and the file is untouched."""
    from benchmarks._meta import Exclusive

    out = tmp_path / "compression.json"
    out.write_text("[]\n")
    with Exclusive(str(out), "test"):
        with pytest.raises(SystemExit, match=f"pid {__import__('os').getpid()}.*--resume"):
            smoke(harness, tmp_path, "--methods", "l1", "--resume")
        with pytest.raises(SystemExit, match="another run"):
            smoke(harness, tmp_path, "--latency")
    assert out.read_text() == "[]\n"
    with Exclusive(str(out), "test"):  # released when the holder ends
        pass


def test_a_record_is_stamped_dirty_by_changed_code_not_by_the_results_the_benchmarks_write():
    """Benchmarks that run for days rewrite their own records; only a change elsewhere means the figures came from
    code that is not the commit they name."""
    from benchmarks._meta import dirty_paths

    assert dirty_paths(" M benchmarks/results/compression.json\nM  benchmarks/results/growth-nets/a.pt\n") == []
    assert dirty_paths(" M benchmarks/results/growth.md\n M gpp_ext/loop.py\n") == ["gpp_ext/loop.py"]
    assert dirty_paths('R  old.py -> benchmarks/results/new.json\nR  benchmarks/results/x -> "a b.py"\n') == ["a b.py"]
    assert dirty_paths("") == []


@pytest.mark.parametrize("argv, message", [
    (["--methods", "magic"], "unknown"),
    (["--budgets", "1.5"], "fraction"),
    (["--models", "alexnet"], "lenet5"),
])
def test_bad_arguments_name_the_option(harness, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        smoke(harness, tmp_path, *argv)
    assert message in capsys.readouterr().err


def test_a_trial_already_measured_under_another_name_is_reused_not_rerun(harness, tmp_path, monkeypatch):
    # the ablation cell "fisher x fade x onecycle" is the candidate `gpp-fade-taylor`'s run (the default's)
    monkeypatch.setitem(harness.MODES, "smoke", {**harness.MODES["smoke"], "candidates": ("gpp-fade-taylor",),
                                                 "ablation": (("fisher", "fade", "onecycle"),)})
    measured = []
    real = harness.protocol.measure

    def counting(method, *args, **kwargs):
        if kwargs.get("keep") is False:  # the validation trials
            measured.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(harness.protocol, "measure", counting)
    code, _ = smoke(harness, tmp_path, "--methods", "gpp")
    assert code == 0
    assert measured == ["gpp"]
    trials = json.loads((tmp_path / "compression-choices.json").read_text())
    candidate, cell = trials
    assert cell["same_as"] == "gpp recipe: gpp-fade-taylor" and cell["val_accuracy"] == candidate["val_accuracy"]
    # resumed: nothing is measured again
    measured.clear()
    assert smoke(harness, tmp_path, "--methods", "gpp", "--resume")[0] == 0
    assert measured == []


def test_a_record_made_before_a_loop_setting_existed_still_matches(harness):
    current = harness.protocol.config_of({})
    older = {k: v for k, v in current.items() if k not in ("target_latency", "final_finetune")}
    assert harness.protocol.same_config(older, current)
    assert not harness.protocol.same_config({**older, "push": "none"}, current)
    assert not harness.protocol.same_config(older, harness.protocol.config_of({"final_finetune": "train+val"}))
    # a push setting the record's push never read does not count
    cut = harness.protocol.config_of(harness.choosing.CANDIDATES["gpp-cut"])
    assert harness.protocol.same_config({**cut, "fade_end": 1.0, "alpha": 0.3}, cut)


def test_a_push_that_decides_the_keep_set_is_not_redone_for_selection_settings_it_never_reads(harness):
    """Group Fisher's push removes channels itself, so a record made under the plain solver's default widths is
    current under the Fisher-weighted default; hgs selects at the default's widths, so its record is not."""
    from gpp_ext import recipes

    fisher = harness.protocol.config_of(dict(recipes.RECIPES["group-fisher"]))
    assert harness.protocol.same_config({**fisher, "allocation": "solver", "criterion": "l1"}, fisher)
    assert not harness.protocol.same_config({**fisher, "floor": 0.0}, fisher)  # its removal keeps the floor
    hgs = harness.protocol.config_of(dict(recipes.RECIPES["hgs"]))
    assert not harness.protocol.same_config({**hgs, "allocation": "solver"}, hgs)


def test_candidates_that_differ_only_in_the_push_share_are_two_loops(harness):
    """The harness always runs the loop with an epoch budget, so a trial's configuration must keep push_share
    (a candidate with a shorter push once passed for the default and reused its figures)."""
    fade = harness.protocol.config_of(harness.choosing.CANDIDATES["gpp-fade"])
    short = harness.protocol.config_of(harness.choosing.CANDIDATES["gpp-fade-short"])
    assert not harness.protocol.same_config(fade, short)
    # the default is gpp-fade-taylor: the short fade at the Fisher-weighted solver's widths, Taylor importance
    # choosing the set; gpp-fade-fisher, the same with the discriminant criterion, is another loop
    default = harness.protocol.config_of({})
    assert harness.protocol.same_config(harness.protocol.config_of(harness.choosing.CANDIDATES["gpp-fade-taylor"]),
                                        default)
    assert not harness.protocol.same_config(short, default)
    assert not harness.protocol.same_config(
        harness.protocol.config_of(harness.choosing.CANDIDATES["gpp-fade-fisher"]), default)


def test_a_loop_row_matches_the_loop_its_cell_runs(harness):
    """A loop row records the configuration it ran (its budget, epochs, seed): on resume it is current, not
    redone; another recipe makes it stale."""
    setup = harness.methods.Setup(None, 0.1, "params", 1, 3.0, 1.0)
    ran = {k: v for k, v in dataclasses.asdict(harness.methods.loop_config(setup, {})).items() if k != "ignore"}
    record = {"method": "gpp", "budget": 0.1, "budget_kind": "params", "epochs": 3.0, "seed": 1, "knobs": {},
              "train": harness.protocol.train_recipe(), "config": ran, "widths": {"fc": [8, 4]}}
    assert not harness.runner._stale(record, {})
    assert harness.runner._stale({**record, "config": {**ran, "push": "none"}}, {})
    assert harness.runner._stale({**record, "method": "gpp-nopush"}, {})


def test_a_one_shot_criterion_cut_at_another_defaults_widths_is_redone(harness):
    """A one-shot criterion is cut at the default recipe's widths: its record carries that rule, and a record made
    under another default (or before records carried it, under the plain solver) is redone on resume."""
    rule = harness.methods.widths_rule("l1")
    assert rule == {"allocation": "fisher", "normalize": "mean", "floor": 0.05, "round_to": 1}
    assert harness.methods.widths_rule("group_fisher") is None and harness.methods.widths_rule("slimming") is None
    record = {"method": "l1", "budget": 0.1, "budget_kind": "params", "epochs": 3.0, "seed": 1, "knobs": {},
              "train": harness.protocol.train_recipe(), "widths_rule": rule, "widths": None}
    assert not harness.runner._stale(record, {})
    assert harness.runner._stale({k: v for k, v in record.items() if k != "widths_rule"}, {})
    assert harness.runner._stale({**record, "widths_rule": {**rule, "allocation": "solver"}}, {})


def test_a_record_made_before_records_carried_widths_is_redone(harness):
    """The latency pass rebuilds a compact model that was not kept from its record's widths: a record without the
    key (made before records carried it) is redone on resume; one that recorded None (blocks removed) stands."""
    record = {"method": "slimming", "budget": 0.1, "budget_kind": "params", "epochs": 3.0, "seed": 1, "knobs": {},
              "train": harness.protocol.train_recipe(), "widths": None}
    assert not harness.runner._stale(record, {})
    assert not harness.runner._stale({**record, "widths": {"fc": [8, 4]}}, {})
    assert harness.runner._stale({k: v for k, v in record.items() if k != "widths"}, {})


def test_a_setting_that_missed_its_size_target_is_not_chosen(harness):
    entries = [{"setting": "gpp", "val_accuracy": 0.90, "target_reached": True},
               {"setting": "gpp-x2", "val_accuracy": 0.95, "target_reached": False},
               {"setting": "gpp", "val_accuracy": 0.80, "target_reached": True},
               {"setting": "gpp-x2", "val_accuracy": 0.85, "target_reached": True}]
    best, means = harness.choosing.best_by_mean(entries)
    assert best == "gpp" and means["gpp-x2"] > means["gpp"]
    assert harness.choosing.missed_target(entries) == {"gpp-x2"}
    assert harness.choosing.best_by_mean([{"setting": "reg=1", "val_accuracy": 0.5}])[0] == "reg=1"


def test_the_distillation_study_picks_its_rows_after_the_plain_ones_and_renders_them(harness):
    methods, runner = harness.methods, harness.runner
    assert methods.kd_variant("l1+kd") == ("l1", True) and methods.kd_variant("genetic-nokd") == ("genetic", False)
    assert methods.loop_overrides("gpp+kd")["finetune_distill"] == 0.5
    assert methods.loop_overrides("genetic-nokd")["finetune_distill"] == 0.0 and methods.loop_overrides("l1+kd") is None
    assert methods.sweep_key("torch_pruning:group_norm_sl:global+kd") == "torch_pruning:group_norm_sl:global"
    assert methods.sweep_key("torch_pruning:group_norm_sl:local") == "torch_pruning:group_norm_sl:local"

    class Args:
        kd, seeds = ("lenet5", "params", 0.1), [0, 1]

    def rec(method, seed, val, test=0.8):
        return {"model": "lenet5", "budget_kind": "params", "budget": 0.1, "method": method, "seed": seed,
                "val_accuracy": val, "test_accuracy": test}

    records = [rec(m, s, v) for m, v in (("gpp", 0.9), ("genetic", 0.95), ("l1", 0.85), ("taylor", 0.88))
               for s in (0, 1)]
    assert runner.kd_cells(Args, "vgg", records, True) == []
    assert runner.kd_cells(Args, "lenet5", records[:-1], True) and \
        {c[3] for c in runner.kd_cells(Args, "lenet5", records[:-1], True)} == {"gpp+kd", "genetic-nokd", "l1+kd"}
    cells = runner.kd_cells(Args, "lenet5", records, True)  # taylor complete now: the best peer by validation
    assert {c[3] for c in cells} == {"gpp+kd", "genetic-nokd", "taylor+kd"} and {c[0] for c in cells} == {0, 1}
    assert runner.kd_cells(Args, "lenet5", [r for r in records if r["method"] != "genetic"], True) == []
    kd = [rec("taylor+kd", s, 0.9, 0.85) for s in (0, 1)]
    lines = harness.render._distillation(records, kd)
    assert "| lenet5 | 10% | taylor | 0.8000 ± 0.0000 | 0.8500 ± 0.0000 | +0.0500 |" in lines


def test_the_speed_table_sets_gpp_against_the_most_accurate_peer(harness):
    render = harness.render

    def rec(method, acc, b1, b64, met=True):   # speed-ups over a base of 1 ms
        return {"model": "vgg", "budget_kind": "params", "budget": 0.1, "method": method, "seed": 0,
                "test_accuracy": acc, "met_budget": met,
                "latency": {"eager": {"speedup_b1": b1, "speedup_b64": b64, "b1_ms": 1 / b1, "b64_ms": 1 / b64},
                            "machine": "m", "commit": "c"}}

    records = [rec("gpp", 0.90, 2.0, 3.0), rec("l1", 0.91, 1.0, 4.0), rec("random", 0.80, 9.0, 9.0),
               rec("taylor", 0.95, 5.0, 5.0, met=False)]   # a peer that missed the budget is no rival
    lines = render._speed(records)
    duel = lines[lines.index("| model | budget | best peer | eager b1 | eager b64 |") + 2:]
    assert duel == ["| vgg | 10% | l1 | 2.00 | 0.75 |"]
    # a peer still missing a seed of the cell is no rival yet either, as in "who wins"
    records += [rec("gpp", 0.90, 2.0, 3.0) | {"seed": 1}, rec("l1", 0.91, 1.0, 4.0) | {"seed": 1},
                rec("random", 0.80, 9.0, 9.0) | {"seed": 1}, rec("genetic", 0.99, 1.0, 1.0)]
    lines = render._speed(records)
    assert lines[lines.index("| model | budget | best peer | eager b1 | eager b64 |") + 2:] == \
        ["| vgg | 10% | l1 | 2.00 (2.00–2.00) | 0.75 (0.75–0.75) |"]


def test_the_speed_duel_pairs_the_models_of_the_same_seed(harness):
    """GPP ~10% faster than the peer in seed 0 and 10% slower in seed 1, where both models are slower: paired by
    seed, the median is parity and the bracket shows both seeds; a ratio of medians over seeds would set one
    seed's model against another's (1.02 from the median speed-ups here)."""
    def rec(method, seed, ms):
        return {"model": "vgg", "budget_kind": "params", "budget": 0.1, "method": method, "seed": seed,
                "test_accuracy": 0.9 if method == "gpp" else 0.91, "met_budget": True,
                "latency": {"eager": {"speedup_b1": 1 / ms, "speedup_b64": 1 / ms, "b1_ms": ms, "b64_ms": ms},
                            "machine": "m", "commit": "c"}}

    records = [rec("gpp", 0, 1.0), rec("l1", 0, 1.1), rec("gpp", 1, 2.0), rec("l1", 1, 1.8)]
    lines = harness.render._speed(records)
    assert lines[-1] == "| vgg | 10% | l1 | 1.00 (0.90–1.10) | 1.00 (0.90–1.10) |"


def test_who_wins_pairs_gpp_with_the_best_peer_seed_by_seed(harness):
    """The per-seed differences: their spread and how many seeds GPP was ahead in, over the seeds both ran."""
    paired = harness.render._paired
    mine = [{"seed": 0, "test_accuracy": 0.90}, {"seed": 1, "test_accuracy": 0.92}, {"seed": 2, "test_accuracy": 0.91}]
    theirs = [{"seed": 0, "test_accuracy": 0.91}, {"seed": 1, "test_accuracy": 0.90}]
    assert paired(mine, theirs) == "± 0.0212, 1 of 2"    # differences -0.01 and +0.02
    assert paired(mine[:1], theirs) == "0 of 1"
    assert paired(mine, [{"seed": 5, "test_accuracy": 0.5}]) == "–"


def test_the_runner_says_how_many_cells_are_left_and_about_how_long(harness):
    cells = [(0, "params", 0.1, "gpp"), (0, "params", 0.1, "l1"), (1, "params", 0.1, "gpp"), (1, "params", 0.1, "new")]
    done = {("vgg", 0, "params", 0.1, "gpp")}
    records = [{"model": "vgg", "method": "gpp", "seconds": 3600.0}, {"model": "lenet5", "method": "l1", "seconds": 1}]
    choices = [{"model": "vgg", "method": "l1", "seconds": 1800.0}]
    # gpp 1 h, l1 0.5 h (its trials), the new method the median of every run on the model (0.75 h)
    assert harness.runner._left("vgg", cells, done, records, choices) == \
        "vgg: 3 of 4 cells to run, about 2.2 h at the medians of its recorded runs"
    assert harness.runner._left("vgg", cells[:1], done, records, choices) == "vgg: every cell recorded"
    assert harness.runner._left("resnet20", cells, set(), records, choices) == "resnet20: 4 of 4 cells to run"


class _SweepTrials:
    """A stand-in for `choices.Trials`: validation accuracy a function of the strength, every run recorded."""

    def __init__(self, accuracy, method="hgs", steps_gain=0.0, share_gain=0.0):
        self.args = types.SimpleNamespace(available={method}, methods_of={"m": [method]})
        self.accuracy, self.ran, self.optimizers, self.marked = accuracy, [], [], None
        self.steps, self.steps_gain, self.shares, self.share_gain = [], steps_gain, [], share_gain

    def run(self, what, setting, method, knobs, place, context):
        self.ran.append(knobs.get("reg"))
        self.optimizers.append(knobs.get("prep_optimizer"))
        self.steps.append(knobs.get("tp_steps", 1))
        reg = knobs.get("reg", 1e-4)
        accuracy = self.accuracy(reg) if knobs.get("prep_optimizer") in (None, "adamw") else \
            self.accuracy(reg * 100) + 0.01   # under SGD: best 100x lower, and better
        accuracy += self.steps_gain if knobs.get("tp_steps", 1) > 1 else 0.0
        self.shares.append(knobs.get("push_share"))
        accuracy += self.share_gain if "push_share" in knobs else 0.0
        return {"setting": setting, "val_accuracy": accuracy, "target_reached": True}

    def mark(self, what, model, setting, places=None):
        self.marked = setting


def test_a_sweep_whose_best_strength_is_at_an_end_of_its_grid_goes_past_it(harness, monkeypatch):
    import math

    choosing = harness.choosing
    # first a family with one optimiser (the grid's own extension), then one that sweeps two
    monkeypatch.setattr(choosing.methods, "PREP_OPTIMIZER_FAMILIES", ())
    budgets = [("params", 0.1), ("params", 0.02)]

    def peaked(at):
        return lambda reg: 0.9 - abs(math.log10(reg) - math.log10(at)) / 100

    # the best past the top of 1e-5..1e-3: 1e-2 is tried, then 1e-1 (worse), and 1e-2 is chosen
    t = _SweepTrials(peaked(1e-2))
    assert choosing.sweep_regs(t, "m", budgets, 0, None) == {"hgs": {"reg": 1e-2}}
    assert sorted(set(t.ran)) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1]) and t.marked == "reg=0.01"
    # every strength at every choice budget, once, then the shorter preparation at the best strength (no
    # better here: not chosen)
    assert len(t.ran) == 6 * len(budgets)
    assert [(r, sh) for r, sh in zip(t.ran, t.shares) if sh is not None] == [(1e-2, 0.15)] * len(budgets)
    t = _SweepTrials(peaked(1e-2), share_gain=0.01)
    assert choosing.sweep_regs(t, "m", budgets, 0, None) == {"hgs": {"reg": 1e-2, "push_share": 0.15}}
    assert t.marked == "reg=0.01, 0.15 preparing"
    # far past the top: at most EXTEND_STEPS steps, the best of what was tried
    t = _SweepTrials(peaked(1e3))
    assert choosing.sweep_regs(t, "m", budgets, 0, None)["hgs"]["reg"] == pytest.approx(0.1)
    assert len(set(t.ran)) == 3 + choosing.EXTEND_STEPS
    # past the bottom, a grid step down
    t = _SweepTrials(peaked(1e-6))
    assert choosing.sweep_regs(t, "m", budgets, 0, None)["hgs"]["reg"] == pytest.approx(1e-6)
    # inside the grid: nothing more is tried; a smaller mode's own strengths are never extended
    t = _SweepTrials(peaked(1e-4))
    choosing.sweep_regs(t, "m", budgets, 0, None)
    assert sorted(set(t.ran)) == [1e-5, 1e-4, 1e-3]
    t = _SweepTrials(peaked(1e-2), share_gain=0.01)
    assert choosing.sweep_regs(t, "m", budgets, 0, None, values=(1e-4,))["hgs"] == {"reg": 1e-4}
    assert set(t.ran) == {1e-4} and set(t.shares) == {None}
    assert choosing.beyond([3e-3, 1e-2, 3e-2], 1e-2) is None
    assert choosing.beyond([3e-3, 1e-2, 3e-2], 3e-2) == pytest.approx(9e-2)
    # a sparse-training peer: its strengths swept under each optimiser of its preparation, each grid extended on
    # its own, and the best of all chosen with its optimiser
    # (a Torch-Pruning method, which then tries its cut progressively at the chosen strength: worse here)
    sparse = "torch_pruning:group_norm_sl:global"
    monkeypatch.setattr(choosing.methods, "PREP_OPTIMIZER_FAMILIES", (sparse,))
    t = _SweepTrials(peaked(1e-4), method=sparse, steps_gain=-0.01)
    chosen = choosing.sweep_regs(t, "m", budgets, 0, None)[sparse]
    assert chosen == {"reg": pytest.approx(1e-6), "prep_optimizer": "sgd"} and t.marked == "reg=1e-06 sgd"
    assert set(t.optimizers) == {"adamw", "sgd"}
    tried = set(zip(t.ran, t.optimizers, t.steps))
    assert sorted(r for r, o, _ in tried if o == "adamw") == [1e-5, 1e-4, 1e-3]
    assert sorted(r for r, o, s in tried if o == "sgd" and s == 1) == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    assert [(r, s) for r, _, s in tried if s > 1] == [(pytest.approx(1e-6), choosing.methods.TP_STEPS)]
    assert sorted({r for r, sh in zip(t.ran, t.shares) if sh is not None}) == pytest.approx([1e-6])
    # progressive steps better: chosen with the strength; a smaller mode never tries them
    t = _SweepTrials(peaked(1e-4), method=sparse, steps_gain=0.01)
    assert choosing.sweep_regs(t, "m", budgets, 0, None)[sparse] == {
        "reg": pytest.approx(1e-6), "prep_optimizer": "sgd", "tp_steps": choosing.methods.TP_STEPS}
    assert t.marked == f"reg=1e-06 sgd, {choosing.methods.TP_STEPS} steps"
    t = _SweepTrials(peaked(1e-4), method=sparse, steps_gain=0.01)
    assert "tp_steps" not in choosing.sweep_regs(t, "m", budgets, 0, None, values=(1e-4,))[sparse]
    # Torch-Pruning's magnitude pruning has no strength: its cut at once against progressively, nothing else
    magnitude = "torch_pruning:magnitude:global"
    for gain, expected in ((0.01, {"tp_steps": choosing.methods.TP_STEPS}), (-0.01, {})):
        t = _SweepTrials(peaked(1e-4), method=magnitude, steps_gain=gain)
        assert choosing.sweep_regs(t, "m", budgets, 0, None) == {magnitude: expected}
        assert t.steps == [1, 1, choosing.methods.TP_STEPS, choosing.methods.TP_STEPS] and set(t.ran) == {None}
    t = _SweepTrials(peaked(1e-4), method=magnitude)
    assert choosing.sweep_regs(t, "m", budgets, 0, None, values=(1e-4,)) == {} and t.ran == []


def test_the_peers_knobs_are_chosen_per_band_of_budgets_and_each_cell_takes_its_band_s(harness, monkeypatch):
    import math

    choosing, runner = harness.choosing, harness.runner
    monkeypatch.setattr(choosing.methods, "PREP_OPTIMIZER_FAMILIES", ())

    class Banded(_SweepTrials):   # the best strength 1e-3 at the hard budgets, 1e-5 at the mild ones
        def run(self, what, setting, method, knobs, place, context):
            self.places = getattr(self, "places", []) + [place[1:3]]
            at = 1e-5 if choosing.band(place[2]) == "mild" else 1e-3
            return {"setting": setting, "val_accuracy": 0.9 - abs(math.log10(knobs["reg"]) - math.log10(at)) / 100,
                    "target_reached": True}

    t = Banded(None)
    t.choices = [{"model": "m", "what": "hgs reg", "chosen": True},
                 {"model": "m", "what": "gpp recipe", "chosen": True}]
    chosen = choosing.sweep_bands(t, "m", [("params", 0.25), ("params", 0.1), ("flops", 0.05)], 0, None)
    # a trial at a budget no longer among the choice budgets is unflagged; GPP's recipe trials are not the peers'
    assert [e["chosen"] for e in t.choices] == [False, True]
    assert chosen == {"hard": {"hgs": {"reg": 1e-3}}, "mild": {"hgs": {"reg": 1e-5}}}
    assert set(t.places) == {("params", 0.25), ("params", 0.1), ("flops", 0.05)}
    # a cell takes its band's knobs: 50% and 25% the mild ones, 10% and below the hard ones
    assert [runner.knobs_for("hgs", chosen, b)["reg"] for b in (0.5, 0.25, 0.1, 0.02)] == [1e-5, 1e-5, 1e-3, 1e-3]
    assert runner.knobs_for("l1", chosen, 0.5) == {}   # no sweep, no knobs
    # a band without a choice budget takes the other band's
    t = Banded(None)
    t.choices = []
    hard_only = choosing.sweep_bands(t, "m", [("params", 0.1)], 0, None)
    assert set(hard_only) == {"hard"} and runner.knobs_for("hgs", hard_only, 0.5) == {"reg": 1e-3}


def test_a_trial_is_flagged_chosen_only_in_the_band_it_was_chosen_for(harness, tmp_path):
    trials = harness.choosing.Trials(None, [], lambda cs: None, None)
    trials.choices[:] = [{"what": "hgs reg", "model": "m", "setting": s, "budget_kind": "params", "budget": b}
                         for s in ("reg=1e-05", "reg=0.001") for b in (0.25, 0.1)]
    trials.mark("hgs reg", "m", "reg=0.001", places=[("params", 0.1)])
    trials.mark("hgs reg", "m", "reg=1e-05", places=[("params", 0.25)])
    assert {(e["setting"], e["budget"]) for e in trials.choices if e["chosen"]} == {("reg=0.001", 0.1),
                                                                                    ("reg=1e-05", 0.25)}


def test_a_method_missing_seeds_of_a_cell_is_marked_and_not_ranked(harness):
    def record(method, seed, acc):
        return {"method": method, "model": "lenet5", "dataset": "d", "budget_kind": "params", "budget": 0.1,
                "seed": seed, "test_accuracy": acc, "params": 10, "flops": 100, "acc_end_of_prep": None,
                "acc_after_cut": None, "acc_after_recal": None, "ft_curve": {}, "latency_ms_b1": 1.0,
                "latency_ms_b64": 2.0, "seconds": 1.0, "machine": "m", "torch": "t", "commit": "c",
                "base_test_accuracy": 0.9, "base_epochs": 1, "epochs": 3.0, "prep_epochs": 1.0, "met_budget": True}

    records = [record("gpp", 0, 0.80), record("gpp", 1, 0.82), record("l1", 0, 0.79), record("l1", 1, 0.83),
               record("taylor", 0, 0.95)]   # taylor has one seed of two: not ranked, however high
    out = harness.render._render(records, {"date": "x"}, [], [])
    assert "| lenet5 | 10% | gpp (0.8100) | 0.8100, 1 of 2 | l1 (0.8100) | +0.0000 | ± 0.0141, 1 of 2 |" in out
    assert "| lenet5 | 10% | taylor (seeds 0 so far) |" in out


def test_a_loop_peer_s_preparation_optimiser_is_its_push_optimiser(harness):
    methods = harness.methods
    sgd = methods.loop_settings("hgs", {"reg": 1e-4, "prep_optimizer": "sgd"})
    assert sgd["sparsity"] == 1e-4 and (sgd["push_optimizer"], sgd["push_lr"]) == ("sgd", 0.01)
    adamw = methods.loop_settings("hgs", {"reg": 1e-4, "prep_optimizer": "adamw"})
    assert "push_optimizer" not in adamw and adamw["sparsity"] == 1e-4
    assert methods.recipes.build("hgs", **{k: v for k, v in sgd.items()}).push_optimizer == "sgd"


@pytest.mark.parametrize("kind,budget", [("params", 0.3), ("flops", 0.3)])
def test_torch_pruning_cuts_at_once_or_progressively_to_the_budget(harness, kind, budget):
    pytest.importorskip("torch_pruning")
    methods = harness.methods
    from gpp_ext import data, models

    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    base = models.build("vgg", in_channels=splits.input_shape[0], num_classes=splits.num_classes)
    base.train()
    bns = [m for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:   # statistics a forward pass in training mode would move
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    first = next(m for m in base.modules() if isinstance(m, torch.nn.Conv2d))
    cuts = {}
    for steps in (1, methods.TP_STEPS):
        setup = methods.Setup(splits, budget, kind, 0, 1.0, 0.5, knobs={"tp_steps": steps})
        before, cut, used = methods._torch_pruning("torch_pruning:magnitude:global", base, setup)
        assert before is base and used == 0.0 and cut.training
        cost = setup.cost(cut)
        # at most the budget, and not far under it: the progressive cut overshoots by one of its small steps
        assert 0.9 * budget * setup.cost(base) <= cost <= budget * setup.cost(base)
        cuts[steps] = [m.out_channels for m in cut.modules() if isinstance(m, torch.nn.Conv2d)]
        # the kept channels' BatchNorm statistics are the base's (the pruner's tracing forward runs in eval mode)
        kept = [next(i for i, w in enumerate(first.weight) if torch.equal(w, v))
                for v in next(m for m in cut.modules() if isinstance(m, torch.nn.Conv2d)).weight]
        bn = next(m for m in cut.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert torch.equal(bn.running_mean, bns[0].running_mean[kept]) and \
            torch.equal(bn.running_var, bns[0].running_var[kept])
        assert cut(torch.zeros(2, *splits.input_shape)).shape == (2, splits.num_classes)
    # the base is untouched, BatchNorm statistics included
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    assert cuts[1] != cuts[methods.TP_STEPS]   # the importance computed again between small steps: other widths


def test_a_shorter_preparation_is_a_knob_its_cache_key_and_its_epochs_follow(harness):
    methods = harness.methods
    plain = methods.Setup(None, 0.1, "params", 0, 3.0, 1.0, knobs={"reg": 1e-4})
    short = methods.Setup(None, 0.1, "params", 0, 3.0, 1.0, knobs={"reg": 1e-4, "push_share": 0.15})
    assert plain.prep == 1.0 and short.prep == pytest.approx(0.45)
    assert methods.Setup(None, 0.1, "params", 0, 3.0, 1.0, knobs={"push_share": 0.9}).prep == 1.0  # at most
    keys = {methods.prep_key(m, s) for m in ("torch_pruning:group_norm_sl:global", "torch_pruning:group_norm_sl:local")
            for s in (plain, short)}
    assert len(keys) == 2   # the scopes share a preparation; the shorter one is another
    # the loop's peers read the same knob as the loop's own push share
    assert methods.loop_settings("hgs", short.knobs)["push_share"] == 0.15


@pytest.mark.parametrize("method", ["slimming", "torch_pruning:group_norm_sl:global"])
def test_a_shorter_preparation_trains_that_long_and_leaves_the_rest_to_the_fine_tune(harness, monkeypatch, method):
    if method.startswith("torch_pruning"):
        pytest.importorskip("torch_pruning")
    methods = harness.methods
    from gpp_ext import data, models

    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    base = models.build("vgg", in_channels=splits.input_shape[0], num_classes=splits.num_classes)
    trained = []

    def fit(model, dataset, epochs, **kwargs):   # the preparation's training, recorded instead of run
        trained.append(epochs)
        return model

    monkeypatch.setattr(methods, "fit", fit)
    setup = methods.Setup(splits, 0.3, "params", 0, 3.0, 1.0, knobs={"reg": 1e-4, "push_share": 0.15})
    _, cut, used = methods.run(method, base, setup)
    assert trained == [pytest.approx(0.45)] and used == pytest.approx(0.45)
    assert setup.cost(cut) <= 0.3 * setup.cost(base) * harness.protocol.BUDGET_SLACK


def test_no_share_a_loop_method_sweeps_prepares_longer_than_the_protocol_allows(harness):
    """Every method may spend at most `prep_epochs` of its `epochs` before its cut; the loop methods read a swept
    `push_share` as that share, and Group Fisher's 0.5 (1.5 of 3 epochs) broke the cap."""
    from benchmarks.compression import methods, protocol

    for mode in protocol.MODES.values():
        cap = mode["prep_epochs"] / mode["epochs"]
        for method, knob in methods.SWEEP_KNOBS.items():
            if knob == "push_share":
                assert max(methods.SWEEPS[method]) <= cap + 1e-12, (method, methods.SWEEPS[method], cap)
