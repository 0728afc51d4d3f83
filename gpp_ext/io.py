"""Saving and loading compact models without pickling classes.

A file holds the architecture as data: the model's factory spec (`{"name", "kwargs"}` of a built-in model, or
whatever a user factory needs), the structural attributes of every layer (`in_channels`, `out_features`,
`num_features`, ...), and the `state_dict`. Everything is plain Python types and tensors, so it loads with
`torch.load(..., weights_only=True)`: no code runs from the file. Loading rebuilds the model from its spec
(`gpp_ext.models.sources.rebuild`), gives each layer the saved widths, parameter shapes and dtypes, and loads
the weights.

Security: a model file is data that people download and share, so the code it names never runs on its own.
Built-in models and torchvision/timm models by their registered names are rebuilt; a spec naming a factory in
a `.py` file or a module is refused before anything is imported unless the caller passes `trust_code=True`
(`gpp ... --trust-model-code`) or gives the factory (`factory=`, `gpp ... --factory SOURCE`). A `.py` lying
beside the model file is never imported unless the caller trusts the file.

Integrity: the payload carries a SHA-256 digest of everything it holds (spec, widths, every tensor's name,
dtype, shape and bytes), checked on load, so a file damaged on disk or in transfer is refused with an error
instead of loading changed weights. Files are written atomically (`gpp_ext.atomic`, whose helpers this module
also offers under their names: `write_atomic`, `save_atomic`, `write_text_atomic`, `read`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import torch
import torch.nn as nn

from .atomic import read, save_atomic, write_atomic, write_text_atomic
from .layers import WIDTH_ATTRS, WIDTH_LAYERS

__all__ = ["save", "load", "read", "payload", "from_payload", "digest", "write_atomic", "save_atomic",
           "write_text_atomic", "FORMAT"]

FORMAT = "gpp_ext.model/2"
_FORMATS = ("gpp_ext.model/1", FORMAT)  # /1: the same without the digest (read, unchecked)


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


def digest(data: dict) -> str:
    """SHA-256 of a payload's content: spec, widths and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"spec": data.get("spec"), "widths": data.get("widths")}, sort_keys=True,
                        default=str).encode())
    hash_tensors(h, data["state_dict"], sorted(data["state_dict"]))
    return h.hexdigest()


def hash_tensors(h, tensors: dict, keys) -> None:
    """Feeds `h` (a hashlib object) each tensor of `keys`, in that order: its name, dtype, shape and bytes."""
    for key in keys:
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"|{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def payload(model: nn.Module, spec: dict | None = None) -> dict:
    """The model as data: spec, layer widths, weights (plain types and CPU tensors) and their digest."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gpp_ext.io: model must be an nn.Module, got {type(model).__name__}")
    if spec is None:
        from .models import spec_of

        spec = spec_of(model)
    data = {"format": FORMAT, "spec": spec, "widths": _widths(model),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    data["sha256"] = digest(data)
    return data


def save(model: nn.Module, path, spec: dict | None = None) -> None:
    """Writes `model` to `path` (atomically: a temporary file in the same folder, then a rename).

    `spec` describes how to rebuild the architecture; it defaults to `model.spec()` for built-in models and to
    the recorded source for models from `gpp_ext.models.build_source` (torchvision, timm, a factory in a file
    or module). Other user models may leave it out and pass a `factory` to `load`.
    """
    save_atomic(payload(model, spec), path)


def load(path, factory=None, map_location="cpu", trust_code: bool = False) -> nn.Module:
    """Rebuilds a model saved with `save`.

    Args:
        path: the file.
        factory: the caller's way to build the *unpruned* architecture: a callable returning it, or a source
            string (`"mynet.py:make_net"`, `"package.module:factory"`) called with the recorded arguments.
            Without it, built-in and torchvision/timm models are rebuilt from the saved spec.
        map_location: the device the model ends up on (default CPU).
        trust_code: build a spec that names a factory in a `.py` file or a module by importing and running that
            code (looked for from the working directory, then beside the model file). Off by default: a file
            naming code is refused, before anything is imported, with how to trust it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a model file", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gpp_ext.io.load: no model file {path}")
    data = read(path, "gpp_ext.io.load", "the model file")
    if not isinstance(data, dict) or data.get("format") not in _FORMATS:
        raise ValueError(f"gpp_ext.io.load: {path} is not a gpp_ext model file (format {FORMAT})")
    return from_payload(data, factory, map_location, where=path, near=os.path.dirname(os.path.abspath(path)),
                        trust_code=trust_code)


