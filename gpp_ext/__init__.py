"""gpp_ext: Grow-Push-Prune compression of PyTorch classifiers.

`gpp_ext.ops` holds the kernels (discriminant analysis of activations, channel surgery) and `gpp_ext.reference`
their pure-PyTorch definitions; `DiscriminantAnalyzer` analyses a model's activations; `gpp_ext.pruning`
(`ChannelGraph`, the criterion registry, `prune`) cuts channels; `gpp_ext.push`, `gpp_ext.grow` and
`gpp_ext.loop` are the rest of the method; `gpp_ext.training` trains and measures; `gpp_ext.models` and
`gpp_ext.data` are the built-in networks and data sets, `gpp_ext.io` saves compact models; `build_info()` says
how the compiled core was built. docs/design.md describes the whole.
"""

from __future__ import annotations

import torch

from . import data, io, models, ops, reference, training
from .analysis import DiscriminantAnalyzer
from .cost import count_flops, count_params
from .pruning import ChannelGraph, PruneReport, criteria, prune
from .stats import ScatterStats

register_criterion = criteria.register

__version__ = "0.1.0"
__all__ = ["ops", "reference", "io", "models", "data", "training", "ScatterStats", "DiscriminantAnalyzer",
           "ChannelGraph", "prune", "PruneReport", "criteria", "register_criterion", "count_params", "count_flops",
           "build_info", "__version__"]


# The rest of the package (the loop, recipes, export, growth, triage, ...) loads on first use, so `import gpp_ext`
# stays light and `gpp_ext.loop.GrowPushPrune(...)` works after it alone.
_SUBMODULES = ("analysis", "checkpoints", "classifier", "cost", "distributed", "export", "fade", "gap", "grow",
               "growth", "interop", "latency", "layers", "loop", "planting", "pruning", "push", "pushes", "recipes",
               "report", "run_folder", "stats", "testing", "triage")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gpp_ext' has no attribute {name!r}")


def build_info() -> dict:
    """How gpp_ext is running.

    Keys: `extension` (bool: compiled ops loaded), `cuda` (bool: CUDA kernels compiled in), `torch` (str:
    the running torch), `cuda_version` (str | None: CUDA the kernels were compiled with), and, when the
    extension is loaded, `compiled_torch`, `openmp`, `compiler`, `threads`; otherwise `error`.
    """
    info = {"extension": ops.extension_available(), "cuda": False, "torch": torch.__version__,
            "cuda_version": None}
    if ops.extension_available():
        compiled = ops._C.build_info()
        info.update(cuda=bool(compiled["cuda"]), cuda_version=compiled["cuda_version"],
                    compiled_torch=compiled["torch"], openmp=bool(compiled["openmp"]),
                    compiler=compiled["compiler"], threads=torch.get_num_threads())
    else:
        info["error"] = str(ops.load_error())
    return info
