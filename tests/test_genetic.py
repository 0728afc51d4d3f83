"""The genetic width search (allocation="genetic"): every individual meets the budget, it is seeded, it scores
with the calibrated search's evaluator and never ends worse than the solver's widths it starts from, its
finalists are re-scored after a short fine-tune, and the recipe runs from the command line."""

import json
import subprocess
import sys

import pytest
import torch

from gpp_ext import data, models, prune, recipes
from gpp_ext.pruning import ChannelGraph, CostModel, allocate, criteria
from gpp_ext.pruning.allocation import evaluator_from
from gpp_ext.pruning.genetic import genetic_widths, sensitivity
from gpp_ext.training import fit


@pytest.fixture(scope="module")
def trained():
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = fit(models.build("vgg", in_channels=1, num_classes=10), splits.train, 2, lr=4e-3, seed=0).eval()
    loader = list(torch.utils.data.DataLoader(splits.train, batch_size=64))
    example = torch.zeros(2, 1, 8, 8)
    graph = ChannelGraph(model, example)
    scores = criteria.get("l1")(graph, None)
    evaluator = evaluator_from(model, example, scores, loader, batches=2, calibration=2)
    return model, graph, scores, evaluator, loader


def test_every_width_vector_meets_the_budget_and_the_search_is_seeded(trained):
    model, graph, scores, evaluator, _ = trained
    costs = CostModel(graph, "flops")
    calls = []

    def counting(widths):
        calls.append(dict(widths))
        return evaluator(widths)

    counting.finetuned = evaluator.finetuned
    widths, record = genetic_widths(graph, scores, 0.3, counting, "flops", population=6, generations=2, seed=4)
    limit = 0.3 * costs.cost({})
    searched = calls[len(graph.groups) + 1:]   # after the sensitivity pass
    assert searched and all(costs.cost(w) <= limit * (1 + 1e-9) for w in searched)
    assert costs.cost(widths) <= limit * (1 + 1e-9)
    assert set(record["sensitivity"]) == set(scores) and all(v >= 0 for v in record["sensitivity"].values())
    best = record["best_per_generation"]
    assert len(best) == 3 and best == sorted(best, reverse=True)  # elitism: never worse than a generation before
    solver = allocate(graph, scores, 0.3, "flops", "solver")
    assert best[-1] <= evaluator(solver) + 1e-12  # the solver's widths are in the first population
    again, _ = genetic_widths(graph, scores, 0.3, evaluator, "flops", population=6, generations=2, seed=4)
    assert again == widths
    assert len(record["finalists"]) >= 1 and record["evaluations"] > 0


def test_sensitivity_is_the_loss_rise_of_cutting_one_group(trained):
    model, graph, scores, evaluator, _ = trained
    grids = {g.name: list(range(1, g.size + 1)) for g in graph.groups}
    sens = sensitivity(graph, 0.25, evaluator, grids)
    full = {g.name: g.size for g in graph.groups}
    name = graph.groups[0].name
    expected = evaluator({**full, name: max(1, -(-graph.groups[0].size // 4))}) - evaluator(full)
    assert sens[name] == pytest.approx(max(0.0, expected), abs=1e-12)


def test_finetuned_scores_are_a_short_training_then_the_same_measure(trained):
    model, graph, scores, evaluator, _ = trained
    widths = allocate(graph, scores, 0.3, "flops", "uniform")
    before = evaluator(widths)
    after = evaluator.finetuned(widths, steps=10)
    assert after < before  # ten steps of training on the calibration batches lower the calibration-side loss


def test_the_finalists_are_rescored_on_held_out_batches_that_ranked_none_of_them(trained):
    model, graph, scores, _, loader = trained
    evaluator = evaluator_from(model, torch.zeros(2, 1, 8, 8), scores, loader, batches=2, calibration=2, held_out=2)
    # calibration, scoring and held-out batches are the loader's first six, in that order and disjoint
    assert [torch.equal(x, loader[i][0]) for i, (x, _) in enumerate(evaluator.calibration)] == [True, True]
    assert [torch.equal(x, loader[2 + i][0]) for i, (x, _) in enumerate(evaluator.batches)] == [True, True]
    assert [torch.equal(x, loader[4 + i][0]) for i, (x, _) in enumerate(evaluator.held_out)] == [True, True]
    widths = allocate(graph, scores, 0.3, "flops", "uniform")
    # no training: the held-out score is the call's measure (cross-entropy) on the held-out batches
    assert evaluator.finetuned(widths, steps=0, held_out=True) == pytest.approx(
        evaluator(widths, batches=evaluator.held_out), rel=1e-12)
    assert evaluator.finetuned(widths, steps=0) == pytest.approx(evaluator(widths), rel=1e-12)
    # a loader too short for them (or max_batches) leaves none: the finalists fall back to the scoring batches
    assert evaluator_from(model, torch.zeros(2, 1, 8, 8), scores, loader, batches=2, calibration=2,
                          max_batches=4).held_out == []
    asked = []

    def finetuned(widths, steps, held_out=False):
        asked.append(held_out)
        return evaluator.finetuned(widths, steps, held_out=held_out)

    counting = lambda w: evaluator(w)   # noqa: E731
    counting.finetuned, counting.held_out = finetuned, evaluator.held_out
    _, record = genetic_widths(graph, scores, 0.3, counting, "flops", population=6, generations=1, seed=1)
    assert asked and all(asked) and record["finalists_scored_on"] == "held-out batches"


def test_prune_with_the_genetic_allocation_and_the_recipe_from_the_command_line(trained, tmp_path):
    model, graph, scores, evaluator, loader = trained
    pruned, report = prune(model, loader, torch.zeros(2, 1, 8, 8), criterion="l1", budget=0.4, budget_kind="params",
                           allocation="genetic", max_batches=4, progress=False)
    assert report.to_dict()["params"][1] <= 0.4 * report.to_dict()["params"][0]
    assert recipes.build("genetic").allocation == "genetic"
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--recipe", "genetic", "--model", "lenet5",
                          "--data", "digits", "--epochs", "1", "--finetune-epochs", "0.5", "--target-params", "0.4",
                          # a 1-epoch base is near chance: no floor (a run below it exits 3)
                          "--accuracy-floor", "0.5", "--quiet", "--threads", "1", "--no-onnx-latency", "--out",
                          str(tmp_path / "ga")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "ga" / "report.json").read_text())
    assert report["config"]["allocation"] == "genetic" and report["config"]["finetune_distill"] == 0.5
    assert report["target_reached"]
