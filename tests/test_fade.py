"""Push v2's removal fade: the set reaches exactly zero, the cut then changes no output (every architecture of
the graph tests; float32 outputs of order 1, so 1e-5 absolute leaves only summation-order differences), task
gradients into the set are stopped, kept channels train freely, and the set may change while the fade runs."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpp_ext.classifier import find_classifier
from gpp_ext.cost import count_params
from gpp_ext.fade import RemovalFade
from gpp_ext.pruning import ChannelGraph
from gpp_ext.push import PushLoss
from gpp_ext.training import fit
from test_graph import CASES, make


def _task(name, seed=0):
    model, x = make(name, seed=seed)
    classes = dict(model.named_modules())[find_classifier(model)].out_features
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(96, *x.shape[1:], generator=g)
    labels = torch.arange(96) % classes
    return model, x, TensorDataset(inputs, labels), classes


@pytest.mark.parametrize("name", list(CASES))
def test_once_faded_the_cut_changes_no_output(name):
    _check_lossless(name)


def test_a_fade_that_ends_early_stays_at_zero_while_the_rest_trains():
    # the set reaches zero half-way; the second half trains the kept channels with the set held at zero
    _check_lossless("vgg", schedule="linear", fade_end=0.5)


def _check_lossless(name, **fade_options):
    model, x, data, classes = _task(name)
    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.5, reselect=3, max_batches=2,
                       **fade_options)
    push = PushLoss(classes, 0.3, 0.3, 0.05)
    fade.attach(push)
    fit(model, data, 1, batch_size=24, lr=1e-2, push=push, after_step=fade.step, seed=1)
    keep = fade.finish()
    assert keep, "nothing to cut"
    graph = ChannelGraph(model, x)
    for group, removed in fade.removed.items():
        for p in graph.channel_params(group):
            if p.role != "consumer" and not p.attr.startswith("running_"):
                assert p.tensor.index_select(p.dim, p.index[removed].reshape(-1)).abs().max() == 0, (p, group)
    model.eval()
    probe = torch.randn(8, *x.shape[1:])
    before = model(probe)
    params = count_params(model)
    graph.prune(keep)
    after = model(probe)
    assert after.shape == before.shape
    assert (after - before).abs().max() < 1e-5
    assert count_params(model) <= 0.5 * params


def test_gradients_into_the_set_are_stopped_and_kept_channels_train():
    model, x, data, classes = _task("vgg")
    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.4, criterion="l1", reselect=1)
    removed = fade.removed
    name = next(iter(removed))
    producer = next(p for p in fade.graph.channel_params(name) if p.role == "producer" and p.attr == "weight")
    start = producer.tensor.detach().clone()
    xb, yb = data[:32]
    model.train()
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    rows = producer.index[removed[name]].reshape(-1)
    assert producer.tensor.grad.index_select(0, rows).abs().max() == 0
    kept_rows = fade.keep[name]
    assert producer.tensor.grad.index_select(0, kept_rows).abs().max() > 0
    model.zero_grad(set_to_none=True)
    fit(model, data, 1, batch_size=32, lr=1e-2, after_step=fade.step, seed=2)
    now = producer.tensor.detach()
    assert not torch.allclose(now.index_select(0, kept_rows), start.index_select(0, kept_rows))  # trained
    assert now.index_select(0, rows).abs().max() == 0  # cosine fade over the whole call: zero at its end
    fade.finish()
    assert not producer.tensor._backward_hooks  # the gradient masks are gone


def test_reselection_and_schedule():
    model, x, data, classes = _task("lenet5")
    draws = torch.Generator().manual_seed(4)

    def fresh_random(graph, context):  # new scores at every selection, so the set changes
        return {g.name: torch.rand(g.size, generator=draws, dtype=torch.float64) for g in graph.groups}

    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.5, criterion=fresh_random, reselect=4,
                       schedule="linear", fade_end=0.5)
    seen = []

    def record(step, total):
        fade.step(step, total)
        seen.append(fade._u)

    fit(model, data, 2, batch_size=16, lr=1e-2, after_step=record, seed=3)
    assert len(fade.history) == 4 and fade.history[0]["at"] == 0.0
    assert all(h["at"] < 1.0 for h in fade.history)
    assert sum(h["swapped"] for h in fade.history) > 0  # fresh scores: the set changes between selections
    assert seen[len(seen) // 2 - 1] == 1.0  # linear fade over the first half of the steps
    with pytest.raises(ValueError, match="budget must be in"):
        RemovalFade(model, x, None, budget=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        RemovalFade(model, x, None, budget=0.5, schedule="step")
    fade.finish()
    with pytest.raises(RuntimeError, match="finished"):
        fade.step(1, 1)


def test_under_distributed_every_process_fades_what_rank_0_chose(monkeypatch):
    """Each process scores on its own batches; the fade takes rank 0's keep-set (`broadcast_object`) at every
    selection, so all processes fade and cut the same channels. Rank 0 is simulated: the broadcast hands back a
    keep-set other than this process's own (each group's highest-indexed channels at this process's widths)."""
    import gpp_ext.fade as fade_module

    calls = []

    def from_rank_0(keep, src=0, group=None):
        calls.append(keep)
        return {n: torch.arange(sizes[n] - int(k.numel()), sizes[n]) for n, k in keep.items()}

    model, x, data, classes = _task("vgg")
    sizes = {g.name: g.size for g in ChannelGraph(model, x).groups}
    monkeypatch.setattr(fade_module.gdist, "broadcast_object", from_rank_0)
    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.5, reselect=3, max_batches=2)
    assert len(calls) == 1
    for name, removed in fade.removed.items():
        width = sizes[name] - removed.numel()
        assert removed.tolist() == list(range(sizes[name] - width)), name  # rank 0's: the lowest indices go
        assert fade.widths[name] == width
    fit(model, data, 1, batch_size=24, lr=1e-2, after_step=fade.step, seed=1)
    assert len(calls) == 3  # every selection


