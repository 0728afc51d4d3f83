"""Growing Inception stages: kept while validation accuracy improves, warm-started, stopped when it does not."""

import pytest
import torch

from gpp_ext import models
from gpp_ext.grow import grow


def test_grows_while_it_pays_and_keeps_old_weights():
    model = models.build("inception")
    stem = model.stem.conv.weight.detach().clone()
    scores = iter([0.50, 0.60, 0.605, 0.70, 0.70])  # base, stage0 +1 (kept), stage0 +2 (too small), stage1 ...
    trained = []

    def train(m):
        trained.append(sum(len(s) for s in m.stages))
        return m

    grown, history = grow(model, train, lambda m: next(scores), threshold=0.01, max_modules_per_stage=3,
                          progress=False)
    assert [len(s) for s in grown.stages] == [2, 2]
    assert [h.kept for h in history] == [True, True, False, True, False]
    assert history[-1].params > history[0].params
    assert trained == [3, 4, 4, 5]  # each candidate was trained before it was judged
    assert torch.equal(grown.stem.conv.weight, stem)  # warm start: existing weights kept
    assert grown(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert [len(s) for s in model.stages] == [1, 1]  # the input model is left as it was


def test_refuses_models_without_stages():
    with pytest.raises(TypeError, match="no growable stages"):
        grow(models.build("lenet5"), lambda m: m, lambda m: 0.0)
    with pytest.raises(ValueError, match="threshold must be"):
        grow(models.build("inception"), lambda m: m, lambda m: 0.0, threshold=-1)


def test_an_interrupted_growth_resumes_where_its_last_saved_step_left_it(tmp_path):
    """`after_step` saves the net and history after every attempt; given back (`history=`), growing goes on from
    there and ends where the uninterrupted growth ends, without training or scoring any attempt twice."""
    from gpp_ext import io

    def run(scores, stop_after=None, model=None, history=None, saved=None):
        model = model or models.build("inception")
        trained = []

        def train(m):
            trained.append(sum(len(s) for s in m.stages))
            return m

        def after(m, h):
            io.save(m, tmp_path / "growing.pt", spec=m.spec())   # what a caller saves, and loads to resume
            saved[:] = [io.load(tmp_path / "growing.pt"), [step.to_dict() for step in h]]
            if stop_after is not None and len(h) == stop_after:
                raise KeyboardInterrupt

        return grow(model, train, lambda m: next(scores), threshold=0.01, max_modules_per_stage=3,
                    progress=False, history=history, after_step=after), trained

    values = [0.50, 0.60, 0.605, 0.70, 0.70]   # as the test above: base, kept, refused, kept, refused
    whole, trained_whole = run(iter(values), saved=[])
    saved = []
    with pytest.raises(KeyboardInterrupt):
        run(iter(values), stop_after=3, saved=saved)   # interrupted after the refused attempt at stage 0
    net, history = saved
    assert [len(s) for s in net.stages] == [2, 1] and len(history) == 3
    (grown, steps), trained = run(iter(values[3:]), model=net, history=history, saved=[])
    assert [len(s) for s in grown.stages] == [len(s) for s in whole[0].stages] == [2, 2]
    assert [h.to_dict() for h in steps] == [h.to_dict() for h in whole[1]]
    assert trained == trained_whole[2:]   # only the attempts after the interruption were trained
    with pytest.raises(ValueError, match="history must start"):
        grow(models.build("inception"), lambda m: m, lambda m: 0.0, history=history)   # not the net it describes
    with pytest.raises(ValueError, match="starting at stage 0"):   # a history that lost its first step
        grow(net, lambda m: m, lambda m: 0.0, history=[dict(h, kept=False) for h in history[1:]])


def test_a_seeded_growth_is_reproducible_and_leaves_the_callers_random_state_alone():
    import copy

    torch.manual_seed(0)
    base = models.build("inception")

    def run(global_seed):
        torch.manual_seed(global_seed)   # whatever the caller's random state, the growth is the same
        scores = iter([0.5, 0.6, 0.7, 0.8, 0.9])
        grown = grow(copy.deepcopy(base), lambda m: m, lambda m: next(scores), threshold=0.0,
                     max_modules_per_stage=2, progress=False, seed=3)[0]
        drawn = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(drawn, torch.rand(1))   # the attempts drew from their own seeds, not the caller's
        return grown

    first, second = run(1), run(2)
    assert sum(len(s) for s in first.stages) == 4
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
