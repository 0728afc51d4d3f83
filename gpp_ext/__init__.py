"""gpp_ext: Grow-Push-Prune compression of PyTorch classifiers.

`gpp_ext.ops` holds the kernels (discriminant analysis of activations, channel surgery) and `gpp_ext.reference`
their pure-PyTorch definitions; `DiscriminantAnalyzer`, `ChannelGraph` and `prune` are the pruning engine;
`gpp_ext.models` the built-in networks and `gpp_ext.io` saving compact models; `gpp_ext.build_info()` says how
the compiled core was built.
"""

from __future__ import annotations

import torch

from . import io, models, ops, reference
from .analysis import DiscriminantAnalyzer
from .cost import count_flops, count_params
from .graph import ChannelGraph
from .pruning import PruneReport, prune
from .stats import ScatterStats

__version__ = "0.1.0"
__all__ = ["ops", "reference", "io", "models", "ScatterStats", "DiscriminantAnalyzer", "ChannelGraph", "prune",
           "PruneReport", "count_params", "count_flops", "build_info", "__version__"]


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
