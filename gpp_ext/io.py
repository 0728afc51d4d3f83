"""Saving and loading compact models without pickling classes.

A file holds the architecture as data: the model's factory spec (`{"name", "kwargs"}` of a built-in model, or
whatever a user factory needs), the structural attributes of every layer (`in_channels`, `out_features`,
`num_features`, ...), and the `state_dict`. Everything is plain Python types and tensors, so it loads with
`torch.load(..., weights_only=True)`: no code runs from the file. Loading rebuilds the model from its factory,
gives each layer the saved widths and parameter shapes, and loads the weights. Files are written atomically.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from .layers import WIDTH_ATTRS, WIDTH_LAYERS

__all__ = ["save", "load", "payload", "from_payload", "write_atomic", "save_atomic", "write_text_atomic", "FORMAT"]

FORMAT = "gpp_ext.model/1"
def _widths(model: nn.Module) -> dict:
    out = {}
    for name, m in model.named_modules():
        # Only torch's own layers: a container's width attributes may be derived, read-only properties.
        if not isinstance(m, WIDTH_LAYERS):
            continue
        attrs = {}
        for attr in WIDTH_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                attrs[attr] = value
            elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
                attrs[attr] = list(value)
        if attrs:
            out[name] = attrs
    return out


def write_atomic(path, write) -> None:
    """Calls `write(tmp_path)`, then renames the temporary file onto `path`: readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # keep the extension: torch.save names its archive after the file, and a bare ".tmp-x" name is refused
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path) -> None:
    """`torch.save(obj, path)` through a temporary file and a rename."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path, text: str) -> None:
    """Writes a text file through a temporary file and a rename."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def payload(model: nn.Module, spec: dict | None = None) -> dict:
    """The model as data: spec, layer widths and weights (plain types and CPU tensors)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gpp_ext.io: model must be an nn.Module, got {type(model).__name__}")
    if spec is None and hasattr(model, "spec"):
        spec = model.spec()
    return {"format": FORMAT, "spec": spec, "widths": _widths(model),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def save(model: nn.Module, path, spec: dict | None = None) -> None:
    """Writes `model` to `path` (atomically: a temporary file in the same folder, then a rename).

    `spec` describes how to rebuild the architecture; it defaults to `model.spec()` for built-in models. User
    models may leave it out and pass a `factory` to `load`.
    """
    save_atomic(payload(model, spec), path)


def load(path, factory=None, map_location="cpu") -> nn.Module:
    """Rebuilds a model saved with `save`.

    Args:
        path: the file.
        factory: a callable returning the *unpruned* architecture (for user models); built-in models are
            rebuilt from the saved spec when it is None.
        map_location: the device the model ends up on (default CPU).
    """
    data = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"gpp_ext.io.load: {path} is not a gpp_ext model file (format {FORMAT})")
    return from_payload(data, factory, map_location, where=os.fspath(path))


def from_payload(data: dict, factory=None, map_location="cpu", where: str = "the model data") -> nn.Module:
    """Rebuilds a model from `payload(model)` (what `load` does after reading the file)."""
    path = where
    if factory is None:
        spec = data.get("spec")
        if not spec:
            raise ValueError(f"gpp_ext.io.load: {path} holds a user model; pass factory=<callable returning the "
                             f"unpruned architecture>")
        from . import models

        model = models.build(spec["name"], **spec.get("kwargs", {}))
    else:
        model = factory() if callable(factory) else None
        if not isinstance(model, nn.Module):
            raise TypeError("gpp_ext.io.load: factory must be a callable returning an nn.Module")
    modules = dict(model.named_modules())
    missing = [name for name in data["widths"] if name not in modules]
    if missing:
        raise ValueError(f"gpp_ext.io.load: the factory's model has no layers {missing[:5]}; it is not the "
                         f"architecture that was saved")
    for name, attrs in data["widths"].items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    # Give every parameter and buffer the saved shape, then load the values.
    state = data["state_dict"]
    for key, saved in state.items():
        module_name, _, attr = key.rpartition(".")
        m = modules.get(module_name)
        current = getattr(m, attr, None) if m is not None else None
        if isinstance(current, torch.Tensor) and current.shape != saved.shape:
            fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
            setattr(m, attr, nn.Parameter(fresh, requires_grad=current.requires_grad)
                    if isinstance(current, nn.Parameter) else fresh)
    model.load_state_dict(state, strict=True)
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
