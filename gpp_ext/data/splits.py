"""`DataSplits` and `make_splits`: train / validation / test sets of any labelled data, stratified, seeded and
checked (labels against the classes, every class in every split, one input shape) before anything trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["DataSplits", "make_splits", "labels_of"]


@dataclass
class DataSplits:
    """Train / validation / test data sets of one task, with what a model needs to know about it."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple
    classes: tuple
    name: str
    preprocessing: dict | None = None  # how raw inputs become model inputs (image folders: scale, mean, std)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """All labels of a labelled data set, `[N]` int64 (read without loading inputs for tensor data sets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def _stratified(labels: torch.Tensor, fraction: float, generator: torch.Generator):
    """Index sets (rest, held out) with `fraction` of every class held out."""
    rest, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def _input_shape(dataset: Dataset) -> tuple:
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors[0].shape[1:])
    return tuple(dataset[0][0].shape)


def _check_labels(labels: torch.Tensor, num_classes: int, split: str, name: str, classes: tuple) -> None:
    """Every label of `split` is a class index in [0, num_classes), and every class occurs in it."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"make_splits: {name}: {bad.numel()} label(s) of the {split} set are not class indices "
                         f"0..{num_classes - 1} (e.g. label {int(labels[i])} at index {i}); the data set has "
                         f"{num_classes} classes, so fix the labels (or give every class in classes=)")
    counts = torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        shown = ", ".join(f"{c} ({classes[c]})" if classes[c] != str(c) else str(c) for c in missing[:10])
        raise ValueError(f"make_splits: {name}: class(es) {shown} have no samples in the {split} set of "
                         f"{labels.numel()}; every class must occur in every split (for a small class, a larger "
                         f"val_fraction / test_fraction or more data)")


def make_splits(train: Dataset, test: Dataset | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0, name: str = "custom", classes=None, val: Dataset | None = None) -> DataSplits:
    """Train/validation(/test) splits of any labelled data set, stratified by class and seeded.

    Without a `test` set, `test_fraction` of `train` is held out as one. Without a `val` set, `val_fraction`
    of the training data is held out as the validation set; the test set is used only for reporting.

    The class count is `len(classes)` when `classes` (the class names) is given, else the labels must be
    `0..K-1`. Checked before anything is trained: every label of every split is a class index, every class
    occurs in the training, validation and test sets, and the test inputs have the training inputs' shape;
    a `ValueError` names the split and what is wrong.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError(f"make_splits: val_fraction and test_fraction must be in (0, 1), got {val_fraction}, "
                         f"{test_fraction}")
    if len(train) == 0:
        raise ValueError(f"make_splits: {name}: the training data set is empty")
    if test is not None and len(test) == 0:
        raise ValueError(f"make_splits: {name}: the test data set is empty")
    labels = labels_of(train)
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError(f"make_splits: {name}: labels must be integer class indices [N], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        if len(classes) < 2:
            raise ValueError(f"make_splits: {name}: classes must name at least 2 classes, got {classes}")
        num_classes = len(classes)
    else:
        num_classes = int(labels.max()) + 1
        distinct = labels.unique()
        if distinct.numel() != num_classes or int(distinct[0]) != 0:
            top = int((labels == labels.max()).nonzero()[0])
            raise ValueError(f"make_splits: {name}: the training labels are not the class indices 0..K-1: "
                             f"{distinct.numel()} distinct values from {int(distinct[0])} to {num_classes - 1} (label "
                             f"{num_classes - 1} at index {top}); relabel them 0..K-1, or name every class in "
                             f"classes= so that a class absent from the data is an error rather than a guess")
        classes = tuple(map(str, range(num_classes)))
    _check_labels(labels, num_classes, "training", name, classes)
    shape = _input_shape(train)
    for split, other in (("test", test), ("validation", val)):
        if other is None:
            continue
        if len(other) == 0:
            raise ValueError(f"make_splits: {name}: the {split} data set is empty")
        other_shape = _input_shape(other)
        if other_shape != shape:
            raise ValueError(f"make_splits: {name}: the {split} inputs are {list(other_shape)} but the training "
                             f"inputs are {list(shape)}; all splits must have one input shape (resize them)")
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(train))
    if test is None:
        rest, held = _stratified(labels, test_fraction, g)
        test, pool = Subset(train, held.tolist()), rest
    if val is None:
        fit, held = _stratified(labels[pool], val_fraction, g)
        val, pool = Subset(train, pool[held].tolist()), pool[fit]
    _check_labels(labels_of(val), num_classes, "validation", name, classes)
    _check_labels(labels_of(test), num_classes, "test", name, classes)
    return DataSplits(Subset(train, pool.tolist()), val, test, num_classes, shape, classes, name)
