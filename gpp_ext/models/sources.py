"""Models from anywhere: a built-in name, torchvision or timm, a factory in a `.py` file or an importable module.

A *source* is one string, what `gpp compress --model` takes and what a saved model's spec records:

- `lenet5`, `vgg`, `inception`, `resnet20`: the built-in models;
- `torchvision:NAME` (e.g. `torchvision:resnet18`): `torchvision.models.get_model(NAME, weights=None, ...)`;
- `timm:NAME` (e.g. `timm:resnet18`): `timm.create_model(NAME, pretrained=False, ...)`;
- `path/to/file.py:factory` or `package.module:factory`: any callable returning an `nn.Module`.

Nothing is downloaded: pretrained weights come from a local state-dict file (`load_weights`). `build_source`
records `{"name": source, "kwargs": ...}` on the model (`spec_of`), so `gpp_ext.io.save` stores it and
`gpp_ext.io.load` rebuilds the architecture from it (`rebuild`), without pickled classes.

A model file is data, and data names no code that runs on its own. `rebuild` builds a recorded spec only when
it names a built-in model or a torchvision/timm model by its registered name, with keyword arguments that are
plain data (and none that would fetch weights). A spec naming a factory in a `.py` file or a module (code
sources, `is_code_source`) is refused before anything is imported, unless the caller trusts it
(`trust_code=True`, `gpp ... --trust-model-code`) or names the factory itself (`io.load(path, factory=...)`,
`gpp ... --factory SOURCE`). Calling `build_source` yourself with a source string is that trust: you named the
code.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys

import torch
from torch import nn

__all__ = ["build_source", "rebuild", "spec_of", "is_source", "is_code_source", "load_weights", "SPEC_ATTR"]

SPEC_ATTR = "gpp_spec"  # the instance attribute that carries a sourced model's spec
# Auxiliary heads return tuples in training mode; the loop trains on the main head only.
_TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                         "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_source(name: str) -> bool:
    """True for a `kind:NAME` or `file.py:factory` source (False for a built-in name)."""
    return isinstance(name, str) and ":" in name


def is_code_source(name: str) -> bool:
    """True for a source that names code to import and run (`file.py:factory`, `package.module:factory`); False
    for built-in names and for torchvision/timm models, which are named from those libraries' registries."""
    return is_source(name) and name.partition(":")[0] not in ("torchvision", "timm")


def spec_of(model: nn.Module) -> dict | None:
    """How to rebuild `model`'s unpruned architecture: a built-in model's `spec()`, else the spec recorded by
    `build_source`, else None."""
    spec = model.spec() if callable(getattr(model, "spec", None)) else None
    return spec or getattr(model, SPEC_ATTR, None)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _optional(module: str, source: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"model {source!r}: {module} is not installed ({error}); install it (pip install {module}) "
                         f"or use another model source") from None


def _torchvision(name: str, source: str, kwargs: dict):
    tv = _optional("torchvision", source)
    known = tv.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"model {source!r}: torchvision has no model {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close
                            else "; see torchvision.models.list_models()"))
    return lambda **kw: tv.models.get_model(name, weights=None, **kw), {**_TORCHVISION_DEFAULTS.get(name, {}),
                                                                       **kwargs}


def _timm(name: str, source: str, kwargs: dict):
    timm = _optional("timm", source)
    if not timm.list_models(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ValueError(f"model {source!r}: timm has no model {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"))
    return lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs


def _from_file(path: str, attr: str, source: str, near: str | None):
    candidates = [path] if os.path.isabs(path) else [path] + ([os.path.join(near, path)] if near else [])
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(f"model {source!r}: no file {path}" + (f" (nor in {near})" if near else "")
                                + "; give the path to the .py file that defines the factory")
    found = os.path.abspath(found)
    # one module per file, named after its path, so that rebuilding twice reuses it
    name = "gpp_ext_user_" + hashlib.sha256(found.encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, found)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:  # a model file that calls sys.exit() must not end the program
            del sys.modules[name]
            raise ValueError(f"model {source!r}: importing {found} failed ({_failure(error)})") from error
    return _attribute(module, attr, source, found)


