"""The layer-type tables every part of gpp_ext agrees on: which modules are convolutions, which are
normalisations with per-channel statistics, and which attributes of torch's layers describe their widths.

Defined once here so that the graph, the surgery, the criteria, the cost counters, the training helpers and
the model files cannot disagree about what a "BatchNorm" or a "width" is.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["CONV", "BATCH_NORMS", "WIDTH_LAYERS", "WIDTH_ATTRS", "is_batch_norm"]

# Convolutions whose weight is [out_channels, in_channels / groups, *kernel].
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Normalisations that keep per-channel running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy forms).
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)

# torch's own layers whose widths live in plain attributes; pruning changes them and loading restores them.
WIDTH_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                nn.PReLU)

# The width attributes themselves (a container's attributes of the same names may be read-only properties,
# which is why only WIDTH_LAYERS are read and written).
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "num_parameters", "normalized_shape", "num_channels", "num_groups")


def is_batch_norm(module: nn.Module) -> bool:
    """True for any BatchNorm (1d, 2d, 3d, sync, lazy)."""
    return isinstance(module, BATCH_NORMS)
