"""The one rule that finds a model's final classifier, and the pre-decision layer that feeds it.

Every part of gpp_ext that needs "the classifier" asks here: the analysis (which analyses the classifier's
input), the push loss's tap (which captures it during training), the deconvolution tracing (which starts from
the fx node feeding it), the criteria and the benchmarks (which must not prune its outputs). The module is
chosen once by `find_classifier`; the fx node (`pre_decision_node`) and the tap (`PreDecisionTap`) are derived
from that module, so the three agree by construction.

The rule: `model.classifier` when it is an `nn.Linear`, otherwise the last `nn.Linear` the forward pass calls
(found by tracing the model with torch.fx, so a head declared before a projection layer is still the head);
for a model torch.fx cannot trace, the last `nn.Linear` in `model.named_modules()` order. The pre-decision layer
is the input of the classifier's (last) call.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx
import torch.nn as nn

__all__ = ["find_classifier", "classifier_node", "pre_decision_node", "PreDecisionTap"]


def find_classifier(model: nn.Module) -> str:
    """The module name of `model`'s final classifier (see the module docstring for the rule).

    Raises `ValueError` when the model has no `nn.Linear`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_classifier: model must be an nn.Module, got {type(model).__name__}")
    candidate = getattr(model, "classifier", None)
    if isinstance(candidate, nn.Linear):
        return next(n for n, m in model.named_modules() if m is candidate)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot find the final classifier of {type(model).__name__}: the model has no nn.Linear "
                         f"(nor a `classifier` attribute that is one); name the layer to analyse explicitly, e.g. "
                         f"DiscriminantAnalyzer(model, C, layers=['head:input']), or classifier='<module name>'")
    key = tuple((n, id(m)) for n, m in linears)
    cached = _LAST_CALLED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    name = _last_linear_called(model, {n for n, _ in linears}) or linears[-1][0]
    _LAST_CALLED[model] = (key, name)
    return name


# model -> (its linear layers, the name found): tracing is done once per model and layer set
_LAST_CALLED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _last_linear_called(model: nn.Module, linears: set) -> str | None:
    """The last of `linears` the traced forward pass calls, or None when torch.fx cannot trace the model."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow and the like: fall back to declaration order
        return None
    called = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in linears]
    return called[-1] if called else None


def classifier_node(gm: torch.fx.GraphModule, classifier: str) -> torch.fx.Node:
    """The fx node of the last call of the module `classifier` in a traced model."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == classifier]
    if not calls:
        raise ValueError(f"the classifier {classifier!r} is never called in the traced forward pass of "
                         f"{type(gm).__name__}; pass classifier=<name of the final linear layer>")
    module = gm.get_submodule(classifier)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the classifier {classifier!r} is a {type(module).__name__}, not an nn.Linear; pass "
                         f"classifier=<name of the final linear layer>")
    return calls[-1]


def pre_decision_node(gm: torch.fx.GraphModule, classifier: str) -> torch.fx.Node:
    """The fx node whose value is the classifier's input: the pre-decision features."""
    node = classifier_node(gm, classifier)
    source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(source, torch.fx.Node):
        raise ValueError(f"the classifier {classifier!r} is not called on a tensor computed by the model")
    return source


class PreDecisionTap:
    """Captures the input of a model's final classifier (its pre-decision features) on every forward pass.

        with PreDecisionTap(model) as tap:
            logits = model(x)
            loss = push(logits, tap.features, y)

    `classifier` names the module (default: `find_classifier(model)`).
    """

    def __init__(self, model: nn.Module, classifier: str | None = None):
        self.classifier = classifier or find_classifier(model)
        modules = dict(model.named_modules())
        if self.classifier not in modules:
            raise ValueError(f"PreDecisionTap: {type(model).__name__} has no module {self.classifier!r}")
        self.features = None
        self._handle = modules[self.classifier].register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.features = args[0]

    def __deepcopy__(self, memo):
        # A model copied while tapped (e.g. to measure a candidate cut) carries the hook along; its copy of the
        # tap records nothing from here, and the features of a training step (not graph leaves) are not copied.
        twin = PreDecisionTap.__new__(PreDecisionTap)
        twin.classifier, twin.features, twin._handle = self.classifier, None, None
        return twin

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