def _from_module(module_name: str, attr: str, source: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model {source!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH? "
                         f"(a file is named by its path: path/to/file.py:factory)") from None
    except (Exception, SystemExit) as error:
        raise ValueError(f"model {source!r}: importing module {module_name!r} failed ({_failure(error)})") from error
    return _attribute(module, attr, source, module_name)


def _failure(error: BaseException) -> str:
    """What went wrong, for a message: `sys.exit(3)` reads as such, not as a bare `3`."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    return f"{type(error).__name__}: {error}"


def _attribute(module, attr: str, source: str, where: str):
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"model {source!r}: {where} has no callable {attr!r}"
                         + (f"; it defines {', '.join(names[:8])}" if names else ""))
    return fn


def _factory(source: str, kwargs: dict, near: str | None):
    kind, _, rest = source.partition(":")
    if kind == "torchvision":
        return _torchvision(rest, source, kwargs)
    if kind == "timm":
        return _timm(rest, source, kwargs)
    path, _, attr = source.rpartition(":")
    if not path or not attr:
        raise ValueError(f"model {source!r}: expected a built-in name, torchvision:NAME, timm:NAME, "
                         f"path/to/file.py:factory or package.module:factory")
    if path.endswith(".py") or os.sep in path or "/" in path:
        return _from_file(path, attr, source, near), kwargs
    return _from_module(path, attr, source), kwargs


def build_source(source: str, num_classes: int | None = None, in_channels: int | None = None,
                 kwargs: dict | None = None, near: str | None = None) -> nn.Module:
    """A fresh model from `source` (see the module's doc), with its spec recorded for `gpp_ext.io`.

    Args:
        source: `torchvision:NAME`, `timm:NAME`, `path/to/file.py:factory` or `package.module:factory` (a
            built-in name goes to `gpp_ext.models.build`).
        num_classes: the head's outputs: passed as `num_classes` to torchvision and timm, and to a factory
            that accepts it.
        in_channels: input channels: timm's `in_chans`, and `in_channels` of a factory that accepts it
            (torchvision models take 3).
        kwargs: more keyword arguments for the factory (JSON-able: they are recorded in the spec).
        near: a folder to look in for a relative `.py` path that is not found from the working directory (the
            model file's folder, when `gpp_ext.io.load` rebuilds).
    """
    from . import MODELS, build

    kwargs = dict(kwargs or {})
    if not is_source(source):
        if source not in MODELS:
            raise ValueError(f"model {source!r}: not a built-in model ({', '.join(sorted(MODELS))}) nor a source "
                             f"(torchvision:NAME, timm:NAME, path/to/file.py:factory, package.module:factory)")
        return build(source, **kwargs)
    fn, kwargs = _factory(source, kwargs, near)
    kind = source.partition(":")[0]
    if num_classes is not None and (kind in ("torchvision", "timm") or _accepts(fn, "num_classes")):
        kwargs.setdefault("num_classes", int(num_classes))
    if in_channels is not None:
        if kind == "timm":
            kwargs.setdefault("in_chans", int(in_channels))
        elif kind != "torchvision" and _accepts(fn, "in_channels"):
            kwargs.setdefault("in_channels", int(in_channels))
    try:
        model = fn(**kwargs)
    except (Exception, SystemExit) as error:
        raise ValueError(f"model {source!r}: the factory failed with arguments {kwargs} ({_failure(error)})") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {source!r}: the factory returned {type(model).__name__}, not an nn.Module")
    setattr(model, SPEC_ATTR, {"name": source, "kwargs": kwargs})
    return model


# Keyword arguments a recorded spec may not pass to a torchvision or timm constructor: they fetch or read weights
# (a download, or a file named by the model file), which a model file must not make happen. Matched by name and
# by prefix/suffix, so `init_weights` (torchvision's GoogLeNet) and `drop_path_rate` (timm) stay allowed.
_FETCHING = {"weights", "weights_backbone", "checkpoint_path", "cache_dir", "model_dir", "hub_id", "url", "file",
             "path"}
_FETCHING_PREFIXES = ("pretrained", "weights_", "checkpoint", "hf_hub")
_FETCHING_SUFFIXES = ("_url", "_file", "_path", "_dir", "_checkpoint")


def _fetches(key: str) -> bool:
    key = key.lower()
    return key in _FETCHING or key.startswith(_FETCHING_PREFIXES) or key.endswith(_FETCHING_SUFFIXES)
_PLAIN = (type(None), bool, int, float, str)


def _plain(value, depth: int = 0) -> bool:
    """True for JSON-like data: None, bool, int, float, str, and lists/tuples/str-keyed dicts of them."""
    if depth > 16:
        return False
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _check_size(name: str, kwargs: dict, saved_numel: int | None, where: str) -> None:
    """A built-in model's recorded arguments describe about as many weights as the file holds: built on the meta
    device first (no memory), so that edited sizes cannot make loading allocate without bound."""
    from . import MODELS, build

    if saved_numel is None or name not in MODELS:
        return

    try:
        with torch.device("meta"):
            numel = sum(t.numel() for t in build(name, **kwargs).state_dict().values())
    except (TypeError, ValueError):
        return  # arguments the model refuses: named, with the file, when `rebuild` builds it
    if numel > 4 * saved_numel + 10_000:
        raise ValueError(f"{where}: its recorded arguments describe a {name!r} of {numel:,} weights, but the file "
                         f"holds {saved_numel:,}; the file is damaged or was edited")


def rebuild(spec, trust_code: bool = False, factory=None, near: str | None = None,
            where: str = "the model data", saved_numel: int | None = None) -> nn.Module:
    """The unpruned architecture a saved spec (`{"name", "kwargs"}`, from `spec_of`) describes.

    Without `factory` and `trust_code`, only a built-in model or a torchvision/timm model by its registered
    name is built, with plain-data keyword arguments and none that fetch weights; a spec naming a `.py` file or
    a module is refused (`ValueError`) before anything is imported. `trust_code=True` builds such a spec by
    importing the code it names (a relative `.py` path is looked for from the working directory, then in
    `near`). `factory` is the caller's own: a callable returning the architecture, or a source string
    (`"mynet.py:make_net"`) called with the spec's keyword arguments. `where` names the file in errors;
    `saved_numel`, the number of values its weights hold, bounds the size a built-in spec may describe.
    """
    if factory is not None:
        if isinstance(factory, str):
            kwargs = spec.get("kwargs", {}) if isinstance(spec, dict) and isinstance(spec.get("kwargs"), dict) else {}
            if not _plain(kwargs):
                raise ValueError(f"{where}: its recorded factory arguments are not plain data (numbers, strings, "
                                 f"lists, dicts); the file is damaged or was not written by gpp_ext")
            return build_source(factory, kwargs=kwargs, near=None)
        if not callable(factory):
            raise TypeError(f"factory must be a callable returning an nn.Module or a source string "
                            f"(path/to/file.py:factory, package.module:factory), got {type(factory).__name__}")
        try:
            model = factory()
        except (Exception, SystemExit) as error:
            raise ValueError(f"{where}: the factory failed ({_failure(error)})") from error
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: the factory must return an nn.Module, got {type(model).__name__}")
        return model
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"{where} holds a user model without a recorded factory; pass factory=<callable returning "
                         f"the unpruned architecture> (gpp: --factory path/to/file.py:factory)")
    name, kwargs = spec["name"], spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not _plain(kwargs):
        raise ValueError(f"{where}: the recorded arguments of {name!r} are not plain data (numbers, strings, "
                         f"lists, dicts); the file is damaged or was not written by gpp_ext")
    if is_code_source(name) and not trust_code:
        kind = "a .py file" if name.rpartition(":")[0].endswith(".py") or "/" in name or os.sep in name \
            else "a module"
        raise ValueError(f"{where} names the factory {name!r} (code in {kind}), and a model file is data: the code "
                         f"it names is not imported or run unless you say so. If you trust this file and that "
                         f"code, pass trust_code=True (gpp: --trust-model-code); or give the factory yourself: "
                         f"factory=<callable or 'path/to/file.py:factory'> (gpp: --factory path/to/file.py:factory)")
    if name.partition(":")[0] in ("torchvision", "timm"):
        fetching = sorted(k for k in kwargs if _fetches(k))
        if fetching:
            raise ValueError(f"{where}: the recorded arguments of {name!r} include {fetching}, which fetch or read "
                             f"weights; a model file cannot make that happen (its weights are in the file)")
    if not is_source(name):
        try:
            _check_size(name, kwargs, saved_numel, where)
        except ValueError:
            raise
        except Exception as error:  # arguments the built-in model does not take: named below, when built
            if not isinstance(error, TypeError):
                raise ValueError(f"{where}: cannot rebuild {name!r} from its recorded arguments {kwargs} "
                                 f"({type(error).__name__}: {error})") from error
    try:
        return build_source(name, kwargs=kwargs, near=near if trust_code else None)
    except FileNotFoundError:
        raise
    except ValueError as error:
        raise ValueError(f"{where}: cannot rebuild {name!r} ({error})") from error
    except Exception as error:  # a built-in model given arguments it does not take
        raise ValueError(f"{where}: cannot rebuild {name!r} from its recorded arguments {kwargs} "
                         f"({type(error).__name__}: {error})") from error


def load_weights(model: nn.Module, path: str, head: str | None = None) -> list:
    """Loads a local state-dict file into `model` (nothing is downloaded); returns the keys left as built.

    Every key must match by name and shape, except the head's (`head`, the classifier's module name): a
    checkpoint for another number of classes (e.g. ImageNet's 1000) leaves the freshly built head. A file that
    holds `{"state_dict": ...}` or `{"model": ...}` (common training checkpoints) is read too.
    """
    from ..atomic import read

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights: no file {path}")
    state = read(path, "--weights", "the weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--weights: {path} does not hold a state dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
    own = model.state_dict()
    head_keys = {k for k in own if head and k.rpartition(".")[0] == head}
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} (model: {list(own[k].shape)})" for k in own
             if k in state and k not in head_keys and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"other shapes {wrong[:3]}" if wrong else ""]
        raise ValueError(f"--weights: {path} does not fit the model: " + "; ".join(p for p in parts if p))
    kept = sorted(k for k in head_keys if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in kept}, strict=False)
    return kept
