"""`DiscriminantAnalyzer`: streaming discriminant analysis of a model's activations, layer by layer.

It hooks chosen layers of any `nn.Module`, runs labelled data through the model, and keeps per layer only the
merged `ScatterStats` (`ops.class_scatter` of each batch, combined with `ops.merge_scatter`): memory is
`O(C·D + D²)` per layer whatever the number of samples, and the statistics can be saved, merged across runs or
all-reduced across processes exactly. From them it gives each layer's discriminants (`ops.generalized_eigh` of
`S_b` against `S_w`), per-neuron utilities (`lda`, `fisher`) and how diagonal the scatter matrices are, which
says whether the cheap `fisher` utility can be trusted.

Shapes: `N` samples in a batch, `D` features of a layer, `C` classes.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _checks, ops
from . import distributed as gdist
from .classifier import find_classifier
from .stats import ScatterStats

__all__ = ["DiscriminantAnalyzer", "LayerAnalysis"]

_NAME = "DiscriminantAnalyzer"
_INPUT = ":input"  # a layer name ending in this analyses the module's input (forward pre-hook), not its output
_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True, eq=False)
class LayerAnalysis:
    """Everything the analyzer derives for one layer of width `D`.

    Attributes:
        stats: the accumulated `ScatterStats` (`count [C]`, `mean [C, D]`, `within [D, D]`, float64).
        eigenvalues: `[D]` generalized eigenvalues of `S_b e = λ S_w e`, descending.
        eigenvectors: `[D, D]` discriminants as columns.
        lda_utility: `[D]` eigenvalue-weighted loadings of the top `k` discriminants.
        fisher_utility: `[D]` per-neuron Fisher ratio.
        diagonality: `{"within": float, "between": float}` mean |off-diagonal correlation| of `S_w` and `S_b`.
    """

    stats: ScatterStats
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    lda_utility: torch.Tensor
    fisher_utility: torch.Tensor
    diagonality: dict


class _Capture:
    """What the hooks write to. Kept apart from the analyzer so that the hooks, which the model holds on to,
    do not keep the analyzer (and its statistics) alive."""

    def __init__(self):
        self.active = False
        self.tensors: dict[str, list] = {}

    def hook(self, name: str, pre: bool):
        def record(value):
            if self.active:
                self.tensors.setdefault(name, []).append(value)

        if pre:
            return lambda module, args: record(args[0] if args else None)
        return lambda module, args, output: record(output)


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _find_classifier(model: nn.Module, num_classes: int) -> str:
    """`gpp_ext.classifier.find_classifier`, checked against the number of classes."""
    try:
        name = find_classifier(model)
    except ValueError as error:
        raise ValueError(f"{_NAME}: {error}") from None
    linear = dict(model.named_modules())[name]
    if linear.out_features != num_classes:
        raise ValueError(f"{_NAME}: the final classifier {name!r} (the last nn.Linear) has out_features="
                         f"{linear.out_features}, not num_classes={num_classes}; check num_classes, or pass "
                         f"layers=[...] naming the modules to analyse (e.g. layers=['{name}:input'] for the input "
                         f"of {name!r})")
    return name


def _layer_names(model: nn.Module, layers) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"{_NAME}: layers must be None or a non-empty list of module names (str), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{_NAME}: layers must not repeat a name, got {list(layers)}")
    modules = dict(model.named_modules())
    for name in layers:
        module_name = name[:-len(_INPUT)] if name.endswith(_INPUT) else name
        if module_name not in modules:
            valid = [n for n in modules if n]
            shown = ", ".join(repr(n) for n in valid[:8]) + (", ..." if len(valid) > 8 else "")
            raise ValueError(f"{_NAME}: layers names {name!r}, which is not a module of the model; valid names "
                             f"(from model.named_modules()) include {shown or 'none'}; append {_INPUT!r} to a name "
                             f"to analyse that module's input")
    return list(layers)


class DiscriminantAnalyzer:
    """Accumulates per-class scatter statistics of chosen layers over a data set and analyses them.

    Args:
        model: any `nn.Module` taking `model(inputs)`.
        num_classes: `C >= 1`; labels must lie in `[0, C)`.
        layers: `None` for the pre-decision layer, the input of the final classifier (`model.classifier` if it
            is an `nn.Linear`, else the last `nn.Linear` the forward pass calls: `gpp_ext.classifier` states the
            rule; it must have `out_features == num_classes`), analysed under the name
            `"<classifier name>:input"`. Otherwise a
            list of module names (as in `model.named_modules()`) whose outputs are analysed; a name ending in
            `":input"` analyses that module's input instead.
        reduce: how a feature map `[N, C, *spatial]` becomes one value per channel: `"mean"` (global average)
            or `"max"` (global max).
        spatial_samples: treat every spatial position of a feature map as a sample (`[N·H·W, C]`, labels
            repeated) instead of reducing it.
        ridge: default regulariser of the generalized eigen-solve, relative to `tr(S_w)/D`.

    The hooks record only inside `update` (and `run`), so the model behaves as usual otherwise; remove them
    with `close()` or by using the analyzer as a context manager. Statistics live in float64 on the device of
    the features they come from.
    """

    def __init__(self, model: nn.Module, num_classes: int, layers=None, reduce: str = "mean",
                 spatial_samples: bool = False, ridge: float = 1e-3):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.num_classes = _checks.integer(num_classes, _NAME, "num_classes", minimum=1)
        if reduce not in _REDUCTIONS:
            raise ValueError(f"{_NAME}: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        if not isinstance(spatial_samples, bool):
            raise TypeError(f"{_NAME}: spatial_samples must be a bool, got {type(spatial_samples).__name__}")
        self.model = model
        self.reduce = reduce
        self.spatial_samples = spatial_samples
        self.ridge = _checks.real(ridge, _NAME, "ridge")
        if layers is None:
            self._layers = [_find_classifier(model, self.num_classes) + _INPUT]
        else:
            self._layers = _layer_names(model, layers)
        self._stats: dict[str, ScatterStats | None] = {name: None for name in self._layers}
        self._num_samples = 0
        self._capture = _Capture()
        self._handles: list = []
        modules = dict(model.named_modules())
        for name in self._layers:
            if name.endswith(_INPUT):
                module = modules[name[:-len(_INPUT)]]
                handle = module.register_forward_pre_hook(self._capture.hook(name, pre=True))
            else:
                handle = modules[name].register_forward_hook(self._capture.hook(name, pre=False))
            self._handles.append(handle)
        # An analyzer dropped without close() must not leave its (inert) hooks on the model for ever.
        self._finalizer = weakref.finalize(self, _remove_hooks, self._handles)

    # ------------------------------------------------------------------------------------------- bookkeeping

    @property
    def layers(self) -> list[str]:
        """Names of the analysed layers, in the order given (results are keyed by them)."""
        return list(self._layers)

    @property
    def num_samples(self) -> int:
        """Number of inputs (rows of the labels) analysed so far; with `spatial_samples=True` the statistics
        count every spatial position, so their `count.sum()` is larger."""
        return self._num_samples

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Removes the hooks from the model. The statistics stay readable; `update` then raises."""
        self._finalizer()

    def __enter__(self) -> "DiscriminantAnalyzer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{_NAME}(layers={self._layers}, num_classes={self.num_classes}, num_samples={self._num_samples}, "
                f"reduce={self.reduce!r}, spatial_samples={self.spatial_samples}"
                f"{', closed' if self.closed else ''})")

    def _layer(self, layer, op: str) -> str:
        if layer is None:
            return self._layers[0]
        if layer not in self._stats:
            raise ValueError(f"{_NAME}.{op}: layer must be one of {self._layers}, got {layer!r}")
        return layer

    # ------------------------------------------------------------------------------------------ accumulation

    def _features(self, name: str, value, n: int):
        """A captured activation as `[N', D]` features and the number of rows per input (1, or H·W·...)."""
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{_NAME}: layer {name!r} produced a {type(value).__name__}, not a tensor; analyse a "
                            f"module whose {'input' if name.endswith(_INPUT) else 'output'} is one tensor")
        if not value.is_floating_point():
            raise TypeError(f"{_NAME}: layer {name!r} produced a {value.dtype} tensor; features must be "
                            f"floating point")
        if value.dim() < 2 or value.shape[0] != n:
            raise ValueError(f"{_NAME}: layer {name!r} produced shape {tuple(value.shape)}; expected [N, D] or "
                             f"[N, C, *spatial] with N = {n} (the batch size of the labels)")
        x = value.detach()
        if x.dim() == 2:
            return x, 1
        if self.spatial_samples:
            channels = x.shape[1]
            x = x.movedim(1, -1).reshape(-1, channels)  # [N, C, H, W] -> [N·H·W, C], sample-major
            return x, x.shape[0] // n if n else 1
        dims = tuple(range(2, x.dim()))
        # the spatial mean in float64: in float32 a large common offset (mean 3e4, spread 0.3) costs S_w ~1e-2
        return (x.mean(dims, dtype=torch.float64) if self.reduce == "mean" else x.amax(dims)), 1

    @staticmethod
    def _batch_size(inputs):
        if isinstance(inputs, torch.Tensor):
            return inputs.shape[0] if inputs.dim() else None
        if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
            return inputs[0].shape[0] if inputs[0].dim() else None
        return None

    def update(self, inputs, labels: torch.Tensor) -> "DiscriminantAnalyzer":
        """Runs `model(inputs)` and merges each layer's statistics of this batch into the running ones.

        Args:
            inputs: what the model takes, normally a tensor `[N, ...]` on the model's device.
            labels: `[N]` integer class labels in `[0, num_classes)` (any device).

        The pass runs under `torch.no_grad()` with the model in eval mode; every module's train/eval mode is
        restored afterwards. All layers are updated or none (an error leaves the statistics unchanged).
        Returns self.
        """
        if self.closed:
            raise RuntimeError(f"{_NAME}.update: the analyzer is closed (its hooks were removed); make a new one")
        labels = _checks.tensor(labels, f"{_NAME}.update", "labels")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"{_NAME}.update: labels must be an integer tensor of class labels, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"{_NAME}.update: labels must be 1-D [N], got shape {tuple(labels.shape)}")
        n = labels.shape[0]
        batch = self._batch_size(inputs)
        if batch is not None and batch != n:
            raise ValueError(f"{_NAME}.update: labels must hold one label per input, got {n} labels for a batch "
                             f"of {batch}")
        modes = [(module, module.training) for module in self.model.modules()]
        self._capture.tensors = {}
        self._capture.active = True
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(inputs)
            captured, self._capture.tensors = self._capture.tensors, {}
        finally:
            self._capture.active = False
            self._capture.tensors = {}
            for module, training in modes:
                module.training = training
        fresh = {}
        for name in self._layers:
            values = captured.get(name, [])
            if len(values) != 1:
                raise RuntimeError(f"{_NAME}.update: layer {name!r} ran {len(values)} times in one forward pass; "
                                   f"analyse a module that runs exactly once per pass")
            x, repeat = self._features(name, values[0], n)
            y = labels.to(x.device, non_blocking=True)
            if repeat != 1:
                y = y.repeat_interleave(repeat)
            fresh[name] = ops.class_scatter(x, y, self.num_classes)
        for name, new in fresh.items():
            old = self._stats[name]
            if old is None:
                old = ScatterStats.empty(self.num_classes, new.dim, device=new.mean.device)
            elif old.dim != new.dim:
                raise ValueError(f"{_NAME}.update: layer {name!r} now has {new.dim} features, its statistics "
                                 f"{old.dim}")
            elif old.mean.device != new.mean.device:
                old = old.to(new.mean.device)  # statistics follow the features' device
            fresh[name] = ops.merge_scatter(old, new)
        self._stats.update(fresh)
        self._num_samples += n
        return self

    def run(self, loader, max_batches: int | None = None, progress: bool = True,
            device=None, distributed: bool | None = None) -> "DiscriminantAnalyzer":
        """Streams a data set through `update`.

        Args:
            loader: an iterable of `(inputs, labels)` pairs (e.g. a `DataLoader`), inputs `[B, ...]`, labels `[B]`.
            max_batches: stop after this many batches (default: all; per process when distributed).
            progress: show a tqdm progress bar ("analysing"; on rank 0 only when distributed).
            device: where batches are moved before the forward pass (default: the device of the model's first
                parameter or buffer, else CPU).
            distributed: analyse the data across the processes of `torch.distributed` (default: whenever a
                process group of more than one process is initialised, e.g. under `torchrun`). Each process
                then analyses its own share of the data and the statistics of this run are combined exactly
                (`gpp_ext.distributed.all_reduce_scatter`), identical on every process. A `DataLoader` with a
                plain sampler is split by `gpp_ext.distributed.ShardSampler` (every sample once); one with a
                `DistributedSampler` or `ShardSampler` is used as it is; any other loader must already yield a
                disjoint part of the data on each process. Every process must call `run`.

        Returns self.
        """
        if max_batches is not None:
            max_batches = _checks.integer(max_batches, f"{_NAME}.run", "max_batches", minimum=0)
        if distributed is None:
            distributed = gdist.is_distributed()
        elif distributed and not gdist.is_distributed():
            raise RuntimeError(f"{_NAME}.run: distributed=True needs an initialised torch.distributed process group "
                               f"of more than one process (torchrun, or init_process_group)")
        if not distributed:
            return self._run(loader, max_batches, progress, device)
        sharded = gdist.shard_loader(loader)
        if sharded is None:
            warnings.warn(f"{_NAME}.run: cannot split a {type(loader).__name__} over the processes (it is not a "
                          f"DataLoader with a plain sampler); its statistics are combined as if each process's "
                          f"loader yielded a disjoint part of the data", RuntimeWarning, stacklevel=2)
            sharded = loader
        # Only this run's statistics are combined across processes: what the analyzer held before is already
        # the same everywhere (or local by the user's choice) and is merged back afterwards.
        before, before_samples = self._stats, self._num_samples
        self._stats, self._num_samples = {name: None for name in self._layers}, 0
        try:
            self._run(sharded, max_batches, progress and gdist.rank() == 0, device)
            self.all_reduce()
        except BaseException:
            self._stats, self._num_samples = before, before_samples
            raise
        for name, old in before.items():
            if old is not None:
                new = self._stats[name]
                self._stats[name] = old if new is None else ops.merge_scatter(old, new.to(old.mean.device))
        self._num_samples += before_samples
        return self

    def all_reduce(self, group=None) -> "DiscriminantAnalyzer":
        """Combines the statistics every process has accumulated into those of all their data, exactly and
        identically on every process (`gpp_ext.distributed.all_reduce_scatter`; every process must call it, once
        per disjoint set of samples). `run` does this by itself when distributed. Without a process group it does
        nothing. Returns self."""
        if not gdist.is_distributed(group):
            return self
        # A process that saw no data does not know a layer's width: agree on it first (one small all-reduce).
        dims = torch.tensor([-1 if s is None else s.dim for s in self._stats.values()], dtype=torch.float64)
        device = next((s.mean.device for s in self._stats.values() if s is not None), None)
        device = _model_device(self.model) if device is None else device
        dims = gdist.all_reduce_max(dims, group)
        reduced = {}
        for (name, stats), dim in zip(self._stats.items(), dims.tolist()):
            if dim < 0:
                reduced[name] = None  # no process has data for this layer
                continue
            local = stats if stats is not None else ScatterStats.empty(self.num_classes, int(dim), device=device)
            reduced[name] = gdist.all_reduce_scatter(local, group)
        self._stats = reduced
        self._num_samples = int(gdist.all_reduce_sum(torch.tensor([float(self._num_samples)]), group)[0])
        return self

    def _run(self, loader, max_batches, progress, device) -> "DiscriminantAnalyzer":
        if device is None:
            device = _model_device(self.model)
        try:
            total = len(loader)
        except TypeError:
            total = None
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        if max_batches == 0:
            return self
        with tqdm(loader, total=total, desc="analysing", disable=None if progress else True) as bar:
            for i, batch in enumerate(bar):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(f"{_NAME}.run: loader must yield (inputs, labels) pairs, got "
                                    f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                                 if isinstance(batch, (tuple, list)) else ""))
                inputs, labels = batch
                self.update(_to_device(inputs, device), _to_device(labels, device))
                if max_batches is not None and i + 1 >= max_batches:
                    break
        return self

    # --------------------------------------------------------------------------------------------- analysis

    def stats(self, layer: str | None = None) -> ScatterStats:
        """The accumulated statistics of `layer` (default: the first): `count [C]`, `mean [C, D]`,
        `within [D, D]`, float64. Raises RuntimeError before any data has been analysed."""
        name = self._layer(layer, "stats")
        stats = self._stats[name]
        if stats is None or stats.num_samples == 0:
            raise RuntimeError(f"{_NAME}: no data analysed yet for layer {name!r}; call update(inputs, labels) or "
                               f"run(loader) first")
        return stats

    def discriminants(self, layer: str | None = None, ridge: float | None = None):
        """Generalized eigenvectors of `S_b e = λ (S_w + r·I) e`, `r = ridge·tr(S_w)/D`.

        Returns `(eigenvalues [D], eigenvectors [D, D])` float64, eigenvalues descending (at most `C - 1`
        non-zero), discriminants as columns normalised so that `E^T (S_w + r I) E = I`. `ridge` defaults to the
        analyzer's.
        """
        stats = self.stats(layer)
        ridge = self.ridge if ridge is None else _checks.real(ridge, f"{_NAME}.discriminants", "ridge")
        return ops.generalized_eigh(stats.between(), stats.within, ridge)

    def _k(self, k, dim: int) -> int:
        if k is None:
            return min(self.num_classes - 1, dim)
        k = _checks.integer(k, f"{_NAME}.utility", "k", minimum=0)
        if k > dim:
            raise ValueError(f"{_NAME}.utility: k must be in [0, D] = [0, {dim}], got {k}")
        return k

    def utility(self, layer: str | None = None, kind: str = "lda", k: int | None = None) -> torch.Tensor:
        """Per-neuron utility `[D]` float64 of `layer`.

        `kind="lda"`: `Σ_{j<k} λ_j |e_j|` over the top `k` unit-normalised discriminants (default
        `k = C - 1`, all that carry between-class scatter); right whatever the correlations.
        `kind="fisher"`: `S_b[j,j] / (S_w[j,j] + ε)`; cheap, and exact only when the scatter matrices are near
        diagonal (see `diagonality`). `k` applies to "lda" only.
        """
        if kind not in ("lda", "fisher"):
            raise ValueError(f"{_NAME}.utility: kind must be 'lda' or 'fisher', got {kind!r}")
        if kind == "fisher":
            return ops.fisher_utility(self.stats(layer))
        stats = self.stats(layer)
        k = self._k(k, stats.dim)
        if k <= min(stats.num_classes, stats.dim):  # the rank-aware solve: no full D x D eigendecomposition
            return ops.discriminant_utility(*ops.discriminants(stats, k, self.ridge))
        values, vectors = self.discriminants(layer)
        return ops.discriminant_utility(values, vectors, k)

    def diagonality(self, layer: str | None = None) -> dict:
        """How far `S_w` and `S_b` are from diagonal: `{"within": float, "between": float}`, each the mean
        absolute off-diagonal entry of the correlation matrix `S / sqrt(diag diag^T)` over the dimensions with
        non-zero variance (0 when fewer than two have any). Near 0 means `fisher` utility is trustworthy.

        Note that `S_b` has rank at most `C - 1`: with few classes its correlations are large by construction.
        """
        stats = self.stats(layer)
        return {"within": _mean_abs_correlation(stats.within), "between": _mean_abs_correlation(stats.between())}

    def results(self, k: int | None = None) -> dict[str, LayerAnalysis]:
        """A `LayerAnalysis` for every layer, keyed by layer name (`k` as in `utility`)."""
        out = {}
        for name in self._layers:
            stats = self.stats(name)
            values, vectors = self.discriminants(name)
            out[name] = LayerAnalysis(
                stats=stats, eigenvalues=values, eigenvectors=vectors,
                lda_utility=ops.discriminant_utility(values, vectors, self._k(k, values.shape[-1])),
                fisher_utility=ops.fisher_utility(stats), diagonality=self.diagonality(name))
        return out

    # ------------------------------------------------------------------------------- saving and merging

    def state_dict(self) -> dict:
        """`{"num_classes": int, "num_samples": int, "layers": {name: ScatterStats.state_dict()}}`: plain tensors
        and numbers, loadable with `torch.load(..., weights_only=True)`. Layers without data are left out."""
        return {"num_classes": self.num_classes, "num_samples": self._num_samples,
                "layers": {name: s.state_dict() for name, s in self._stats.items() if s is not None}}

    def load_state_dict(self, state: dict) -> "DiscriminantAnalyzer":
        """Replaces the statistics with those of `state` (from `state_dict`); layers it lacks become empty.
        Its `num_classes` must match and its layers must be among this analyzer's. Returns self."""
        op = f"{_NAME}.load_state_dict"
        if not isinstance(state, dict) or "num_classes" not in state or "layers" not in state:
            raise ValueError(f"{op}: state must be a dict with 'num_classes' and 'layers' (from state_dict())")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"{op}: state has num_classes={state['num_classes']}, this analyzer "
                             f"{self.num_classes}")
        unknown = sorted(set(state["layers"]) - set(self._layers))
        if unknown:
            raise ValueError(f"{op}: state has layers {unknown} that this analyzer does not analyse "
                             f"({self._layers})")
        loaded = {name: ScatterStats.from_state_dict(s) for name, s in state["layers"].items()}
        for name, s in loaded.items():
            if s.num_classes != self.num_classes:
                raise ValueError(f"{op}: layer {name!r} has statistics of {s.num_classes} classes, expected "
                                 f"{self.num_classes}")
        self._stats = {name: loaded.get(name) for name in self._layers}
        num_samples = state.get("num_samples")
        if num_samples is None:
            num_samples = int(next((s.num_samples for s in loaded.values()), 0))
        self._num_samples = int(num_samples)
        return self

    def merge(self, other: "DiscriminantAnalyzer") -> "DiscriminantAnalyzer":
        """Merges the statistics of another analyzer (e.g. over another part of the data) into this one,
        exactly. Both must have the same `num_classes` and layers. Returns self."""
        op = f"{_NAME}.merge"
        if not isinstance(other, DiscriminantAnalyzer):
            raise TypeError(f"{op}: other must be a {_NAME}, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"{op}: other has num_classes={other.num_classes}, this analyzer {self.num_classes}")
        if other.layers != self._layers:
            raise ValueError(f"{op}: other analyses layers {other.layers}, this analyzer {self._layers}")
        merged = {}
        for name in self._layers:
            a, b = self._stats[name], other._stats[name]
            if a is None or b is None:
                merged[name] = a if b is None else b
            elif a.dim != b.dim:
                raise ValueError(f"{op}: layer {name!r} has {a.dim} features here and {b.dim} in other")
            else:
                merged[name] = ops.merge_scatter(a, b.to(a.mean.device))
        self._stats = merged
        self._num_samples += other._num_samples
        return self


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer, else CPU."""
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _mean_abs_correlation(s: torch.Tensor) -> float:
    """Mean |off-diagonal| of the correlation matrix of a scatter matrix, over its non-zero-variance dims."""
    diag = s.diagonal()
    largest = float(diag.abs().max()) if diag.numel() else 0.0
    live = (diag > 1e-12 * largest).nonzero().squeeze(1) if largest > 0 else diag.new_empty(0, dtype=torch.long)
    d = live.numel()
    if d < 2:
        return 0.0
    sub = s[live][:, live]
    scale = sub.diagonal().rsqrt()
    corr = (sub * scale.unsqueeze(0) * scale.unsqueeze(1)).abs()
    return float((corr.sum() - corr.diagonal().sum()) / (d * (d - 1)))
