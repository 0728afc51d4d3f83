"""Export a (compact) model for deployment: ONNX (checked in ONNX Runtime) and TorchScript (checked by loading).

    from gpp_ext import export, io
    model = io.load("runs/lenet5/model.pt")
    export.to_onnx(model, "lenet5.onnx", input_shape=(1, 28, 28), dynamic_batch=True)   # -> {"max_abs_diff", ...}
    export.to_torchscript(model, "lenet5.ts.pt", input_shape=(1, 28, 28))

    gpp export runs/lenet5/model.pt --onnx lenet5.onnx --dynamic-batch --torchscript lenet5.ts.pt

Every export is verified before it is kept: the exported file is run (ONNX Runtime on the CPU, or
`torch.jit.load`) on random inputs and compared with the PyTorch model in eval mode; a difference above
`atol + rtol * max|output|` (defaults 1e-4 and 1e-5: the exporters reorder sums, which moves float32 results by
a few ulps of the output's scale, so a fixed absolute bound alone rejects sound exports of models whose logits
are large) raises `ValueError` and leaves no file. Files are written atomically. ONNX export needs the optional `onnx`,
`onnxscript` and `onnxruntime` packages; a clear `ImportError` says so.
"""

from __future__ import annotations

import contextlib
import copy
import io as _io
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn as nn

from . import io
from .atomic import write_to
from .training import time_interleaved

__all__ = ["to_onnx", "to_torchscript", "onnx_latency_ms", "compare_onnx_latency", "check_onnx_available"]


def check_onnx_available() -> None:
    """`ImportError` (saying what to install) unless onnx, onnxscript and onnxruntime import."""
    _need_onnx()


def _need_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({error}): pip install onnx "
                          f"onnxscript onnxruntime") from error
    return onnxruntime


