"""Built-in models: shapes, fx-traceability, the classifier as the last call, spec round trips, growing."""

import json

import pytest
import torch
from torch import nn

from gpp_ext.models import MODELS, InceptionNet, LeNet5, ResNet20, build

# (registry name, constructor kwargs, input shape without the batch)
CASES = [
    ("lenet5", {}, (1, 28, 28)),
    ("lenet5", {"input_size": 32, "in_channels": 3}, (3, 32, 32)),
    ("lenet5", {"input_size": 8}, (1, 8, 8)),
    ("vgg", {}, (1, 28, 28)),
    ("vgg", {"widths": [8, "M", 12, 12, "M"], "batch_norm": False, "dropout": 0.5}, (1, 28, 28)),
    ("inception", {}, (1, 28, 28)),
    ("inception", {"stages": [[[4, 4, 6, 2, 3, 2], [5, 3, 4, 2, 3, 1, 7]]], "pool_between": False}, (1, 28, 28)),
    ("resnet20", {}, (3, 32, 32)),
    ("resnet20", {"widths": [8, 12], "blocks_per_stage": [1, 2], "mid_widths": [[5], [3, 7]]}, (3, 32, 32)),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def make(name, kwargs):
    return build(name, num_classes=7, **kwargs).eval()


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_forward_shape_and_fx_trace(name, kwargs, shape):
    model = make(name, kwargs)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    assert model.pre_decision(x).shape == (2, model.classifier.in_features)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_classifier_is_last_call_and_gives_the_output(name, kwargs, shape):
    model = make(name, kwargs)
    assert isinstance(model.classifier, nn.Linear)
    calls, outputs = [], {}

    def record(module_name):
        def hook(module, inputs, output):
            calls.append(module_name)
            outputs[module_name] = output
        return hook

    for module_name, module in model.named_modules():
        if module_name:
            module.register_forward_hook(record(module_name))
    x = torch.randn(2, *shape)
    out = model(x)
    assert calls[-1] == "classifier"
    assert calls.count("classifier") == 1
    assert outputs["classifier"] is out


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_spec_round_trip(name, kwargs, shape):
    model = make(name, kwargs)
    spec = json.loads(json.dumps(model.spec()))  # plain, JSON-serialisable types
    assert spec["name"] == name and MODELS[name].registry_name == name
    rebuilt = build(spec["name"], **spec["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, *shape)
    torch.testing.assert_close(rebuilt.eval()(x), model(x))
    assert rebuilt.spec() == spec


def test_spec_reads_pruned_widths_from_the_weights():
    # what a structural pruner leaves behind: layers with fewer channels than the constructor asked for
    model = LeNet5()
    model.conv2 = nn.Conv2d(6, 10, 5)
    model.fc1 = nn.Linear(10 * 5 * 5, 60)
    model.fc2 = nn.Linear(60, 84)
    spec = model.spec()
    assert spec["kwargs"]["conv2"] == 10 and spec["kwargs"]["fc1"] == 60
    rebuilt = build(spec["name"], **spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())


def test_resnet20_parameter_count():
    model = ResNet20()
    count = sum(p.numel() for p in model.parameters())
    assert 0.26e6 <= count <= 0.28e6
    # option B: projections only where a stage starts with stride 2
    projections = [name for name, m in model.named_modules()
                   if name.endswith("shortcut") and not isinstance(m, nn.Identity)]
    assert projections == ["stages.1.0.shortcut", "stages.2.0.shortcut"]


def test_inception_add_module_keeps_widths_and_weights():
    model = InceptionNet(num_classes=5).eval()
    before = sum(p.numel() for p in model.parameters())
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    module = model.add_module_to_stage(0)
    assert module.widths == model.stages[0][0].widths and module.in_channels == module.out_channels
    assert len(model.stages[0]) == 2
    assert sum(p.numel() for p in model.parameters()) > before
    for key, value in old_state.items():  # warm start: every existing weight kept
        assert torch.equal(model.state_dict()[key], value)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 5)
    torch.fx.symbolic_trace(model)
    assert len(build("inception", **model.spec()["kwargs"]).stages[0]) == 2


@pytest.mark.parametrize("stage_index", [0, -1])
def test_inception_add_module_with_new_width_rewires_the_consumer(stage_index):
    model = InceptionNet().eval()
    module = model.add_module_to_stage(stage_index, widths=(4, 4, 4, 4, 4, 4))
    assert module.out_channels == 16
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    consumer_in = model.stages[1][0].in_channels if stage_index == 0 else model.classifier.in_features
    assert consumer_in == 16
    rebuilt = build(model.spec()["name"], **model.spec()["kwargs"])
    rebuilt.load_state_dict(model.state_dict())


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model name 'alexnet'.*inception, lenet5, resnet20, vgg"):
        build("alexnet")


@pytest.mark.parametrize("name,kwargs,match", [
    ("lenet5", {"input_size": 3}, "LeNet5: input_size"),
    ("lenet5", {"fc1": 0}, "LeNet5: fc1 must be >= 1"),
    ("vgg", {"widths": [16, "X"]}, r"VGGSmall: widths\[1\]"),
    ("vgg", {"widths": ["M"]}, "at least one conv"),
    ("inception", {"stages": [[[1, 2, 3]]]}, r"stages\[0\]\[0\] must be 6 widths"),
    ("resnet20", {"blocks_per_stage": [1, 2]}, "blocks_per_stage must be an int or one count per stage"),
])
def test_invalid_widths_name_the_argument(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(name, **kwargs)


def test_an_argument_a_built_in_model_does_not_take_is_named_with_those_it_takes():
    """`--model-args '{"width": 3}'` for LeNet-5: a ValueError (the command line's exit 2, not a traceback) naming
    the argument and listing the model's own with their defaults."""
    with pytest.raises(ValueError, match=r"model 'lenet5' takes no argument width \(gpp: --model-args\); it takes "
                                         r"in_channels=1, num_classes=10, input_size=28, conv1=6"):
        build("lenet5", width=3)
    with pytest.raises(ValueError, match=r"model 'lenet5' refused its arguments .*conv1 must be an int.*it takes"):
        build("lenet5", conv1="a")