def from_payload(data: dict, factory=None, map_location="cpu", where: str = "the model data",
                 near: str | None = None, trust_code: bool = False) -> nn.Module:
    """Rebuilds a model from `payload(model)` (what `load` does after reading the file); its digest is checked
    first (`ValueError` on a mismatch), then the architecture is built as `load` says (`factory`, `trust_code`;
    a relative `.py` path of a trusted spec is looked for in `near` too, the model file's folder)."""
    path = where
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict) \
            or not isinstance(data.get("widths"), dict) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data["state_dict"].items()):
        raise ValueError(f"gpp_ext.io.load: {path} is not a gpp_ext model payload")
    if data.get("format") == FORMAT and data.get("sha256") != digest(data):
        raise ValueError(f"gpp_ext.io.load: {path} is corrupted: its content does not match the checksum stored "
                         f"with it (the file changed after it was written, e.g. damaged on disk or in a copy); "
                         f"use an intact copy, or write the model again")
    from .models.sources import rebuild

    model = rebuild(data.get("spec"), trust_code=trust_code, factory=factory, near=near,
                    where=f"gpp_ext.io.load: {path}", saved_numel=sum(t.numel() for t in data["state_dict"].values()))
    modules = dict(model.named_modules())
    widths = data["widths"]
    missing = [name for name in widths if name not in modules]
    if missing:
        raise ValueError(f"gpp_ext.io.load: the architecture rebuilt for {path} has no layers {missing[:5]}: it is "
                         f"not the architecture that was saved (was the factory's code changed since?)")
    for name, attrs in widths.items():
        if not isinstance(attrs, dict) or not all(isinstance(a, str) and a in WIDTH_ATTRS for a in attrs) \
                or not all(isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v))
                           for v in attrs.values()):
            raise ValueError(f"gpp_ext.io.load: {path} records widths of {name!r} that are not layer sizes "
                             f"({attrs!r}); the file is damaged or was not written by gpp_ext")
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    # Give every parameter and buffer the saved shape, then load the values.
    state = data["state_dict"]
    for key, saved in state.items():
        module_name, _, attr = key.rpartition(".")
        m = modules.get(module_name)
        current = getattr(m, attr, None) if m is not None else None
        if isinstance(current, torch.Tensor) and (current.shape != saved.shape or current.dtype != saved.dtype):
            if isinstance(current, nn.Parameter) and not (saved.is_floating_point() or saved.is_complex()):
                raise ValueError(f"gpp_ext.io.load: {path} holds the parameter {key!r} as {saved.dtype}; parameters "
                                 f"are floating-point: the file is damaged or was not written by gpp_ext")
            fresh = torch.empty(saved.shape, dtype=saved.dtype, device=current.device)
            setattr(m, attr, nn.Parameter(fresh, requires_grad=current.requires_grad)
                    if isinstance(current, nn.Parameter) else fresh)
    own = model.state_dict()
    absent = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if absent or extra:
        parts = ([f"the file lacks {absent[:4]}"] if absent else []) + ([f"the architecture lacks {extra[:4]}"]
                                                                        if extra else [])
        raise ValueError(f"gpp_ext.io.load: the architecture rebuilt for {path} does not match the one saved in "
                         f"it ({'; '.join(parts)}): was the factory's code changed since the model was saved? "
                         f"Rebuild with the code it was saved with (factory=...)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"gpp_ext.io.load: the weights in {path} do not fit the architecture rebuilt for it "
                         f"({str(error).splitlines()[-1].strip()[:300]}); was the factory's code changed since the "
                         f"model was saved?") from error
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