def _check_args(model, input_shape, where: str) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: input_shape must be the shape of one input, e.g. (1, 28, 28), got "
                        f"{input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{where}: input_shape must be positive sizes of one input (no batch), got {shape}")
    model = copy.deepcopy(model).cpu().eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except Exception as error:
        raise ValueError(f"{where}: the model does not accept inputs of shape {list(shape)} ({type(error).__name__}: "
                         f"{error}); give the input shape it was trained on") from error
    return model, shape


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and its logger's notes (e.g. on torchvision ops) are not the user's concern;
    an error still propagates with its message."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()), \
                contextlib.redirect_stderr(_io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _difference(run, model: nn.Module, shape: tuple, batches) -> tuple[float, float]:
    """The largest |exported - PyTorch| over random inputs, and the largest |PyTorch output| (its scale)."""
    g = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, *shape, generator=g)
            got, want = torch.as_tensor(run(x)), model(x)
            worst = max(worst, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    return worst, scale


def _check_difference(diff: float, scale: float, atol: float, rtol: float, what: str) -> None:
    bound = atol + rtol * scale
    if not diff <= bound:
        raise ValueError(f"{what}'s outputs differ from PyTorch's by {diff:.3g} (> atol {atol:g} + rtol {rtol:g} * "
                         f"max|output| {scale:.3g} = {bound:.3g}); the export is not kept")


# The opsets to_onnx accepts: torch's exporter writes 18 and converts down to 14 (measured with torch 2.13: at
# 13 and below its converter fails and leaves 18), up to the newest that ONNX Runtime 1.2x runs.
OPSETS = (14, 23)


def _opset_of(path: str) -> int | None:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _session(path: str):
    ort = _need_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


ONNX_SINGLE_FILE_LIMIT = 2 ** 31 - 2 ** 24   # protobuf's 2 GiB, less room for the graph itself


def to_onnx(model: nn.Module, path, input_shape, opset: int = 18, dynamic_batch: bool = False,
            atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Exports `model` (eval mode, CPU) to ONNX at `path` and checks it in ONNX Runtime.

    Args:
        input_shape: one input's shape, e.g. (1, 28, 28).
        opset: the ONNX opset (18 by default, what torch's exporter targets best).
        dynamic_batch: a symbolic batch dimension (checked at two batch sizes); else the batch is fixed to 1.
        atol, rtol: the largest difference from PyTorch accepted is `atol + rtol * max|output|`.
    Returns `{"path", "opset", "dynamic_batch", "max_abs_diff", "checked_batches"}`.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"export.to_onnx: opset must be an int in [{OPSETS[0]}, {OPSETS[1]}] (torch's exporter "
                         f"writes opset 18 and converts to others; below {OPSETS[0]} its conversion fails), got "
                         f"{opset!r}")
    model, shape = _check_args(model, input_shape, "export.to_onnx")
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if size > ONNX_SINGLE_FILE_LIMIT:
        raise ValueError(f"export.to_onnx: the model's weights take {size / 2 ** 30:.2f} GiB, above the 2 GiB an ONNX "
                         f"file holds (larger models keep their weights in a separate file, which this atomic, "
                         f"checked export does not write); export to TorchScript instead")
    _need_onnx()
    path = os.fspath(path)
    batches = (2, 3) if dynamic_batch else (1,)
    example = torch.zeros(batches[0], *shape)
    result = {}

    def write(tmp):
        kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamic_batch else {}
        with _quiet():
            program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset, verbose=False,
                                        **kwargs)
        program.save(tmp)
        written = _opset_of(tmp)
        if written != opset:
            raise ValueError(f"export.to_onnx: torch's exporter could not convert this model to opset {opset} (it "
                             f"wrote opset {written}); the export is not kept: ask for opset {written}, or another "
                             f"in [{OPSETS[0]}, {OPSETS[1]}]")
        session = _session(tmp)
        name = session.get_inputs()[0].name
        diff, scale = _difference(lambda x: session.run(None, {name: x.numpy()})[0], model, shape, batches)
        _check_difference(diff, scale, atol, rtol, "export.to_onnx: ONNX Runtime")
        result.update(path=path, opset=opset, dynamic_batch=dynamic_batch, max_abs_diff=diff,
                      checked_batches=list(batches))

    io.write_atomic(path, write)
    return result


def to_torchscript(model: nn.Module, path, input_shape, atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Traces `model` (eval mode, CPU) to TorchScript at `path` and checks the file with `torch.jit.load`.
    Returns `{"path", "max_abs_diff", "checked_batches"}`."""
    model, shape = _check_args(model, input_shape, "export.to_torchscript")
    path = os.fspath(path)
    result = {}

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                traced = torch.jit.trace(model, torch.zeros(2, *shape))
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                write_to(fd, lambda f: torch.jit.save(traced, f))
            finally:
                os.close(fd)
            loaded = torch.jit.load(tmp).eval()
        diff, scale = _difference(loaded, model, shape, (1, 3))
        _check_difference(diff, scale, atol, rtol, "export.to_torchscript: the traced model")
        result.update(path=path, max_abs_diff=diff, checked_batches=[1, 3])

    io.write_atomic(path, write)
    return result


def onnx_latency_ms(path, input_shape, batch: int, repeats: int = 20) -> float:
    """Median ONNX Runtime CPU latency of one run of `batch` inputs, in milliseconds (the speed users deploy
    with); the file must accept that batch size (exported with `dynamic_batch=True`, or batch 1)."""
    session = _session(os.fspath(path))
    name = session.get_inputs()[0].name
    x = torch.randn(batch, *input_shape).numpy()
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare_onnx_latency(models: dict, input_shape, batches=(1, 64), rounds: int = 5, repeats: int = 10,
                         opset: int = 18) -> dict:
    """ONNX Runtime CPU latency of several models, timed interleaved in one window (like
    `training.compare_latency` for eager PyTorch), at each batch size in `batches`.

    Each model is exported (dynamic batch, checked against PyTorch) to a temporary folder that is removed
    afterwards, and the sessions are timed by `training.time_interleaved`. Returns `{"b1": {name: {"median_ms",
    "min_ms", "max_ms"}, ..., "ratio": {...}}, ...}`; with two models `ratio` is the first's time over the
    second's (`{"median", "min", "max", "reliable"}` over the rounds).
    """
    if not models or rounds < 1 or repeats < 1:
        raise ValueError("compare_onnx_latency: give at least one model, rounds >= 1 and repeats >= 1")
    shape = tuple(int(s) for s in input_shape)
    out = {}
    with tempfile.TemporaryDirectory(prefix="gpp-onnx-") as folder:
        sessions = {}
        for i, (name, model) in enumerate(models.items()):
            path = os.path.join(folder, f"model{i}.onnx")
            to_onnx(model, path, shape, opset=opset, dynamic_batch=True)
            session = _session(path)
            sessions[name] = (session, session.get_inputs()[0].name)
        for batch in batches:
            x = torch.randn(batch, *shape).numpy()
            out[f"b{batch}"] = time_interleaved(
                {name: (lambda s=session, n=input_name: s.run(None, {n: x})) for name, (session, input_name)
                 in sessions.items()}, rounds, repeats)
    return out
