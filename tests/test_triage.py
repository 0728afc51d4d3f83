"""Block criticality (deep net triage): blocks found on ResNet-20 and the Inception net, each collapsed into one
layer of matching shape, the collapsed copies and the reference trained alike on real data, the model left as it
was, and the table and the growth order read the drops."""

import copy

import pytest
import torch

from gpp_ext import data, models
from gpp_ext.training import fit
from gpp_ext.triage import BlockCriticality, collapse, find_blocks, stage_order, triage, triage_table


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


def test_blocks_are_found_and_collapse_keeps_the_shapes():
    resnet = models.build("resnet20", in_channels=1, num_classes=10)
    blocks = find_blocks(resnet)
    assert len(blocks) == 9 and blocks[0] == "stages.0.0"
    inception = models.build("inception", in_channels=1, num_classes=10)
    assert find_blocks(inception) == [f"stages.{s}.0" for s in range(len(inception.stages))]
    x = torch.randn(2, 1, 8, 8)
    shape = {}
    hook = resnet.get_submodule("stages.1.0").register_forward_hook(
        lambda m, a, o: shape.update(i=list(a[0].shape[1:]), o=list(o.shape[1:])))
    resnet.eval()(x)
    hook.remove()
    small = collapse(resnet, "stages.1.0", shape["i"], shape["o"])  # the stride-2 block with a projection
    assert small(x).shape == (2, 10) and "stages.1.0.conv1" not in dict(small.named_modules())
    assert "stages.1.0.conv1" in dict(resnet.named_modules())  # the original is untouched
    with pytest.raises(ValueError, match="no strided 3x3"):
        collapse(resnet, "stages.1.0", [16, 8, 8], [32, 5, 5])
    # the single layer's weights come from its seed, not from whatever drew from torch's generator before
    a, b = (collapse(resnet, "stages.1.0", shape["i"], shape["o"], seed=5) for _ in range(2))
    torch.randn(3)
    c = collapse(resnet, "stages.1.0", shape["i"], shape["o"], seed=6)
    weight = [m.get_submodule("stages.1.0")[0].weight for m in (a, b, c)]
    assert torch.equal(weight[0], weight[1]) and not torch.equal(weight[0], weight[2])


def test_the_table_advises_collapsing_only_a_block_whose_collapse_costs_little():
    def block(name, drop):
        return BlockCriticality(name, [8, 8, 8], [8, 8, 8], 1000, 600, 0.9 - drop, drop)

    rows = {line.split(" | ")[0].strip("| "): line for line in
            triage_table([block("a", 0.61), block("b", 0.30), block("c", 0.25)]).splitlines()[2:]}
    assert "most critical" in rows["a"] and "collapse" not in rows["b"] + rows["c"]
    assert "least critical, though a single layer loses 25.0%" in rows["c"]
    rows = triage_table([block("a", 0.02), block("b", 0.004), block("c", -0.01)])
    assert rows.count("prune hard or collapse") == 2 and "most critical" in rows


@pytest.mark.parametrize("name", ["resnet20", "inception"])
def test_triage_reports_every_block_on_real_data_and_leaves_the_model(splits, name):
    torch.manual_seed(0)
    model = fit(models.build(name, in_channels=1, num_classes=10), splits.train, 2, lr=4e-3, seed=0).train()
    before = copy.deepcopy(model.state_dict())
    results = triage(model, splits, epochs=0.25, distill=0.5, progress=False, lr=4e-3)
    assert [r.name for r in results] == find_blocks(model)
    for r in results:
        assert 0 <= r.accuracy <= 1 and -1 <= r.drop <= 1 and r.params > 0 and r.layer_params > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    table = triage_table(results)
    assert table.count("\n") == len(results) + 2 and "most critical" in table or max(r.drop for r in results) <= 0
    with pytest.raises(ValueError, match="no modules named"):
        triage(model, splits, blocks=["nope"], progress=False)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        triage(model, splits, epochs=0, progress=False)


