"""`fit(checkpoint=...)`: a training run killed part-way and called again goes on after its last saved epoch and
ends bit for bit where an uninterrupted run ends (weights, optimiser, schedule, batch order, dropout, and a
stateful hook: the grow-and-prune schedule); a finished run's checkpoint returns the trained weights at once; a
checkpoint of another run is refused, never overwritten."""

import pytest
import torch
import torch.nn as nn

from gpp_ext import data, models
from gpp_ext.checkpoints import order_generators
from gpp_ext.push import PushLoss
from gpp_ext.gap import GapSchedule, scheduled_grow_and_prune
from gpp_ext.training import fit, training_batches


@pytest.fixture(scope="module")
def splits():
    return data.load_dataset("digits", seed=0)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(6 * 64, 10))


RECIPE = dict(lr=3e-3, lr_schedule="onecycle", batch_size=256, seed=3)


class _Killed(Exception):
    pass


def _kill_at(stop):
    def after_step(step, total):
        if step == stop:
            raise _Killed
    return after_step


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _close(a: nn.Module, b: nn.Module, device) -> bool:
    """Bit for bit on the CPU; on CUDA within 1e-5, because cuDNN's backward kernels may sum in another order
    from run to run (two uninterrupted runs differ as much)."""
    if device.type == "cpu":
        return _same(a, b)
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k].float().cpu(), sb[k].float().cpu(), atol=1e-5) for k in sa)


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(splits, tmp_path, device):
    recipe = dict(RECIPE, device=device)
    whole = fit(_net(), splits.train, 3, **recipe)
    steps = len(training_batches(splits.train, 256, 3))
    path = tmp_path / "run.pt"
    model = _net()
    with pytest.raises(_Killed):   # killed in the middle of the second epoch: the first epoch is saved
        fit(model, splits.train, 3, checkpoint=path, after_step=_kill_at(steps + 2), **recipe)
    assert path.exists()
    resumed = fit(_net(), splits.train, 3, checkpoint=path, **recipe)   # the same call from the same start
    assert _close(resumed, whole, device)
    # done: the same call returns the trained weights at once (no step is taken), and the file stays
    calls = []
    again = fit(_net(), splits.train, 3, checkpoint=path, after_step=lambda s, t: calls.append(s), **recipe)
    assert _same(again, resumed) and calls == [] and path.exists()


def test_a_push_resumes_with_its_moving_statistics(splits, tmp_path):
    """The push's moving average of class statistics (`ema`) is part of the run: it is saved and restored, on
    class-balanced batches whose order is restored too."""
    def start():
        torch.manual_seed(0)
        return models.build("lenet5", input_size=8)

    def push():
        return PushLoss(10, 0.3, 0.3, 0.05, ema=0.9)

    recipe = dict(RECIPE, batch_size=100)
    whole = fit(start(), splits.train, 2, push=push(), **recipe)
    steps = len(training_batches(splits.train, 100, 3, balanced=True))
    path = tmp_path / "push.pt"
    with pytest.raises(_Killed):
        fit(start(), splits.train, 2, push=push(), checkpoint=path, after_step=_kill_at(steps + 1), **recipe)
    assert _same(fit(start(), splits.train, 2, push=push(), checkpoint=path, **recipe), whole)


def test_a_checkpoint_of_another_run_is_refused_and_kept(splits, tmp_path):
    path = tmp_path / "run.pt"
    fit(_net(), splits.train, 1, checkpoint=path, **RECIPE)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"run\.pt belongs to another training run .*lr"):
        fit(_net(), splits.train, 1, checkpoint=path, **dict(RECIPE, lr=1e-3))
    with pytest.raises(ValueError, match="start"):   # another starting model
        fit(_net(seed=1), splits.train, 1, checkpoint=path, **RECIPE)
    assert path.read_bytes() == before
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read training checkpoint .*run\.pt"):
        fit(_net(), splits.train, 1, checkpoint=path, **RECIPE)


def test_the_balanced_batches_order_is_checkpointed_too(splits):
    plain = order_generators(training_batches(splits.train, 64, 0))
    balanced = order_generators(training_batches(splits.train, 64, 0, balanced=True))
    assert len(plain) == 1 and len(balanced) == 1   # the sampler's generator, found through the loader


def test_an_interrupted_grow_and_prune_resumes_to_the_uninterrupted_result(splits, tmp_path, monkeypatch):
    def start():
        torch.manual_seed(0)
        return models.build("lenet5", input_size=8)

    kwargs = dict(target=0.4, epochs=3, partitions=2, seed=1, batch_size=256, lr_schedule="warmup-cosine")
    whole, history = scheduled_grow_and_prune(start(), splits, **kwargs)
    steps = len(training_batches(splits.train, 256, 1))
    real = GapSchedule.after_step

    def killed(self, step, total):   # killed in the phases' second epoch, after the first phase ended
        real(self, step, total)
        if step == steps + 2:
            raise _Killed

    path = tmp_path / "gap.pt"
    monkeypatch.setattr(GapSchedule, "after_step", killed)
    with pytest.raises(_Killed):
        scheduled_grow_and_prune(start(), splits, checkpoint=path, **kwargs)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["gap-phases.pt"]
    resumed, history_resumed = scheduled_grow_and_prune(start(), splits, checkpoint=path, **kwargs)
    assert _same(resumed, whole) and history_resumed == history
    assert not list(tmp_path.iterdir())   # its checkpoints are removed once it returns


def test_a_checkpoint_is_not_resumed_on_other_labels_of_the_same_size(splits, tmp_path):
    import json as _json

    from torch.utils.data import TensorDataset

    from gpp_ext.atomic import read, save_atomic
    from gpp_ext.data import labels_of

    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    y = labels_of(splits.train)
    path = tmp_path / "run.pt"
    fit(_net(), TensorDataset(x, y), 1, checkpoint=path, **RECIPE)
    with pytest.raises(ValueError, match=r"belongs to another training run \(it differs in labels\)"):
        fit(_net(), TensorDataset(x, y.roll(1)), 1, checkpoint=path, **RECIPE)
    state = read(path, "test")   # as written before the labels were recorded: compared on what it holds
    run = _json.loads(state["run"])
    del run["labels"]
    state["run"] = _json.dumps(run, sort_keys=True)
    save_atomic(state, path)
    fit(_net(), TensorDataset(x, y), 1, checkpoint=path, **RECIPE)
