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
