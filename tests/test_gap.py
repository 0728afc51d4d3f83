"""Scheduled grow-and-prune at channel level: layers take turns being dense while the rest stay at the budget's
uniform widths with their removed channels exactly zero, the final cut changes no output, a network trained
from scratch ends at the budget on real data, and the recipe runs from the command line."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from gpp_ext import data, models, recipes
from gpp_ext.cost import count_params
from gpp_ext.gap import GapSchedule, channel_l1, scheduled_grow_and_prune
from gpp_ext.pruning import ChannelGraph
from gpp_ext.training import fit

EXAMPLE = torch.zeros(2, 1, 8, 8)


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


def test_groups_take_turns_and_the_removed_channels_stay_exactly_zero(splits):
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8)
    schedule = GapSchedule(model, EXAMPLE, 0.5, partitions=2, cycles=2)
    assert schedule.parts == [["conv1", "conv2"], ["fc1", "fc2"]] and schedule.phases == 4
    seen = []

    def after_step(step, total):
        schedule.after_step(step, total)
        graph = schedule.graph
        for name, gone in schedule.removed.items():  # every pruned group's removed channels are zero now
            assert float(channel_l1(graph, name)[gone].sum()) == 0.0
        seen.append(tuple(sorted(set(graph.group(n).name for n in
                                     [g.name for g in graph.groups]) - set(schedule.removed))))

    fit(model, splits.train, 2, lr=4e-3, seed=0, after_step=after_step)
    assert seen[0] == ("conv1", "conv2") and ("fc1", "fc2") in seen  # the dense partition changed
    assert [h["pruned"] for h in schedule.history] == [["conv1", "conv2"], ["fc1", "fc2"], ["conv1", "conv2"]]
    keep = schedule.finish()
    assert {n: int(k.numel()) for n, k in keep.items()} == schedule.widths
    x = torch.stack([splits.val[i][0] for i in range(32)])
    before = model.eval()(x)
    ChannelGraph(model, EXAMPLE).prune(keep)
    assert (model(x) - before).abs().max() < 1e-5  # the cut removes only zeros


def test_a_partition_that_grows_back_trains_its_regrown_channels(splits):
    """Regrown from zero, a whole channel would stay dead (zero rows, zero norm weight and bias: no gradient), and
    the partitions pruned at the start would keep the channels their random initial weights chose. Regrown as
    new channels, they train: their rows move away from the values the regrowth gave them."""
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8)
    schedule = GapSchedule(model, EXAMPLE, 0.4, partitions=2, cycles=1, seed=3)
    grown = schedule.removed["fc1"].clone()
    at_regrowth = {}

    def after_step(step, total):
        phase = schedule.phase
        schedule.after_step(step, total)
        if phase == 0 and schedule.phase == 1:  # the boundary: fc1 and fc2 have just grown back
            at_regrowth.update(_regrown_rows(schedule.graph, "fc1", grown))

    fit(model, splits.train, 2, lr=4e-3, seed=0, after_step=after_step)
    assert at_regrowth, "the schedule never reached its phase boundary"
    now = _regrown_rows(schedule.graph, "fc1", grown)
    for module, rows in at_regrowth.items():
        assert rows.abs().sum() > 0  # they start live, not at zero
        assert (now[module] - rows).abs().max() > 1e-3, "the regrown channels did not train"


def test_the_regrowth_is_seeded():
    """The regrown values come from the schedule's seed and the phase: the same seed regrows the same values (so
    a resumed run regrows what an uninterrupted one would), another seed others."""
    def regrow(seed):
        torch.manual_seed(0)
        schedule = GapSchedule(models.build("lenet5", input_size=8), EXAMPLE, 0.4, partitions=2, seed=seed)
        grown = schedule.removed["fc1"].clone()
        schedule._end_phase(0)
        return _regrown_rows(schedule.graph, "fc1", grown)["fc1"]

    assert torch.equal(regrow(3), regrow(3)) and not torch.equal(regrow(3), regrow(4))


def _regrown_rows(graph, name, channels) -> dict:
    return {p.module: p.tensor.detach().index_select(p.dim, p.index[channels].reshape(-1)).clone()
            for p in graph.channel_params(name) if p.role == "producer" and p.attr == "weight"}


def test_from_scratch_to_the_budget_on_real_data(splits):
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8)
    full = count_params(model)
    compact, history = scheduled_grow_and_prune(copy.deepcopy(model), splits, 0.4, epochs=30, lr=4e-3,
                                                lr_schedule="onecycle")
    final = history[-1]
    assert final["phase"] == "final" and final["params"] == count_params(compact) <= 0.42 * full
    assert final["val_accuracy"] > 0.8  # a digits classifier, trained from scratch, pruned as it trained
    with pytest.raises(ValueError, match="budget must be in"):
        GapSchedule(model, EXAMPLE, 1.5)
    with pytest.raises(ValueError, match="budget_kind"):
        recipes.build("gap", budget_kind="latency", target_latency=0.5)


def test_the_gap_recipe_runs_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--recipe", "gap", "--model", "lenet5",
                          "--data", "digits", "--push-epochs", "2", "--finetune-epochs", "0.5", "--target-params",
                          "0.5", "--quiet", "--threads", "1", "--no-onnx-latency", "--out", str(tmp_path / "gap")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 3), out.stderr
    report = json.loads((tmp_path / "gap" / "report.json").read_text())
    assert report["config"]["push"] == "gap" and report["config"]["epochs"] == 0 and report["target_reached"]


def test_the_cut_network_starts_its_fine_tuning_with_recalibrated_batchnorm(splits):
    """The last dense partition is silenced after the last step, so the statistics of the norms after it are
    stale: `scheduled_grow_and_prune` re-estimates them before the fine-tuning (and with no fine-tuning, before
    it returns), so the model it returns is one a recalibration would not change."""
    from gpp_ext.training import recalibrate_batchnorm, training_batches

    torch.manual_seed(0)
    model = models.build("vgg", widths=[8, 8, "M", 16, 16, "M"], hidden=16)
    compact, _ = scheduled_grow_and_prune(model, splits, 0.5, epochs=1, finetune_share=0.0, partitions=2, lr=4e-3,
                                          batch_size=64)
    state = {k: v.clone() for k, v in compact.state_dict().items()}
    recalibrate_batchnorm(compact, training_batches(splits.train, 64, 1))
    for key, value in compact.state_dict().items():
        assert torch.allclose(value.double(), state[key].double(), rtol=1e-5, atol=1e-6), key


def test_groups_normalised_across_channels_are_refused_before_training(splits, tmp_path):
    from gpp_ext.loop import GrowPushPrune

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Sequential(
            torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 10)))

    net = make()
    with pytest.raises(ValueError, match=r"normalised across channels by 1\.1 \(LayerNorm\)"):
        GapSchedule(net, EXAMPLE, 0.5)
    config = recipes.build("gap", target_params=0.5, epoch_budget=1)
    with pytest.raises(ValueError, match="LayerNorm"):
        GrowPushPrune(net, splits, config, out_dir=tmp_path / "run", progress=False, factory=make)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_checkpoint_of_another_schedule_is_refused():
    """Cycles change the phases but not the starting weights: the saved progress names its schedule."""
    torch.manual_seed(0)
    one = GapSchedule(models.build("lenet5", input_size=8), EXAMPLE, 0.5, cycles=1)
    torch.manual_seed(0)
    three = GapSchedule(models.build("lenet5", input_size=8), EXAMPLE, 0.5, cycles=3)
    three.load_state_dict(three.state_dict())
    with pytest.raises(ValueError, match="another schedule"):
        three.load_state_dict(one.state_dict())
    older = {k: v for k, v in three.state_dict().items() if k != "schedule"}   # saved before schedules were named
    three.load_state_dict(older)
