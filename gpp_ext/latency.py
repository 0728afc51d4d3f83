"""Per-layer latency tables: what each convolution and linear layer costs at each width, measured on this
machine in the runtime you deploy with, so that a latency budget (`budget_kind="latency"`, `gpp compress
--target-latency 0.5`) is decided by measurements, not by FLOPs.

    table = LatencyTable("onnxruntime", batch=1)     # or "eager" (PyTorch), any batch size
    model = pruning.LatencyModel(graph, table)       # cost(widths) in milliseconds
    gpp_ext.prune(model, loader, example, budget=0.5, budget_kind="latency", latency=table, allocation="solver")

A layer's table is measured once per layer shape (kind, kernel, stride, padding, dilation, groups, bias, the
input's spatial size, the full channel counts) on a grid of input x output widths (`FRACTIONS` of the full
widths, every point timed interleaved in one window, `training.time_interleaved`); widths between the points
are interpolated bilinearly, widths below the smallest point cost what it costs (a conservative figure). The
whole model is timed once too (the part of the latency that is not a tabulated layer: activations, pooling,
normalisation). Both are cached as JSON under `cache_dir()` (`$GPP_EXT_CACHE`, default
`~/.cache/gpp_ext`), one file per runtime, batch size and machine (CPU, threads, torch and ONNX Runtime
versions), written atomically; a file that cannot be read is measured again, never trusted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from .io import write_text_atomic
from .layers import CONV

__all__ = ["LatencyTable", "LayerTable", "RUNTIMES", "FRACTIONS", "cache_dir", "cpu_model", "table_for",
           "model_cost"]

RUNTIMES = ("eager", "onnxruntime")
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)   # of a layer's full widths, the points measured


def cache_dir() -> str:
    return os.environ.get("GPP_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpp_ext")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), else what `platform` says: part of what a timing depends on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _points(full: int) -> list:
    return sorted({max(1, int(math.ceil(f * full - 1e-9))) for f in FRACTIONS} | {full})


class LayerTable:
    """One layer's measured latency (ms) at input widths `ins` x output widths `outs` (`ms[i][j]`); a depthwise
    layer's input width is its output width (`ins` is `[0]`, one row)."""

    def __init__(self, ins: list, outs: list, ms: list):
        self.ins, self.outs, self.grid = list(ins), list(outs), np.asarray(ms, dtype=np.float64)
        if self.grid.shape != (len(self.ins), len(self.outs)) or not np.isfinite(self.grid).all():
            raise ValueError("LayerTable: ms must be a finite [len(ins), len(outs)] grid")

    @classmethod
    def measured(cls, ins: list, outs: list, ms) -> "LayerTable":
        """A table from timings, made monotone: a layer is never slower with fewer channels, so each point is
        at most the smallest time measured at any point with at least its widths (a timing inflated by the
        machine doing something else at that moment would otherwise make its widths look worth cutting)."""
        grid = np.asarray(ms, dtype=np.float64)
        grid = np.minimum.accumulate(grid[::-1, ::-1], axis=0)
        grid = np.minimum.accumulate(grid, axis=1)[::-1, ::-1]
        return cls(ins, outs, grid.tolist())

    @staticmethod
    def _at(points: list, x: float) -> tuple:
        """`(i, j, t)`: x lies between points[i] and points[j] at fraction t (clamped to the ends)."""
        if len(points) == 1 or x <= points[0]:
            return 0, 0, 0.0
        if x >= points[-1]:
            return len(points) - 1, len(points) - 1, 0.0
        j = int(np.searchsorted(points, x))
        i = j - 1
        return i, j, (x - points[i]) / (points[j] - points[i])

    def ms(self, c_in: int, c_out: int) -> float:
        i0, i1, ti = self._at(self.ins, c_in) if len(self.ins) > 1 else (0, 0, 0.0)
        j0, j1, tj = self._at(self.outs, c_out)
        g = self.grid
        top = g[i0, j0] * (1 - tj) + g[i0, j1] * tj
        bottom = g[i1, j0] * (1 - tj) + g[i1, j1] * tj
        return float(top * (1 - ti) + bottom * ti)

    def to_dict(self) -> dict:
        return {"ins": self.ins, "outs": self.outs, "ms": self.grid.tolist()}


