"""Sparse Structure Selection with block removal (Huang & Wang 2018): a residual block whose scale is 0 is removed
without changing any output (ResNet-20; torchvision's ResNet-18 where torchvision imports), the scales leave no
trace in the saved model, the modified APG drives scales to exact zeros, and the recipes run end to end."""

import subprocess
import sys

import pytest
import torch

from gpp_ext import data, io, models, recipes
from gpp_ext.pruning.blocks import BlockScales, remove_blocks, residual_blocks
from gpp_ext.pruning.sss import SparseStructureSelection
from gpp_ext.training import fit


def _resnet():
    torch.manual_seed(0)
    model = models.build("resnet20", in_channels=1, num_classes=10, widths=(8, 16, 16))
    # BatchNorm statistics and affine parameters away from their defaults, so a wrong fold would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_only_identity_shortcut_blocks_are_removable():
    model = _resnet()
    removable = [n for n, _ in residual_blocks(model)]
    every = [n for n, _ in residual_blocks(model, removable_only=False)]
    assert len(every) == 9 and removable == [n for n in every if not n.endswith(".0") or n == "stages.0.0"]
    with pytest.raises(ValueError, match="not removable"):
        remove_blocks(model, ["stages.1.0"])


@pytest.mark.parametrize("zeros, gone", [
    (["stages.0.1"], ["stages.0.1"]),
    (["stages.0.0", "stages.1.2", "stages.2.1", "stages.2.2"],
     ["stages.0.0", "stages.1.2", "stages.2.1", "stages.2.2"]),
    # a stage whose every block is at zero keeps its first (which then computes the identity)
    (["stages.0.0", "stages.0.1", "stages.0.2"], ["stages.0.1", "stages.0.2"]),
])
def test_a_block_at_zero_is_removed_without_changing_an_output(zeros, gone, tmp_path):
    model = _resnet()
    x = torch.randn(6, 1, 12, 12)
    scales = BlockScales(model)
    with torch.no_grad():
        for name, block in scales.blocks:
            block.block_scale.fill_(0.0 if name in zeros else 0.7)
        expected = model(x)
    removed = scales.finish()
    assert sorted(removed) == gone
    assert not any("block_scale" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    # an ordinary model again: saved and rebuilt from its spec, it computes the same
    io.save(model, tmp_path / "m.pt")
    again = io.load(tmp_path / "m.pt").eval()
    assert sum(1 for _ in residual_blocks(again, removable_only=False)) == 9 - len(removed)
    with torch.no_grad():
        assert torch.allclose(again(x), expected, atol=1e-6, rtol=1e-5)


def test_torchvision_resnet_blocks_at_zero_are_removed_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    scales = BlockScales(model)
    assert [n for n, _ in scales.blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    with torch.no_grad():
        for name, block in scales.blocks:
            block.block_scale.fill_(0.0 if name in ("layer1.1", "layer3.1") else 1.0)
        expected = model(x)
    assert sorted(scales.finish()) == ["layer1.1", "layer3.1"]
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)
    assert len(model.layer1) == 1 and len(model.layer3) == 1


def test_the_modified_apg_drives_scales_to_zero_and_zero_blocks_go_exactly():
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("resnet20", in_channels=1, num_classes=10, widths=(8, 16, 16))
    sss = SparseStructureSelection(model, lam=1.0, schedule="constant")
    assert len(sss.blocks.blocks) == 7
    start = sss.blocks.scales()
    fit(model, splits.train, 3, lr=4e-3, seed=0, after_backward=sss.after_backward, after_step=sss.after_step)
    shrunk = sss.blocks.scales()
    assert all(abs(shrunk[n]) < abs(start[n]) for n in start)  # the L1 proximal steps shrink every scale
    assert sss.finish(delete=False) == []  # thresholded and folded, nothing deleted yet
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sum(int((m.weight == 0).sum()) for m in norms) > 0  # exact zeros, not small numbers
    zero = [n for n, b in residual_blocks(model) if not b.bn2.weight.any() and not b.bn2.bias.any()]
    assert zero, "no block reached zero"
    model.eval()
    x = torch.stack([splits.val[i][0] for i in range(16)])
    with torch.no_grad():
        expected = model(x)
    remove_blocks(model, zero)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="lam"):
        SparseStructureSelection(model, lam=-1.0)


