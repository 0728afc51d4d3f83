"""gpp_ext's criterion inside Torch-Pruning: a Torch-Pruning pruner takes `DiscriminantImportance` and prunes a
trained model by our traced discriminant utility (a different choice from magnitude's)."""

import copy

import pytest
import torch

from gpp_ext import data, models, training

tp = pytest.importorskip("torch_pruning")
from gpp_ext.interop.torch_pruning import DiscriminantImportance  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    splits = data.load_dataset("digits")
    model = training.fit(models.build("vgg", in_channels=1, num_classes=10), splits.train, 1, lr=3e-3,
                         batch_size=64, seed=0)
    loader = list(torch.utils.data.DataLoader(splits.train, batch_size=128))[:4]
    return model, loader


def _prune(model, importance, steps=1):
    x = torch.zeros(2, 1, 8, 8)
    pruner = tp.pruner.BasePruner(model, x, importance=importance, pruning_ratio=0.5, iterative_steps=steps,
                                  ignored_layers=[model.classifier])
    for _ in range(steps):
        pruner.step()
    return model


def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight


def test_a_torch_pruning_pruner_prunes_by_the_discriminant_utility(trained):
    model, loader = trained
    ours = copy.deepcopy(model)
    importance = DiscriminantImportance(ours, loader, torch.zeros(2, 1, 8, 8))
    _prune(ours, importance, steps=2)  # two iterative steps: the scores are computed again after the first
    theirs = _prune(copy.deepcopy(model), tp.importance.MagnitudeImportance(p=1), steps=2)
    assert ours(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())
    assert _first_conv(ours).shape == _first_conv(theirs).shape
    assert not torch.equal(_first_conv(ours), _first_conv(theirs))  # another choice than magnitude's
    # the kept filters of the first layer are those gpp_ext's criterion ranks highest
    fresh = copy.deepcopy(model)
    imp = DiscriminantImportance(fresh, loader, torch.zeros(2, 1, 8, 8))
    imp.refresh()
    first = next(n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Conv2d))
    scores = torch.tensor([imp._by_position[(first, c)] for c in range(_first_conv(fresh).shape[0])])
    kept = set(scores.argsort(descending=True)[:_first_conv(fresh).shape[0] // 2].tolist())
    full = _first_conv(fresh)
    one = copy.deepcopy(model)  # the importance is built on the very model the pruner prunes
    _prune(one, DiscriminantImportance(one, loader, torch.zeros(2, 1, 8, 8)))
    rows = {i for i in range(full.shape[0]) for r in _first_conv(one) if torch.equal(r, full[i])}
    assert rows == kept


def test_bad_arguments_are_refused(trained):
    model, loader = trained
    with pytest.raises(TypeError, match="re-iterable"):
        DiscriminantImportance(model, iter(loader), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="normalizer"):
        DiscriminantImportance(model, loader, torch.zeros(2, 1, 8, 8), normalizer="max")
    with pytest.raises(ValueError, match="criterion must be one of"):
        DiscriminantImportance(model, loader, torch.zeros(2, 1, 8, 8), criterion="nope")
