"""Criteria: how much each channel of each prunable group matters, and the registry that names them.

A criterion is any callable `criterion(graph, context) -> {group name: [group.size] scores}` (non-negative,
finite; higher means more useful; a group left out is kept whole). `prune`, the `gpp` command's `--criterion`
choices and the benchmarks all read the registry, so adding one is a function and one registration:

    from gpp_ext.pruning import criteria

    @criteria.register("l2")
    def l2(graph, context):
        \"\"\"L2 norm of each output filter.\"\"\"
        scores = {}
        for group in graph.groups:
            total = torch.zeros(group.size, dtype=torch.float64)
            for p in graph.channel_params(group.name):
                if p.role == "producer" and p.attr == "weight":
                    total += criteria.per_channel(p, p.tensor.detach().square()).sqrt()
            scores[group.name] = total
        return scores

The `context` (`CriterionContext`) carries what a criterion may need besides the graph: the training loader,
the device, the classifier's name, the number of classes, a seed, and lazily computed, cached analysis results
(the discriminant analysis of the pre-decision layer, tracing images, a first batch).

Built in:
- `lda`, `fisher`: the discriminant utility of docs/design.md §2.3-2.4: the pre-decision neurons are scored by
  the discriminant analysis (`lda`: eigenvalue-weighted discriminant loadings; `fisher`: per-neuron Fisher
  ratio), the top `context.neurons` of them are kept, and their response is traced down the network by
  deconvolution (`trace_utility`) to score every channel group;
- `l1`: L1 norm of each output filter; `bn_scale`: |gamma| of the BatchNorm right after each layer (network
  slimming); `taylor`: first-order Taylor importance |activation x gradient|; `random`: the floor every
  criterion must beat;
- `group_fisher`: the Fisher information of each coupled channel group's mask per unit of cost its removal saves
  (Liu et al., ICML 2021; `group_fisher.py`);
- `loss_increase`: the rise of the training loss when each channel alone is silenced (`hgs.py`).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..analysis import DiscriminantAnalyzer, LayerAnalysis
from ..classifier import find_classifier
from ..layers import BATCH_NORMS
from ..training import labelled_batches
from .graph import ChannelGraph, ChannelParam
from .taps import check_unchanged, inplace_after, per_sample, tap
from .trace import trace_utility

__all__ = ["CriterionContext", "check_neurons", "register", "unregister", "get", "names", "describe", "resolve",
           "per_channel", "lda", "fisher", "l1", "bn_scale", "taylor", "random"]


# ------------------------------------------------------------------------------------------------ context

@dataclass
class CriterionContext:
    """What a criterion may use besides the graph. Every field is optional; a criterion that needs one that is
    missing says so.

    Attributes:
        loader: yields `(inputs, labels)` batches of the task's training data.
        device: where batches go (the model's device).
        classifier: the final classifier's module name (default: `gpp_ext.classifier.find_classifier`).
        num_classes: number of classes (default: the classifier's `out_features`).
        seed: seed of randomised criteria.
        neurons: pre-decision neurons whose response the discriminant criteria trace: a count (int) or a
            fraction of the pre-decision width (float in (0, 1]).
        tracing_per_class: tracing images per class.
        max_batches: at most this many batches for the analysis (default: the whole loader).
        progress: progress bars on the long passes.
        cost_kind: what a cost-normalised criterion (`group_fisher`) divides by: "flops" or "params" (`prune`
            passes its budget's kind).
        notes: what a criterion reports back (e.g. `notes["neurons"]`, the pre-decision neurons it kept);
            `prune` copies it into its report.
        seconds: wall time per phase (`timed`): "analysis", "solve", "trace", ...; `prune` reports it.
    """

    loader: object = None
    device: torch.device | str = "cpu"
    classifier: str | None = None
    num_classes: int | None = None
    seed: int = 0
    neurons: int | float = 0.5
    tracing_per_class: int = 4
    max_batches: int | None = None
    progress: bool = False
    cost_kind: str = "flops"
    notes: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Adds the wall time of the block to `seconds[phase]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def _need_loader(self, what: str):
        if self.loader is None:
            raise ValueError(f"criterion: {what} needs training data; give the context a loader of (inputs, "
                             f"labels) batches")
        return self.loader

    def classifier_of(self, graph: ChannelGraph) -> str:
        """The classifier's module name in `graph.model`."""
        return self.classifier or find_classifier(graph.model)

    def classes_of(self, graph: ChannelGraph) -> int:
        """The number of classes: `num_classes`, else the classifier's `out_features`."""
        if self.num_classes:
            return self.num_classes
        return dict(graph.model.named_modules())[self.classifier_of(graph)].out_features

    def analyzer(self, graph: ChannelGraph) -> DiscriminantAnalyzer:
        """The discriminant analysis of the pre-decision layer (the classifier's input) over the loader; run once
        and cached (its hooks are removed, its statistics stay)."""
        if "analyzer" not in self._cache:
            layer = self.classifier_of(graph) + ":input"
            with self.timed("analysis"), \
                    DiscriminantAnalyzer(graph.model, self.classes_of(graph), layers=[layer]) as analyzer:
                analyzer.run(self._need_loader("the discriminant analysis"), max_batches=self.max_batches,
                             progress=self.progress, device=self.device)
            if analyzer.num_samples == 0:
                raise ValueError("criterion: the loader yielded no samples to analyse; give it (inputs, labels) "
                                 "batches of the task's training data")
            self._cache["analyzer"] = analyzer
        return self._cache["analyzer"]

    def analysis(self, graph: ChannelGraph) -> LayerAnalysis:
        """Everything the analysis derives for the pre-decision layer (statistics, discriminants, utilities)."""
        if "analysis" not in self._cache:
            self._cache["analysis"] = next(iter(self.analyzer(graph).results().values()))
        return self._cache["analysis"]

    def utility(self, graph: ChannelGraph, kind: str = "lda") -> torch.Tensor:
        """Per-neuron utility `[D]` float64 of the pre-decision layer: "lda" or "fisher"."""
        analyzer = self.analyzer(graph)
        with self.timed("solve"):
            return analyzer.utility(kind=kind)

    def batch(self):
        """The loader's first `(inputs, labels)` batch, on `device`."""
        if "batch" not in self._cache:
            self._cache["batch"] = next(iter(labelled_batches(self._need_loader("this criterion"), self.device)))
        return self._cache["batch"]

    def tracing_images(self, graph: ChannelGraph) -> torch.Tensor:
        """`tracing_per_class` images of every class, from the first batches of the loader: at most
        `max_batches` of them (the analysis' limit), so an endless loader that lacks a class still ends; the
        classes never seen are noted in `notes["untraced_classes"]`."""
        if "tracing" not in self._cache:
            num_classes, per_class = self.classes_of(graph), self.tracing_per_class
            picked = {c: [] for c in range(num_classes)}
            for i, (x, y) in enumerate(labelled_batches(self._need_loader("tracing"), self.device)):
                for c in range(num_classes):
                    have = picked[c]
                    if len(have) < per_class:
                        have.extend(x[y == c][: per_class - len(have)])
                if all(len(v) >= per_class for v in picked.values()):
                    break
                if self.max_batches is not None and i + 1 >= self.max_batches:
                    break
            images = [img for imgs in picked.values() for img in imgs]
            if not images:
                raise ValueError("prune: the loader yielded no images to trace")
            missing = [c for c, imgs in picked.items() if not imgs]
            if missing:
                self.notes["untraced_classes"] = missing
            self._cache["tracing"] = torch.stack(images)
        return self._cache["tracing"]

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (a fresh one each call)."""
        return torch.Generator().manual_seed(self.seed)


# ----------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class _Entry:
    name: str
    fn: object
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def _summary(fn) -> str:
    doc = inspect.getdoc(fn) or inspect.getdoc(getattr(type(fn), "__call__", None)) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def register(name: str, fn=None, *, overwrite: bool = False):
    """Registers `fn(graph, context) -> {group: scores}` as criterion `name`; usable as a decorator
    (`@register("mine")`) or a call (`register("mine", fn)`). Returns `fn`.

    Names are non-empty strings without spaces; registering a taken name raises `ValueError` unless
    `overwrite=True`. The first paragraph of `fn`'s docstring is the description `gpp criteria` prints.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"criteria.register: name must be a non-empty string without spaces, got {name!r}")

    def add(fn):
        if not callable(fn):
            raise TypeError(f"criteria.register: criterion {name!r} must be callable (graph, context) -> scores, "
                            f"got {type(fn).__name__}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name].fn is not fn:
            raise ValueError(f"criteria.register: a criterion named {name!r} is registered already; pass "
                             f"overwrite=True to replace it")
        _REGISTRY[name] = _Entry(name, fn, _summary(fn))
        return fn

    return add if fn is None else add(fn)


def unregister(name: str) -> None:
    """Removes criterion `name` (a no-op when it is not registered)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """The registered criteria, in registration order (the built-in ones first)."""
    return list(_REGISTRY)


def describe() -> dict[str, str]:
    """`{name: one-line description}` of every registered criterion."""
    return {name: entry.summary for name, entry in _REGISTRY.items()}


def get(name: str):
    """The criterion registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"prune: criterion must be one of {tuple(_REGISTRY)} (or a callable (graph, context) -> "
                         f"scores), got {name!r}")
    return _REGISTRY[name].fn


def resolve(criterion) -> tuple[str, object]:
    """`(name, callable)` of a criterion given by registered name or as a callable."""
    if callable(criterion):
        return getattr(criterion, "__name__", type(criterion).__name__), criterion
    if isinstance(criterion, str):
        return criterion, get(criterion)
    raise TypeError(f"prune: criterion must be a registered name (one of {tuple(_REGISTRY)}) or a callable "
                    f"(graph, context) -> scores, got {type(criterion).__name__}")


# --------------------------------------------------------------------------------------------- helpers

def per_channel(param: ChannelParam, values: torch.Tensor) -> torch.Tensor:
    """A group's `[size]` float64 scores from per-element `values` shaped like `param.tensor`: each position
    along `param.dim` is reduced by a sum over the other dimensions, and a channel adds up its positions."""
    reduced = values.detach().movedim(param.dim, 0).reshape(values.shape[param.dim], -1).sum(1)
    return reduced.double().cpu()[param.index].sum(1)


def _producer_weights(graph: ChannelGraph, name: str) -> list[ChannelParam]:
    return [p for p in graph.channel_params(name) if p.role == "producer" and p.attr == "weight"]


# ---------------------------------------------------------------------------------------- the criteria

def check_neurons(neurons, where: str = "prune") -> None:
    """`neurons` is a count (int >= 1) or a fraction (float in (0, 1]) of the pre-decision neurons."""
    if isinstance(neurons, bool) or not isinstance(neurons, (int, float)):
        raise TypeError(f"{where}: neurons must be a count (int >= 1) or a fraction (float in (0, 1]) of the "
                        f"pre-decision neurons, got {type(neurons).__name__} {neurons!r}")
    if isinstance(neurons, int) and neurons < 1 or isinstance(neurons, float) and not 0 < neurons <= 1:
        raise ValueError(f"{where}: neurons must be a count (int >= 1) or a fraction (float in (0, 1]) of the "
                         f"pre-decision neurons, got {neurons!r}")


def _discriminant(graph: ChannelGraph, context: CriterionContext, kind: str) -> dict:
    check_neurons(context.neurons, f"criterion {kind!r}")
    counts = context.analyzer(graph).stats().count
    present = (counts > 0).nonzero().flatten().tolist()
    if len(present) < 2:
        seen = f"only class {present[0]}" if present else "no labelled samples"
        raise ValueError(f"criterion {kind!r}: the loader holds {seen} ({int(counts.sum())} samples); a "
                         f"discriminant needs samples of at least 2 classes. Give prune a loader of the task's "
                         f"training data with every class (or a criterion that needs no labels, e.g. 'l1')")
    utility = context.utility(graph, kind)
    if not bool(utility.any()):
        raise ValueError(f"criterion {kind!r}: every pre-decision neuron has zero discriminant utility (constant "
                         f"features?), so there is nothing to rank channels by; check the model is trained and "
                         f"its inputs vary, or use a criterion such as 'l1'")
    width = utility.numel()
    neurons = context.neurons
    count = neurons if isinstance(neurons, int) else int(round(float(neurons) * width))
    if not 1 <= count <= width:
        raise ValueError(f"prune: neurons must keep between 1 and {width} pre-decision neurons, got {neurons}")
    context.notes["neurons"] = count
    selected = torch.sort(utility, descending=True, stable=True).indices[:count]
    weights = torch.zeros(width, dtype=torch.float64)
    weights[selected] = 1.0
    with context.timed("trace"):
        images = context.tracing_images(graph)
        return trace_utility(graph, images, weights.float().to(images.device),
                             classifier=context.classifier_of(graph))


@register("lda")
def lda(graph: ChannelGraph, context: CriterionContext) -> dict:
    """Discriminant utility: the top pre-decision neurons by their LDA loadings, traced down by deconvolution.

    The pre-decision neurons are scored by `sum_j lambda_j |e_j|` over the discriminants of the analysis, the
    top `context.neurons` are kept, and their response is traced to every group (`trace_utility`)."""
    return _discriminant(graph, context, "lda")


@register("fisher")
def fisher(graph: ChannelGraph, context: CriterionContext) -> dict:
    """Discriminant utility from per-neuron Fisher ratios at the pre-decision layer, traced by deconvolution.

    Like `lda` with `S_b[j,j] / S_w[j,j]` as the neuron score: cheap, and right when the scatter matrices are
    near diagonal."""
    return _discriminant(graph, context, "fisher")


@register("l1")
def l1(graph: ChannelGraph, context: CriterionContext | None = None) -> dict:
    """L1 norm of each output filter (summed over a group's coupled layers)."""
    out = {}
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for p in _producer_weights(graph, group.name):
            total += per_channel(p, p.tensor.detach().abs())
        out[group.name] = total
    return out


@register("bn_scale")
def bn_scale(graph: ChannelGraph, context: CriterionContext | None = None) -> dict:
    """|gamma| of the BatchNorm right after each layer (network slimming).

    A layer without one uses the L1 norm of its filters scaled to mean 1, so that a mixed network still ranks
    its channels sensibly; a group with no signal at all falls back to `l1`."""
    l1_scores = l1(graph)
    out = {}
    for group in graph.groups:
        params = graph.channel_params(group.name)
        total = torch.zeros(group.size, dtype=torch.float64)
        for producer in (p for p in params if p.role == "producer" and p.attr == "weight"):
            # the BatchNorm applied to this layer's output and to nothing else
            gamma = next((p for p in params if p.role == "norm" and p.attr == "weight" and p.member == producer.module
                          and isinstance(graph.modules[p.module], BATCH_NORMS)
                          and p.index.numel() == p.tensor.shape[p.dim]), None)
            if gamma is not None:
                total += per_channel(gamma, gamma.tensor.detach().abs())
            else:
                w = per_channel(producer, producer.tensor.detach().abs())
                total += w / w.mean().clamp_min(1e-12)
        out[group.name] = total if total.any() else l1_scores[group.name]
    return out


@register("taylor")
def taylor(graph: ChannelGraph, context: CriterionContext, loss_fn=None) -> dict:
    """First-order Taylor importance (Molchanov et al.): |activation x gradient of the loss| per channel.

    On the context's first batch: per channel, the batch mean of |sum over positions of activation x gradient|
    at the layer's output, summed over a group's layers."""
    inputs, labels = context.batch()
    loss_fn = loss_fn or nn.functional.cross_entropy
    model = graph.model
    outputs = {}
    handles = []
    names_ = {name for group in graph.groups for name in group.modules}
    copies = {name: inplace_after(graph, name) for name in names_}
    for name in names_:
        def hook(m, args, out, name=name):
            if out.requires_grad:  # layers whose parameters are frozen and inputs constant carry no gradient
                entry, output = tap(out, copies[name])
                outputs.setdefault(name, []).append(entry)
                return output
        handles.append(graph.modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels).backward()
        scores = {}
        for name, outs in outputs.items():  # every call of a layer used more than once counts
            for value, version, grad in outs:
                if grad is None:
                    continue
                check_unchanged("taylor", name, value, version)
                prod = per_sample(graph.modules[name], value * grad)   # [N, channels], wherever the channels are
                scores[name] = scores.get(name, 0) + prod.abs().mean(0).double()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()
    result = {}
    for group in graph.groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for p in _producer_weights(graph, group.name):
            if p.module in scores:
                total += scores[p.module][p.index].sum(1)
        result[group.name] = total
    return result


@register("random")
def random(graph: ChannelGraph, context: CriterionContext | None = None) -> dict:
    """Uniform random scores, seeded by `context.seed`: the floor every criterion must beat."""
    generator = (context or CriterionContext()).generator()
    return {g.name: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in graph.groups}


def _register_group_fisher():
    from .group_fisher import group_fisher

    @register("group_fisher")
    def group_fisher_criterion(graph: ChannelGraph, context: CriterionContext) -> dict:
        """Group Fisher (Liu et al. 2021): the Fisher information of each coupled group's channel mask,
        accumulated over batches, per unit of FLOPs (or parameters) its removal saves."""
        return group_fisher(graph, context)


_register_group_fisher()


def _register_loss_increase():
    from .hgs import loss_increase

    @register("loss_increase")
    def loss_increase_criterion(graph: ChannelGraph, context: CriterionContext) -> dict:
        """The rise of the training loss on randomly drawn samples when each channel alone is silenced
        (Mitsuno & Kurita's selection after hierarchical group-sparse training)."""
        return loss_increase(graph, context)


_register_loss_increase()
