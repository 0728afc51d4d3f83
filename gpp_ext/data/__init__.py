"""Data for the grow-push-prune workflow: IDX files (Fashion-MNIST), scikit-learn's digits, any Dataset."""

from .datasets import (FASHION_MNIST_CLASSES, DataSplits, digits, fashion_mnist, find_fashion_mnist, labels_of,
                       load_dataset, make_splits)
from .idx import read_idx

__all__ = ["read_idx", "DataSplits", "load_dataset", "fashion_mnist", "digits", "make_splits", "find_fashion_mnist",
           "labels_of", "FASHION_MNIST_CLASSES"]
