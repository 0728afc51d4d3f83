"""The growth benchmark's harness, in a mode smaller than --smoke (digits, one seed, an epoch or two): every net
met while growing is recorded with its epochs, the largest is pruned and grown-and-pruned to the smaller kept
sizes at equal epochs, ResNets are matched in size, and a resumed run measures nothing again."""

import importlib
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _harness():
    """The growth benchmark's parts as one namespace: `main` from the command line, the rest from the runner
    (where a test patches `grow`, `fit` or `MODES`, the runner's names are the ones the runs use)."""
    import types

    runner = importlib.import_module("benchmarks.growth.runner")
    cli = importlib.import_module("benchmarks.growth.__main__")
    return types.SimpleNamespace(runner=runner, main=cli.main, MODES=runner.MODES, Runs=runner.Runs)


def _forget():
    for name in [n for n in sys.modules if n == "benchmarks.growth" or n.startswith("benchmarks.growth.")]:
        sys.modules.pop(name)


def test_growth_harness_records_every_comparison_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    growth = _harness()
    monkeypatch.setitem(growth.MODES, "smoke", dict(growth.MODES["smoke"], base_epochs=1, grow_epochs=1,
                                                    prune_epochs=0.5, max_modules_per_stage=2))
    out = tmp_path / "growth.json"
    assert growth.main(["--smoke", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    grown = [r for r in records if r["key"][1] == "grown"]
    assert grown[0]["kept"] and grown[0]["epochs"] == 1 and all(r["kept"] is not None for r in grown)
    assert all(r["epochs"] > 1 for r in grown[1:])  # a grown candidate has seen its parent's epochs and more
    largest = next(r for r in records if r["key"][1] == "grown-largest")
    kept = [r for r in grown if r["kept"]]
    for r in kept:
        for depth in ("resnet8", "resnet14", "resnet20"):
            resnet = next(x for x in records if x["key"] == [0, depth, r["key"][2]])
            assert abs(resnet["params"] - r["params"]) <= 0.05 * r["params"] and resnet["epochs"] == r["epochs"]
        if r["params"] < largest["params"]:
            pruned = next(x for x in records if x["key"] == [0, "pruned", r["key"][2]])
            gap = next(x for x in records if x["key"] == [0, "gap", r["key"][2]])
            scratch = next(x for x in records if x["key"] == [0, "scratch", r["key"][2]])
            assert pruned["epochs"] == gap["epochs"] == scratch["epochs"] == largest["epochs"] + 0.5  # equal training
            assert pruned["params"] <= 1.02 * r["params"] and gap["params"] <= 1.02 * r["params"]
            assert scratch["params"] == r["params"]   # the grown net's own architecture, trained from scratch
            assert pruned["recipe"] == growth.runner.default_recipe()
    assert largest["refused_epochs"] == sum(1 for r in grown[1:] if not r["kept"])  # grow_epochs 1 each
    order = [r["key"][1] for r in records]   # recorded as run: the claims, then the control, then the rest
    assert max(i for i, k in enumerate(order) if k == "pruned" or k in growth.runner.RESNET_DEPTHS) < \
        min(i for i, k in enumerate(order) if k == "scratch")
    assert max(i for i, k in enumerate(order) if k == "scratch") < \
        min(i for i, k in enumerate(order) if k in ("gap", "grown-triage"))
    triaged = next(r for r in records if r["key"] == [0, "grown-triage"])
    assert sorted(triaged["order"]) == list(range(len(triaged["order"]))) and triaged["triage"]
    assert triaged["met"][0]["test_accuracy"] == grown[0]["test_accuracy"]  # the same trained net, another order
    assert all(r["commit"] and r["machine"] for r in records)
    timed = [r for r in records if "seconds" in r]   # every step's wall time, and its CPU time beside it
    assert len(timed) >= 4 and all(0 < r["cpu_seconds"] <= r["seconds"] * torch.get_num_threads() + 1 for r in timed)
    md = (tmp_path / "growth.md").read_text()
    assert "## The answers" in md and (tmp_path / "growth.png").stat().st_size > 0
    for r in kept:  # every kept net has its row, and the questions count one pair per kept net with a rival
        assert f"| 0 | {r['key'][2]} | {r['modules']} | {r['epochs']:g} | {r['test_accuracy']:.4f} " in md
    assert f"| grown Inception net vs ResNet-8 | {len(kept)} |" in md
    (tmp_path / "growth.md").unlink()
    assert growth.main(["--out", str(out), "--render"]) == 0   # the tables and plot from the records alone
    assert (tmp_path / "growth.md").read_text() == md
    capsys.readouterr()
    assert growth.main(["--smoke", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "seed 0" not in said  # nothing measured again
    assert f"resuming with {len(records)} run(s) recorded" in said
    assert json.loads(out.read_text()) == records
    # a checkout without the largest net's file: the seeded growth is run again, meets the recorded nets, and
    # every record stands
    (tmp_path / "growth-nets" / "largest-seed0.pt").unlink()
    assert growth.main(["--smoke", "--out", str(out), "--resume"]) == 0
    assert f"met the {len(grown)} recorded nets again" in capsys.readouterr().out
    assert json.loads(out.read_text()) == records
    assert (tmp_path / "growth-nets" / "largest-seed0.pt").exists()
    # a growth that does not meet the records again (here they were altered): its nets are recorded anew, the
    # pushed-and-pruned nets and the triage order are redone, grow-and-prune from scratch and the ResNets stand
    altered = [dict(r, test_accuracy=0.0) if r["key"][1] == "grown" else r for r in records]
    out.write_text(json.dumps(altered))
    (tmp_path / "growth-nets" / "largest-seed0.pt").unlink()
    assert growth.main(["--smoke", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "did not meet the recorded nets again" in said and "pruned to net" in said and "triage order" in said
    assert "grow-and-prune to net" not in said and "resnet" not in said and "architecture from scratch" not in said
    again = {tuple(r["key"]): r for r in json.loads(out.read_text())}
    assert again.keys() == {tuple(r["key"]) for r in records}
    for r in records:
        if r["key"][1] in ("base", "gap", "scratch", *growth.runner.RESNET_DEPTHS):
            assert again[tuple(r["key"])] == r
        if r["key"][1] == "grown":
            assert again[tuple(r["key"])]["test_accuracy"] == r["test_accuracy"]
    # a pushed-and-pruned net made by another default recipe is redone; nothing else is. The first redo is
    # stopped in its first cut (as `kill` stops a background run): its loop's folder and mark stay in the cache,
    # and the next resume goes on after the last completed stage (the push is not run again), to the result of
    # an uninterrupted run
    import gpp_ext.loop

    records = json.loads(out.read_text())
    pruned = {tuple(r["key"]): r for r in records if r["key"][1] == "pruned"}
    out.write_text(json.dumps([dict(r, recipe={"push": "v0"}) if r["key"][1] == "pruned" else r for r in records]))
    cut, pushes = gpp_ext.loop.prune_stage, []

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpp_ext.loop, "prune_stage", stopped)
    assert growth.main(["--smoke", "--out", str(out), "--resume"]) == 0
    first = min(pruned)[2]
    folder = tmp_path / "growth-nets" / f"pruned-{first}-seed0"
    mark = json.loads((tmp_path / "growth-nets" / f"pruned-{first}-seed0.json").read_text())
    assert (folder / "checkpoint.pt").exists() and mark["state"]["seconds"] > 0
    monkeypatch.setattr(gpp_ext.loop, "prune_stage", cut)
    push = gpp_ext.loop.push_stage
    monkeypatch.setattr(gpp_ext.loop, "push_stage", lambda *a, **k: pushes.append(1) or push(*a, **k))
    capsys.readouterr()
    assert growth.main(["--smoke", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "pruned to net" in said and "resnet" not in said and "grow-and-prune" not in said
    assert len(pushes) == len(pruned) - 1   # the interrupted net's push was done already
    assert not folder.exists() and not list((tmp_path / "growth-nets").glob("pruned-*"))
    redone = {tuple(r["key"]): r for r in json.loads(out.read_text()) if r["key"][1] == "pruned"}
    assert all(r["recipe"] == growth.runner.default_recipe() for r in redone.values())
    assert {k: (r["params"], r["test_accuracy"]) for k, r in redone.items()} == \
        {k: (r["params"], r["test_accuracy"]) for k, r in pruned.items()}
    assert redone[min(pruned)]["seconds"] > mark["state"]["seconds"]   # the interrupted attempt's time counts
    # results made with other settings are not dropped by a resume: it stops and says so, the file untouched
    text = out.read_text()
    out.write_text(json.dumps([dict(r, settings={"other": 1}) if r["key"][1] == "base" else r
                               for r in json.loads(text)]))
    kept = out.read_text()
    with pytest.raises(SystemExit, match="1 of the .* runs .* were made with other settings"):
        growth.main(["--smoke", "--out", str(out), "--resume"])
    assert out.read_text() == kept
    _forget()


def test_the_claims_runs_of_every_seed_come_first(tmp_path, monkeypatch):
    """Passes over the seeds: the runs that answer the paper's claims for every seed, then the control that puts
    the second claim at equal epochs, then the rest."""
    monkeypatch.syspath_prepend(str(ROOT))
    growth = _harness()
    cli = sys.modules["benchmarks.growth.__main__"]
    calls = []
    monkeypatch.setattr(cli, "run_seed", lambda seed, mode, runs, log, part: calls.append((part, seed)))
    monkeypatch.setattr(cli, "render", lambda records, stem: None)
    assert growth.main(["--smoke", "--seeds", "0,1,2", "--out", str(tmp_path / "growth.json")]) == 0
    assert calls == [(part, seed) for part in ("claims", "controls", "further") for seed in (0, 1, 2)]
    _forget()


def test_a_run_redone_replaces_its_record(tmp_path, monkeypatch):
    """A run redone (its cached model gone, as in a fresh checkout) replaces its record instead of adding a
    second one under the same key."""
    monkeypatch.syspath_prepend(str(ROOT))
    growth = _harness()
    runs = growth.Runs(str(tmp_path / "g.json"), {"a": 1}, resume=False)
    runs.add((0, "base"), {"test_accuracy": 0.5})
    runs.add((0, "base"), {"test_accuracy": 0.6})
    assert [r["test_accuracy"] for r in runs.records] == [0.6]
    assert json.loads((tmp_path / "g.json").read_text())[0]["test_accuracy"] == 0.6
    _forget()


def test_records_name_the_commit_the_run_started_from(tmp_path, monkeypatch):
    """A run of days imported its code at the start: a commit made meanwhile must not relabel its later records."""
    monkeypatch.syspath_prepend(str(ROOT))
    growth = _harness()
    monkeypatch.setattr(growth.runner, "git_commit", lambda: "aaaaaaa")
    runs = growth.Runs(str(tmp_path / "g.json"), {"a": 1}, resume=False)
    monkeypatch.setattr(growth.runner, "git_commit", lambda: "bbbbbbb")
    runs.add((0, "base"), {"test_accuracy": 0.5})
    assert runs.records[0]["commit"] == "aaaaaaa"
    _forget()


def test_an_interrupted_growth_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """Growth is the benchmark's longest step (an hour a seed): killed half-way, `--resume` goes on from the net
    and history saved after its last attempt, trains only the attempts after it, and records the growth whole."""
    monkeypatch.syspath_prepend(str(ROOT))
    growth = _harness()
    monkeypatch.setitem(growth.MODES, "smoke", dict(growth.MODES["smoke"], base_epochs=1, grow_epochs=0.5,
                                                    prune_epochs=0.5, max_modules_per_stage=2))
    real_grow, trained = growth.runner.grow, {}

    def interrupted(model, train, evaluate, *args, after_step=None, **kwargs):
        resumed, order = kwargs.get("history") is not None, kwargs.get("order")

        def counted(m):
            trained.setdefault((resumed, order is None), []).append(sum(len(s) for s in m.stages))
            return train(m)

        def step(m, history):
            after_step(m, history)
            if len(history) == 2 and not resumed and order is None:
                raise KeyboardInterrupt   # killed right after the first attempt was saved
        return real_grow(model, counted, evaluate, *args, after_step=step, **kwargs)

    monkeypatch.setattr(growth.runner, "grow", interrupted)
    out = tmp_path / "growth.json"
    assert growth.main(["--smoke", "--out", str(out), "--seeds", "0"]) == 0
    assert not any(r["key"][1] == "grown" for r in json.loads(out.read_text()))   # the growth was not recorded
    assert list((tmp_path / "growth-nets").glob("growing-seed0*"))           # but its checkpoint was kept
    assert trained == {(False, True): [3]}                                       # one attempt, then the kill
    capsys.readouterr()
    assert growth.main(["--smoke", "--out", str(out), "--seeds", "0", "--resume"]) == 0
    assert "growth resumed after 2 nets" in capsys.readouterr().out
    grown = [r for r in json.loads(out.read_text()) if r["key"][1] == "grown"]
    assert [r["key"][2] for r in grown] == list(range(len(grown))) and grown[0]["kept"] and grown[0]["stage"] == -1
    assert len(trained[(True, True)]) == len(grown) - 2   # only the attempts after the kill were trained
    left = sorted(p.name for p in (tmp_path / "growth-nets").iterdir())
    assert left == ["base-seed0.pt", "largest-seed0.pt"]   # done: the checkpoints (and the triage's) are gone
    _forget()


def test_a_pushed_and_pruned_record_from_before_a_loop_field_existed_still_stands():
    from benchmarks.growth.runner import default_recipe, same_recipe

    now = default_recipe()
    assert same_recipe(now)
    # made before push_optimizer and push_lr existed (they default to what runs used before them): it stands
    older = {k: v for k, v in now.items() if k not in ("push_optimizer", "push_lr")}
    assert same_recipe(older)
    # another pruning algorithm version, a setting the run reads, or no recipe at all: redone
    assert not same_recipe({**older, "algorithms": now["algorithms"] - 1})
    assert not same_recipe({**now, "lr": now["lr"] * 2})
    assert not same_recipe({k: v for k, v in now.items() if k != "algorithms"})
    assert not same_recipe(None)
    _forget()


def test_a_pruned_net_that_missed_its_size_is_no_pair_at_equal_size():
    from benchmarks.growth.render import _pairs

    records = [{"key": [0, "grown", n], "kept": True, "test_accuracy": 0.90} for n in (0, 1)]
    records += [{"key": [0, "pruned", 0], "test_accuracy": 0.92, "target_reached": True},
                {"key": [0, "pruned", 1], "test_accuracy": 0.95, "target_reached": False},
                {"key": [1, "grown", 0], "kept": True, "test_accuracy": 0.90},
                {"key": [1, "pruned", 0], "test_accuracy": 0.91}]   # recorded before the flag: taken as met
    pairs = _pairs(records, "pruned", "grown")
    assert [(s, n) for s, n, _ in pairs] == [(0, 0), (1, 0)] and pairs[0][2] == pytest.approx(0.02)
