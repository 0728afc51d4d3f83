"""Built-in classifiers: LeNet-5, a small VGG, a growable Inception net and ResNet-20.

All are plain PyTorch modules written for structural pruning:

- the last module called is `model.classifier`, an `nn.Linear` whose output is the model's output; its input
  is the pre-decision layer, also returned by `model.pre_decision(x)`;
- every width is a constructor argument and `model.spec()` reads the widths back from the weights, so a
  pruned (or grown) model is rebuilt with `build(spec["name"], **spec["kwargs"])` and its state dict loaded;
- `forward` holds no channel counts and no data-dependent control flow, so `torch.fx.symbolic_trace` works
  and a graph-based pruner can change widths without touching Python code.

Input shapes: [B, C, H, W] images (1x28x28 MNIST-like, 3x32x32 CIFAR-like, 1x8x8 digits for LeNet-5 with
`input_size=8`); output: logits [B, num_classes].
"""

from __future__ import annotations

from torch import nn

from .inception import InceptionModule, InceptionNet
from .lenet import LeNet5
from .resnet import BasicBlock, ResNet, ResNet20
from .sources import build_source, load_weights, spec_of
from .vgg import VGGSmall

MODELS = {"lenet5": LeNet5, "vgg": VGGSmall, "inception": InceptionNet, "resnet20": ResNet20}

__all__ = ["MODELS", "build", "build_source", "spec_of", "load_weights", "LeNet5", "VGGSmall", "InceptionModule",
           "InceptionNet", "BasicBlock", "ResNet", "ResNet20"]


def build(name: str, **kwargs) -> nn.Module:
    """A fresh model from the registry: `build("vgg", widths=[16, "M", 32, "M"])`, or from a source
    (`build("torchvision:resnet18", num_classes=10)`, `build("net.py:make")`; see `gpp_ext.models.sources`).

    `build(spec["name"], **spec["kwargs"])` rebuilds the architecture of `spec_of(model)` (weights are not
    part of a spec). Unknown names raise ValueError listing the known ones.
    """
    if ":" in name:
        return build_source(name, kwargs=kwargs)
    if name not in MODELS:
        raise ValueError(f"build: unknown model name {name!r}; known models: {', '.join(sorted(MODELS))}")
    import inspect

    parameters = inspect.signature(MODELS[name]).parameters.values()
    accepted = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters)   # a registered model taking **kwargs
    unknown = [] if open_ended else sorted(set(kwargs) - {p.name for p in accepted})
    described = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in accepted)
    if unknown:
        raise ValueError(f"build: model {name!r} takes no argument{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                         f"(gpp: --model-args); it takes {described}")
    try:
        return MODELS[name](**kwargs)
    except (TypeError, ValueError) as error:  # a value of the wrong type or range, named by the model's own check
        raise ValueError(f"build: model {name!r} refused its arguments {kwargs} ({type(error).__name__}: {error}); "
                         f"it takes {described}") from error