def test_stage_order_puts_the_most_critical_stage_first():
    results = [BlockCriticality("stages.0.0", [], [], 1, 1, 0.9, 0.01),
               BlockCriticality("stages.1.0", [], [], 1, 1, 0.8, 0.10),
               BlockCriticality("stages.1.1", [], [], 1, 1, 0.9, 0.00)]
    assert stage_order(results, 3) == [1, 0, 2]


def test_the_loop_grows_the_most_critical_stage_first(splits, tmp_path):
    from gpp_ext.loop import GrowPushPrune, LoopConfig

    torch.manual_seed(0)
    model = models.build("inception", in_channels=1, num_classes=10)
    config = LoopConfig(epochs=1, grow=True, grow_order="triage", grow_epochs=1, max_modules_per_stage=2,
                        grow_threshold=0.0, epoch_budget=0.5, target_params=0.8, batch_size=64)
    report = GrowPushPrune(model, splits, config, out_dir=tmp_path, progress=False).run()
    first, stages = report["growth"][0], len(models.build("inception").stages)
    assert len(first["triage"]) == stages and sorted(first["order"]) == list(range(stages))
    tried = [g["stage"] for g in report["growth"][1:]]
    assert tried and tried[0] == first["order"][0]  # the most critical stage is grown first
    with pytest.raises(ValueError, match="grow_order"):
        LoopConfig(grow_order="random").validate()
    for epochs in (0, -1):  # refused by the configuration, not after the base model has trained
        with pytest.raises(ValueError, match="grow_epochs must be >= 0, and > 0 with grow=True"):
            LoopConfig(grow=True, grow_order="triage", grow_epochs=epochs).validate()


def test_blocks_that_cannot_be_collapsed_are_refused_before_any_training(splits, monkeypatch):
    import gpp_ext.triage as triage_module

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the blocks were checked")

    monkeypatch.setattr(triage_module, "fit", no_training)
    model = models.build("resnet20", in_channels=1, num_classes=10)
    model.spare = torch.nn.Conv2d(16, 16, 3)   # a module the forward pass never calls
    with pytest.raises(ValueError, match="'spare' is never called"):
        triage(model, splits, blocks=["stages.0.0", "spare"], progress=False)
    with pytest.raises(ValueError, match=r"'classifier' must map \[C, H, W\]"):
        triage(model, splits, blocks=["stages.0.0", "classifier"], progress=False)


def test_the_growth_says_what_it_tried_and_the_triage_that_ordered_it():
    from gpp_ext import growth
    from gpp_ext.loop import LoopConfig
    from gpp_ext.report import render_markdown

    config = LoopConfig(grow=True, max_modules_per_stage=1)
    first = {"stage": -1, "modules": 0, "accuracy": 0.9, "params": 100, "kept": True, "method": "inception"}
    assert growth.summary([first], config) == ("nothing tried: every stage already holds 1 module "
                                               "(--max-modules-per-stage)")
    triaged = [{"name": f"stages.{s}.0", "in_shape": [8, 8, 8], "out_shape": [8, 8, 8], "params": 900,
                "layer_params": 600, "accuracy": 0.9 - d, "drop": d} for s, d in enumerate((0.01, 0.2))]
    history = [dict(first, triage=triaged, order=[1, 0]),
               dict(first, stage=1, modules=2, accuracy=0.93, params=150),
               dict(first, stage=0, modules=2, accuracy=0.92, params=200, kept=False)]
    assert growth.summary(history, config) == (
        "2 candidates tried, 1 kept; stages grown in triage order [1, 0] (validation drop when collapsed: "
        "stages.1.0 +0.200, stages.0.0 +0.010)")
    report = {"dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "seconds": 1.0, "stopped": "done",
              "iterations": [], "growth": history,
              "base": {"params": 150, "flops": 1500, "test_accuracy": 0.93},
              "final": {"params": 75, "flops": 700, "test_accuracy": 0.92},
              "before_growth": {"params": 100, "flops": 1000, "val_accuracy": 0.9, "test_accuracy": 0.9}}
    text = render_markdown(report)
    assert "Grown from 100 parameters and 1,000 FLOPs" in text and "keeps 75.0% of the parameters" in text
    assert "The stages grew in triage order [1, 0]" in text and "| stages.1.0 |" in text