def _signature(module: nn.Module, in_shape: tuple) -> dict:
    """What a layer's latency depends on (besides its widths, the runtime and the batch)."""
    rest = [int(d) for d in in_shape[2:]] if isinstance(module, CONV) else [int(d) for d in in_shape[1:-1]]
    if isinstance(module, CONV):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        padding = module.padding if isinstance(module.padding, str) else [int(p) for p in module.padding]
        return {"op": type(module).__name__, "in": module.in_channels, "out": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride), "padding": padding,
                "dilation": list(module.dilation), "groups": "depthwise" if depthwise else module.groups,
                "bias": module.bias is not None, "spatial": rest}
    return {"op": "Linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
            "spatial": rest}


def _layer_module(sig: dict, c_in: int, c_out: int) -> nn.Module:
    if sig["op"] == "Linear":
        return nn.Linear(c_in, c_out, bias=sig["bias"])
    cls = getattr(nn, sig["op"])
    groups = c_out if sig["groups"] == "depthwise" else sig["groups"]
    padding = sig["padding"] if isinstance(sig["padding"], str) else tuple(sig["padding"])
    return cls(c_in, c_out, tuple(sig["kernel"]), stride=tuple(sig["stride"]), padding=padding,
               dilation=tuple(sig["dilation"]), groups=groups, bias=sig["bias"])