@pytest.mark.parametrize("push", ["sss", "sss_blocks"])
def test_the_sss_pushes_run_from_the_command_line(push, compress_cli):
    assert recipes.build("sss").push == "sss"
    out, report, folder = compress_cli(push, "--recipe", "sss", "--push", push, "--model", "resnet20", "--model-args",
                                       '{"widths": [8, 16, 16]}', "--epochs", "1", "--push-epochs", "0.5",
                                       "--finetune-epochs", "0.3", "--sparsity", "0.3", "--target-params", "0.4")
    assert out.returncode == 0, out.stderr
    assert report["config"]["push"] == push and report["target_reached"]
    compact = io.load(folder / "model.pt")
    assert sum(p.numel() for p in compact.parameters()) <= 0.4 * report["base"]["params"]


def test_the_factors_end_at_their_last_proximal_iterate():
    """The modified APG's momentum extrapolation moves a factor the threshold zeroed off zero again; the run
    ends on the proximal iterates (exact zeros where the threshold put them), with no extra shrinking of the
    factors that survive."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 1, 6, 6))
    sss = SparseStructureSelection(model, lam=1.0, blocks=False)   # threshold 0.1 a step
    weight = model[1].weight
    with torch.no_grad():
        weight.copy_(torch.tensor([0.01, 0.02, 0.03, 2.0, 3.0, 4.0]))
    for step in range(1, 4):
        weight.grad = torch.tensor([0.0, 0.0, 0.0, 0.1, -0.1, 0.0])
        sss.after_backward(model)
        sss.after_step(step, 3)
    last = sss._prox[0].clone()
    assert (last[:3] == 0).all() and (last[3:] > 0).all()      # the small factors zeroed, the large ones kept
    sss.finish(delete=False)
    assert torch.equal(weight.detach(), last)                  # the iterates: survivors not shrunk once more


def _linear_only():
    """A model with nothing SSS could select: no blocks, no BatchNorm, no prunable channel group."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def test_a_model_with_nothing_to_select_is_refused_before_any_training():
    lenet = models.build("lenet5", in_channels=1, num_classes=10, input_size=28)   # no BatchNorm, no blocks
    with pytest.raises(ValueError, match="no residual blocks and channels .* to select"):
        SparseStructureSelection(lenet, 1e-2)   # without example inputs only BatchNorm weights count
    with pytest.raises(ValueError, match="no residual blocks and channels .* to select"):
        SparseStructureSelection(_linear_only(), 1e-2, example=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="no residual blocks to select"):
        SparseStructureSelection(models.build("vgg", in_channels=1, num_classes=10), 1e-2, channels=False)
    assert SparseStructureSelection(models.build("vgg", in_channels=1, num_classes=10), 1e-2, blocks=False).factors