def test_a_gradual_fade_grows_the_set_to_the_fixed_widths_and_cuts_losslessly():
    """`gradual=True`: selection j of `reselect` removes j / reselect of each group's loss (chosen by the
    criterion then), so the set grows step by step; it ends at the first selection's widths, exactly zero."""
    model, x, data, classes = _task("vgg")
    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.4, reselect=4, max_batches=2,
                       gradual=True, schedule="linear", fade_end=0.5)
    sizes = {g.name: g.size for g in fade.graph.groups}
    final = sum(sizes[n] - w for n, w in fade.widths.items())
    counts = [fade.history[-1]["removed"]]
    fit(model, data, 1, batch_size=12, lr=1e-2, seed=1,
        after_step=lambda step, total: (fade.step(step, total), counts.append(fade.history[-1]["removed"])))
    selections = sorted(set(counts))
    assert len(selections) == 4 and selections[-1] == final   # four sizes, growing, ending at the widths
    assert abs(selections[0] - final / 4) <= len(sizes)       # the first removes a quarter (rounded per group)
    assert counts == sorted(counts)
    keep = fade.finish()
    assert {n: int(k.numel()) for n, k in keep.items()} == {n: w for n, w in fade.widths.items() if w < sizes[n]}
    model.eval()
    probe = torch.randn(8, *x.shape[1:])
    before = model(probe)
    ChannelGraph(model, x).prune(keep)
    assert (model(probe) - before).abs().max() < 1e-5
    with pytest.raises(ValueError, match="fixed_widths"):
        RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.4, gradual=True, fixed_widths=False)


@pytest.mark.parametrize("steps", [0, 2])
def test_a_gradual_fade_too_short_for_its_stages_still_ends_at_the_widths(steps):
    """Fewer steps than stages (or none): a step that passes several stages goes to the last, and `finish`
    completes the set, so the cut meets the widths the first selection decided instead of missing the budget."""
    model, x, data, classes = _task("vgg")
    fade = RemovalFade(model, x, DataLoader(data, batch_size=32), budget=0.4, reselect=4, max_batches=2,
                       gradual=True, schedule="linear", fade_end=0.5)
    for step in range(1, steps + 1):
        fade.step(step, steps)
    sizes = {g.name: g.size for g in fade.graph.groups}
    keep = fade.finish()
    assert {n: int(k.numel()) for n, k in keep.items()} == {n: w for n, w in fade.widths.items() if w < sizes[n]}