def _onnx_session(module: nn.Module, x: torch.Tensor):
    """An ONNX Runtime session of one layer, built directly as an ONNX graph (Conv, or MatMul + Add), so that
    measuring a table needs no exporter."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = module.weight.detach().numpy()
    inits, nodes = [], []
    if isinstance(module, nn.Linear):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "W"))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y0" if module.bias is not None else "y"]))
        if module.bias is not None:
            inits.append(numpy_helper.from_array(module.bias.detach().numpy(), "B"))
            nodes.append(helper.make_node("Add", ["y0", "B"], ["y"]))
    else:
        if isinstance(module.padding, str):
            pads = [0] * (2 * len(module.kernel_size)) if module.padding == "valid" else \
                [(k - 1) * d // 2 for k, d in zip(module.kernel_size, module.dilation)] * 2
        else:
            pads = list(module.padding) * 2
        inits.append(numpy_helper.from_array(w, "W"))
        inputs = ["x", "W"]
        if module.bias is not None:
            inits.append(numpy_helper.from_array(module.bias.detach().numpy(), "B"))
            inputs.append("B")
        nodes.append(helper.make_node("Conv", inputs, ["y"], kernel_shape=list(module.kernel_size),
                                      strides=list(module.stride), pads=pads, dilations=list(module.dilation),
                                      group=module.groups))
    with torch.no_grad():
        out_shape = list(module(x).shape)
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


class LatencyTable:
    """Per-layer latency tables of one runtime ("eager": PyTorch on the CPU; "onnxruntime": ONNX Runtime's CPU
    provider) at one batch size, measured on demand and cached (see the module's doc).

    Args:
        runtime: "eager" or "onnxruntime".
        batch: the batch size the latency is for (1 for one request at a time; larger for throughput).
        cache: a folder for the cache file, None for `cache_dir()`, False for no cache (measure every time).
        rounds, repeats: the timer's (`training.time_interleaved`): each point's figure is the median of its
            rounds, each round the median of `repeats` calls (default: 10 at batch 1, 3 above).
        progress: a bar while tables are measured.
    """

    def __init__(self, runtime: str = "eager", batch: int = 1, cache=None, rounds: int = 5,
                 repeats: int | None = None, progress: bool = False):
        if runtime not in RUNTIMES:
            raise ValueError(f"LatencyTable: runtime must be one of {RUNTIMES}, got {runtime!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"LatencyTable: batch must be an int >= 1, got {batch!r}")
        if runtime == "onnxruntime":
            from .export import check_onnx_available

            check_onnx_available()
        self.runtime, self.batch, self.rounds = runtime, batch, rounds
        self.repeats = repeats or (10 if batch == 1 else 3)
        self.progress = progress
        self.environment = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "runtime": runtime, "batch": batch}
        if runtime == "onnxruntime":
            import onnxruntime

            self.environment["onnxruntime"] = onnxruntime.__version__
        digest = hashlib.sha1(json.dumps(self.environment, sort_keys=True).encode()).hexdigest()[:12]
        folder = cache_dir() if cache is None else cache
        self.path = os.path.join(os.fspath(folder), "latency", f"{runtime}-b{batch}-{digest}.json") \
            if folder is not False else None
        self.measured = 0   # layer tables and models measured (not read from the cache) by this object
        # Under torch.distributed, rank 0 reads the cache and measures, and shares what it has: every process then
        # holds the same tables, so the widths they decide (and the collectives that follow) agree
        from .run_folder import on_lead

        self._layers, self._models = on_lead(self._read)

    # ------------------------------------------------------------------------------------------------ cache
    def _read(self) -> tuple:
        """`(layers, models)` of the cache, empty when there is none or it cannot be used."""
        if self.path is None or not os.path.exists(self.path):
            return {}, {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("environment") != self.environment:
                raise ValueError("made in another environment")
            layers = {k: LayerTable(**v) for k, v in data.get("layers", {}).items()}
            models = {k: float(v) for k, v in data.get("models", {}).items()}
            if not all(math.isfinite(v) and v >= 0 for v in models.values()):
                raise ValueError("a model latency is not a finite number >= 0")
        except (OSError, ValueError, TypeError, AttributeError) as error:
            warnings.warn(f"LatencyTable: the cache {self.path} cannot be used ({error}); measuring again",
                          RuntimeWarning, stacklevel=3)
            return {}, {}
        return layers, models

    def _write(self) -> None:
        from . import distributed as gdist

        if self.path is None or gdist.rank() != 0:
            return
        data = {"environment": self.environment, "layers": {k: v.to_dict() for k, v in self._layers.items()},
                "models": self._models}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_text_atomic(self.path, json.dumps(data) + "\n")
        except OSError as error:  # a cache that cannot be written costs a re-measurement, nothing else
            warnings.warn(f"LatencyTable: cannot write the cache {self.path} ({error})", RuntimeWarning,
                          stacklevel=3)

    # --------------------------------------------------------------------------------------------- measure
    def _callable(self, module: nn.Module, x: torch.Tensor):
        module = module.eval()
        if self.runtime == "onnxruntime":
            return _onnx_session(module, x)

        def run():
            with torch.inference_mode():
                return module(x)
        return run

    def layer(self, module: nn.Module, in_shape: tuple) -> LayerTable:
        """The table of a convolution or linear layer called on inputs of shape `in_shape` (any batch size:
        the table's own is used), measured now unless cached."""
        sig = _checked_signature(module, in_shape)
        self.prepare(layers=[(module, in_shape)])
        return self._layers[json.dumps(sig, sort_keys=True)]

    def model_ms(self, model: nn.Module, input_shape) -> float:
        """The whole model's latency at this table's runtime and batch (measured once per architecture)."""
        self.prepare(models=[(model, input_shape)])
        return self._models[_model_key(model, input_shape)]

    def prepare(self, layers=(), models=()) -> None:
        """Measures, in one window, every table of `layers` (`(module, input shape)`) and every model of
        `models` (`(model, input shape)`) not cached yet: timed interleaved, they share whatever load the
        machine has, so the figures a `LatencyModel` combines are comparable."""
        todo_layers, todo_models = {}, {}
        for module, in_shape in layers:
            sig = _checked_signature(module, in_shape)
            key = json.dumps(sig, sort_keys=True)
            if key not in self._layers:
                todo_layers[key] = sig
        for model, input_shape in models:
            key = _model_key(model, input_shape)
            if key not in self._models:
                todo_models[key] = (model, [int(d) for d in input_shape])
        if not todo_layers and not todo_models:
            return
        from .run_folder import on_lead

        tables, times = on_lead(lambda: self._window(todo_layers, todo_models))
        self._layers.update(tables)
        self._models.update(times)
        self.measured += len(tables) + len(times)
        self._write()

    def _window(self, layers: dict, models: dict) -> tuple:
        """`({key: LayerTable}, {key: ms})`: every point of every layer and every model timed in one window."""
        from .training import time_interleaved

        runs, grids = {}, {}
        generator = torch.Generator().manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="gpp-latency-") as folder:
            for n, (key, sig) in enumerate(layers.items()):
                ins, outs = _grid(sig)
                grids[key] = (ins, outs)
                for i in ins:
                    for o in outs:
                        c_in = o if sig.get("groups") == "depthwise" else i
                        x = torch.randn(self.batch, c_in, *sig["spatial"], generator=generator) \
                            if sig["op"] != "Linear" else torch.randn(self.batch, *sig["spatial"], c_in,
                                                                      generator=generator)
                        runs[f"layer{n}:{i}x{o}"] = self._callable(_layer_module(sig, c_in, o), x)
            for n, (key, (model, shape)) in enumerate(models.items()):
                runs[f"model{n}"] = self._model_callable(model, shape, os.path.join(folder, f"model{n}.onnx"))
            timed = time_interleaved(runs, rounds=self.rounds, repeats=self.repeats)
        tables = {key: LayerTable.measured(ins, outs, [[timed[f"layer{n}:{i}x{o}"]["median_ms"] for o in outs]
                                                       for i in ins])
                  for n, (key, (ins, outs)) in enumerate(grids.items())}
        times = {key: timed[f"model{n}"]["median_ms"] for n, key in enumerate(models)}
        return tables, times

    def _model_callable(self, model: nn.Module, shape: list, path: str):
        model = copy.deepcopy(model).cpu().eval()
        x = torch.randn(self.batch, *shape)
        if self.runtime == "eager":
            def run():
                with torch.inference_mode():
                    return model(x)
            return run
        from .export import _session, to_onnx

        to_onnx(model, path, shape, dynamic_batch=True)
        session = _session(path)
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feed)