def test_layers_no_norm_follows_get_explicit_factors_that_fold_away_exactly():
    """LeNet-5 has no BatchNorm: each of its prunable layers gets a factor per output channel, which the modified
    APG shrinks while the model trains; folding them into the layers (some at exact zero) changes no output and
    leaves an ordinary model whose zeroed channels the `bn_scale` criterion ranks lowest. VGG-BN's hidden fully
    connected layer (no norm after it) gets one; its convolutions keep their BatchNorm weights as factors."""
    from gpp_ext.pruning import ChannelGraph, criteria
    from gpp_ext.pruning.sss import scalable_layers

    vgg = models.build("vgg", in_channels=1, num_classes=10)
    assert scalable_layers(vgg, torch.zeros(2, 1, 28, 28)) == ["fc"]
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("lenet5", input_size=8)
    example = torch.zeros(2, 1, 8, 8)
    sss = SparseStructureSelection(model, lam=0.1, schedule="constant", example=example)
    assert [n for n, _ in sss.channels.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert len(sss.factors) == 4 and all((f == 1).all() for f in sss.factors)
    fit(model, splits.train, 2, lr=4e-3, seed=0, after_backward=sss.after_backward, after_step=sss.after_step)
    assert all(float(f.detach().abs().mean()) < 0.95 for f in sss.factors)   # the L1 steps shrank them
    generator = torch.Generator().manual_seed(1)
    zeros = {}
    with torch.no_grad():   # some factors at exact zero, the others spread out, as a long run leaves them
        for (name, layer), prox in zip(sss.channels.layers, sss._prox):
            prox.uniform_(0.2, 1.5, generator=generator)
            zeros[name] = list(range(0, prox.numel(), 3))
            prox[zeros[name]] = 0.0
            layer.channel_scale.copy_(prox)
    model.eval()
    x = torch.stack([splits.val[i][0] for i in range(16)])
    with torch.no_grad():
        expected = model(x)
    assert sss.finish() == []
    assert not any("channel_scale" in n for n, _ in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6, rtol=1e-5)
    scores = criteria.get("bn_scale")(ChannelGraph(model, example))
    for name, channels in zeros.items():
        kept = [c for c in range(len(scores[name])) if c not in channels]
        assert float(scores[name][channels].max()) == 0.0 and float(scores[name][kept].min()) > 0.0


def test_the_sss_recipe_compresses_a_model_without_batchnorm_from_the_command_line(compress_cli):
    out, report, folder = compress_cli("sss", "--recipe", "sss", "--model", "lenet5", "--epochs", "1",
                                       "--push-epochs", "0.5", "--finetune-epochs", "0.3", "--sparsity", "0.1",
                                       "--target-params", "0.4")
    assert out.returncode == 0, out.stderr
    assert report["config"]["push"] == "sss" and report["target_reached"]
    compact = io.load(folder / "model.pt")
    assert not any("channel_scale" in n for n, _ in compact.named_parameters())


def test_the_loop_refuses_sss_on_such_a_model_before_training_it(tmp_path, monkeypatch):
    """`GrowPushPrune` checks the push against the model with its other model checks: nothing is trained, and
    `gpp compress` says why and exits non-zero at once."""
    import gpp_ext.loop as loop_module
    from gpp_ext.loop import GrowPushPrune

    monkeypatch.setattr(loop_module, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    splits = data.load_dataset("digits", seed=0)
    lenet = models.build("lenet5", input_size=8)
    for push, model, factory, message in (("sss", _linear_only(), _linear_only,
                                           r"push 'sss' \(recipe sss\) .* has neither; push 'hgs'"),
                                          ("sss_blocks", lenet, None,
                                           r"push 'sss_blocks' \(recipe sss-blocks\) .* LeNet5 has none; push 'sss'")):
        with pytest.raises(ValueError, match=message):
            GrowPushPrune(model, splits, recipes.build("sss", push=push), out_dir=tmp_path / push, progress=False,
                          factory=factory)
        assert not (tmp_path / push).exists()
    GrowPushPrune(models.build("lenet5", input_size=8), splits, recipes.build("sss"), out_dir=tmp_path / "l",
                  progress=False)   # its layers get explicit factors: accepted
    vgg = models.build("vgg", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="removes whole residual blocks"):   # its BatchNorm weights do not count
        GrowPushPrune(vgg, splits, recipes.build("sss", push="sss_blocks"), out_dir=tmp_path / "v", progress=False)
    GrowPushPrune(vgg, splits, recipes.build("sss"), out_dir=tmp_path / "v", progress=False)   # channels: accepted
    out = subprocess.run([sys.executable, "-m", "gpp_ext.cli", "compress", "--recipe", "sss", "--push", "sss_blocks",
                          "--model", "lenet5", "--data", "digits", "--quiet", "--threads", "1",
                          "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "(recipe sss-blocks) removes whole residual blocks" in out.stderr
    assert "Traceback" not in out.stderr


def test_named_blocks_keep_their_names_and_a_norm_without_affine_gets_no_scale():
    """Blocks in a Sequential of named children keep their names when others go (numbered ones are renumbered,
    as a rebuilt net numbers them); a block whose last norm is not affine has nothing to fold a scale into."""
    from collections import OrderedDict

    from gpp_ext.models import BasicBlock

    torch.manual_seed(0)
    stage = torch.nn.Sequential(OrderedDict(first=BasicBlock(4, 4), second=BasicBlock(4, 4),
                                            third=BasicBlock(4, 4)))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), stage).eval()
    stage.third.bn2 = torch.nn.BatchNorm2d(4, affine=False).eval()
    scales = BlockScales(model)
    assert [n for n, _ in scales.blocks] == ["2.first", "2.second"]
    with torch.no_grad():
        scales.blocks[1][1].block_scale.zero_()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        expected = model(x)
    assert scales.finish() == ["2.second"]
    assert [k for k, _ in stage.named_children()] == ["first", "third"]
    assert scales.scales() == {"2.first": 1.0, "2.second": 0.0}   # still readable after the fold
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="already finished"):
        scales.finish()


def test_sss_checks_its_schedule_and_needs_after_backward():
    splits = data.load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = models.build("resnet20", in_channels=1, num_classes=10, widths=(8, 16, 16))
    with pytest.raises(ValueError, match="schedule must be one of"):
        SparseStructureSelection(model, lam=1e-3, schedule="cosin")
    sss = SparseStructureSelection(model, lam=1e-3)
    with pytest.raises(RuntimeError, match="after_step ran without after_backward"):
        fit(model, splits.train, 0.05, seed=0, after_step=sss.after_step)
    assert sss.zero_blocks() == [] and sss.finish(delete=False) == [] and sss.zero_blocks() == []
