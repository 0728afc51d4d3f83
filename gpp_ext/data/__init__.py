"""Data for the grow-push-prune workflow: IDX files (Fashion-MNIST), scikit-learn's digits, image folders and
.npz arrays, any Dataset."""

from .datasets import FASHION_MNIST_CLASSES, digits, fashion_mnist, find_fashion_mnist, load_dataset
from .files import image_folder, npz
from .idx import read_idx
from .splits import DataSplits, labels_of, make_splits

__all__ = ["read_idx", "DataSplits", "load_dataset", "fashion_mnist", "digits", "make_splits", "find_fashion_mnist",
           "labels_of", "FASHION_MNIST_CLASSES", "image_folder", "npz"]
