"""The data sets the command line and the benchmarks use, loaded from local files only (never downloaded).

- Fashion-MNIST from its IDX files: Debian's `dataset-fashion-mnist` package (`apt-get install
  dataset-fashion-mnist`), a folder given as `data_dir`, or `$GPP_EXT_DATA_DIR`.
- scikit-learn's 8x8 `digits` (ships with scikit-learn); it has no official test split, so a fixed,
  class-stratified 20% is held out as the test set.
- Your own: a folder of images or a `.npz` file (`gpp_ext.data.files`), named `imagefolder:DIR`, `npz:FILE`.
- Any `torch.utils.data.Dataset` of `(input, label)` pairs through `make_splits` (`gpp_ext.data.splits`).

Training data is split into train and validation (stratified, seeded); the test set is for reporting only.
"""

from __future__ import annotations

import glob
import os

import torch
from torch.utils.data import TensorDataset

from .idx import read_idx
from .splits import DataSplits, labels_of, make_splits

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


def load_dataset(name: str, data_dir=None, val_fraction: float = 0.1, seed: int = 0, image_size: int | None = None,
                 channels: int | None = None, normalize: str = "unit", test_fraction: float = 0.2,
                 progress: bool = True) -> DataSplits:
    """A data set by name as `DataSplits`: "fashion-mnist", "digits", "imagefolder:DIR" or "npz:FILE" (see
    `gpp_ext.data.files`; `image_size`, `channels`, `normalize` apply to image folders, `test_fraction` to both
    when they hold no test split)."""
    kind, _, where = name.partition(":")
    if kind in ("imagefolder", "npz") and not where:
        raise ValueError(f"load_dataset: {kind}: needs a path, e.g. {kind}:" + ("photos" if kind == "imagefolder"
                                                                                else "arrays.npz"))
    if kind == "imagefolder" and where:
        from .files import image_folder

        return image_folder(where, image_size, channels, normalize, val_fraction, test_fraction, seed, progress)
    if kind == "npz" and where:
        from .files import npz

        return npz(where, val_fraction, test_fraction, seed)
    if name == "fashion-mnist":
        return make_splits(fashion_mnist("train", data_dir), fashion_mnist("test", data_dir), val_fraction,
                           seed=seed, name=name, classes=FASHION_MNIST_CLASSES)
    if name == "digits":
        return make_splits(digits(), None, val_fraction, seed=seed, name=name, classes=tuple(map(str, range(10))))
    raise ValueError(f"load_dataset: unknown data set {name!r}; known: fashion-mnist, digits, imagefolder:DIR, "
                     f"npz:FILE")