def _checked_signature(module: nn.Module, in_shape: tuple) -> dict:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ValueError(f"LatencyTable: {type(module).__name__} is not tabulated; use a parameter or FLOP budget "
                         f"for this model")
    if not isinstance(module, CONV + (nn.Linear,)):
        raise ValueError(f"LatencyTable: only convolutions and linear layers are tabulated, got "
                         f"{type(module).__name__}")
    return _signature(module, in_shape)


def _grid(sig: dict) -> tuple:
    """`(input widths, output widths)` measured for a layer: the points of each; a depthwise layer's input is
    its output (`[0]`); a grouped convolution, which is not pruned through, only at full size."""
    if sig.get("groups") == "depthwise":
        return [0], _points(sig["out"])
    if sig.get("groups", 1) != 1:
        return [sig["in"]], [sig["out"]]
    return _points(sig["in"]), _points(sig["out"])


def _model_key(model: nn.Module, input_shape) -> str:
    shape = [int(d) for d in input_shape]
    layout = [(n, type(m).__name__, [list(p.shape) for p in m.parameters(recurse=False)])
              for n, m in model.named_modules()]
    return hashlib.sha1(json.dumps([shape, layout]).encode()).hexdigest()


def table_for(config, progress: bool = False):
    """The latency table a `LoopConfig` asks for (its runtime and batch, cached on disk), or None when its budget
    is not a latency."""
    if config.budget_kind != "latency":
        return None
    return LatencyTable(config.latency_runtime, config.latency_batch, progress=progress)


def model_cost(model: nn.Module, kind: str, example, table=None) -> float:
    """The cost of `model` in `kind` units: parameters, FLOPs, or its predicted latency (ms) on `table`."""
    from .cost import count_flops, count_params

    if kind == "latency":
        from .pruning import ChannelGraph
        from .pruning.costs import LatencyModel

        return LatencyModel(ChannelGraph(model, example), table).cost({})
    return count_flops(model, example) if kind == "flops" else count_params(model)
