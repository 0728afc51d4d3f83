"""The data sets the command line and the benchmarks use, loaded from local files only (never downloaded).

- Fashion-MNIST from its IDX files: Debian's `dataset-fashion-mnist` package (`apt-get install
  dataset-fashion-mnist`), a folder given as `data_dir`, or `$GPP_EXT_DATA_DIR`.
- scikit-learn's 8x8 `digits` (ships with scikit-learn); it has no official test split, so a fixed,
  class-stratified 20% is held out as the test set.
- Any `torch.utils.data.Dataset` of `(input, label)` pairs through `make_splits`.

Training data is split into train and validation (stratified, seeded); the test set is for reporting only.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .idx import read_idx

__all__ = ["DataSplits", "load_dataset", "fashion_mnist", "digits", "make_splits", "find_fashion_mnist",
           "labels_of", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SEARCH = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist",
           "/usr/local/share/fashion-mnist")
_HOW_TO_GET = ("install Debian's package (`apt-get install dataset-fashion-mnist`), or pass the folder holding "
               "train-images-idx3-ubyte[.gz] and the other three IDX files as data_dir (--data-dir on the command "
               "line), or set GPP_EXT_DATA_DIR")


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


def _file(folder: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_fashion_mnist(data_dir=None) -> str:
    """The folder that holds the four Fashion-MNIST IDX files; `FileNotFoundError` says how to get them."""
    folders = [os.fspath(data_dir)] if data_dir else []
    if os.environ.get("GPP_EXT_DATA_DIR"):
        folders.append(os.environ["GPP_EXT_DATA_DIR"])
    if not data_dir:
        for base in _SEARCH:
            folders += [base] + sorted(glob.glob(os.path.join(base, "**"), recursive=True))
    for folder in folders:
        if os.path.isdir(folder) and all(_file(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    where = f"in {data_dir}" if data_dir else "in " + ", ".join(_SEARCH)
    raise FileNotFoundError(f"Fashion-MNIST not found {where}: {_HOW_TO_GET}")


def fashion_mnist(split: str = "train", data_dir=None) -> TensorDataset:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000) as float32 images `[N, 1, 28, 28]` in [0, 1]."""
    if split not in _FILES:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(data_dir)
    images = read_idx(_file(folder, _FILES[split][0]))
    labels = read_idx(_file(folder, _FILES[split][1]))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"fashion_mnist: {folder} holds images {tuple(images.shape)} and labels "
                         f"{tuple(labels.shape)}; expected [N, 28, 28] and [N]")
    return TensorDataset(images.unsqueeze(1).float() / 255.0, labels.long())


def digits() -> TensorDataset:
    """scikit-learn's 8x8 digits (1797 images) as float32 `[N, 1, 8, 8]` in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return TensorDataset(x, torch.as_tensor(data.target, dtype=torch.long))


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
                seed: int = 0, name: str = "custom", classes=None) -> DataSplits:
    """Train/validation(/test) splits of any labelled data set, stratified by class and seeded.

    Without a `test` set, `test_fraction` of `train` is held out as one. The validation set always comes out
    of the training data; the test set is used only for reporting.

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
    if test is not None:
        test_shape = _input_shape(test)
        if test_shape != shape:
            raise ValueError(f"make_splits: {name}: the test inputs are {list(test_shape)} but the training inputs "
                             f"are {list(shape)}; both splits must have one input shape (resize one of them)")
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(train))
    if test is None:
        rest, held = _stratified(labels, test_fraction, g)
        test, pool = Subset(train, held.tolist()), rest
    fit, val = _stratified(labels[pool], val_fraction, g)
    _check_labels(labels[pool[val]], num_classes, "validation", name, classes)
    _check_labels(labels_of(test), num_classes, "test", name, classes)
    return DataSplits(Subset(train, pool[fit].tolist()), Subset(train, pool[val].tolist()), test, num_classes,
                      shape, classes, name)


def load_dataset(name: str, data_dir=None, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """"fashion-mnist" or "digits" as `DataSplits`."""
    if name == "fashion-mnist":
        return make_splits(fashion_mnist("train", data_dir), fashion_mnist("test", data_dir), val_fraction,
                           seed=seed, name=name, classes=FASHION_MNIST_CLASSES)
    if name == "digits":
        return make_splits(digits(), None, val_fraction, seed=seed, name=name, classes=tuple(map(str, range(10))))
    raise ValueError(f"load_dataset: unknown data set {name!r}; known: fashion-mnist, digits")
