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


def make_splits(train: Dataset, test: Dataset | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0, name: str = "custom", classes=None) -> DataSplits:
    """Train/validation(/test) splits of any labelled data set, stratified by class and seeded.

    Without a `test` set, `test_fraction` of `train` is held out as one. The validation set always comes out
    of the training data; the test set is used only for reporting.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError(f"make_splits: val_fraction and test_fraction must be in (0, 1), got {val_fraction}, "
                         f"{test_fraction}")
    if len(train) == 0:
        raise ValueError("make_splits: the training data set is empty")
    g = torch.Generator().manual_seed(seed)
    labels = labels_of(train)
    pool = torch.arange(len(train))
    if test is None:
        rest, held = _stratified(labels, test_fraction, g)
        test, pool = Subset(train, held.tolist()), rest
    fit, val = _stratified(labels[pool], val_fraction, g)
    num_classes = int(labels.max()) + 1
    return DataSplits(Subset(train, pool[fit].tolist()), Subset(train, pool[val].tolist()), test, num_classes,
                      tuple(train[0][0].shape), tuple(classes) if classes else tuple(map(str, range(num_classes))),
                      name)


def load_dataset(name: str, data_dir=None, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """"fashion-mnist" or "digits" as `DataSplits`."""
    if name == "fashion-mnist":
        return make_splits(fashion_mnist("train", data_dir), fashion_mnist("test", data_dir), val_fraction,
                           seed=seed, name=name, classes=FASHION_MNIST_CLASSES)
    if name == "digits":
        return make_splits(digits(), None, val_fraction, seed=seed, name=name)
    raise ValueError(f"load_dataset: unknown data set {name!r}; known: fashion-mnist, digits")
