"""Bridges to other pruning libraries (optional dependencies, imported on use).

- `gpp_ext.interop.torch_pruning.DiscriminantImportance`: our traced discriminant utility as a Torch-Pruning
  importance, so a Torch-Pruning pruner switches criterion with one line.
"""
