"""Data: the IDX reader on files written here, Fashion-MNIST loading from a folder, digits and splits."""

import gzip

import numpy as np
import pytest
import torch

from gpp_ext import data


def write_idx(path, array: np.ndarray, code: int, compress=False):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    raw = header + array.astype(dtype).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("code,compress", [(0x08, False), (0x08, True), (0x0B, False), (0x0D, True)])
def test_read_idx_round_trip(tmp_path, code, compress):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 200, size=(5, 3, 4)).astype(np.float32 if code == 0x0D else np.int64)
    write_idx(tmp_path / "a.idx", array, code, compress)
    got = data.read_idx(tmp_path / "a.idx")
    assert got.shape == (5, 3, 4)
    assert np.array_equal(got.numpy().astype(np.float64), array.astype(np.float64))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4)), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "short")


def fake_fashion(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x08, True)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x08, True)


def test_fashion_mnist_from_a_folder(tmp_path):
    fake_fashion(tmp_path)
    train = data.fashion_mnist("train", tmp_path)
    x, y = train.tensors
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [i % 10 for i in range(30)]
    splits = data.load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.2)
    assert len(splits.train) + len(splits.val) == 30 and len(splits.test) == 10
    assert splits.classes[9] == "Ankle boot" and splits.input_shape == (1, 28, 28)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", tmp_path / "nowhere")


def test_digits_splits_are_stratified_disjoint_and_seeded():
    splits = data.load_dataset("digits", val_fraction=0.1, seed=3)
    sizes = len(splits.train), len(splits.val), len(splits.test)
    assert sum(sizes) == 1797 and splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    ids = [set(s.indices) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    test_labels = torch.stack([splits.test[i][1] for i in range(len(splits.test))])
    assert (torch.bincount(test_labels, minlength=10) >= 30).all()  # about 20% of every class
    again = data.load_dataset("digits", val_fraction=0.1, seed=3)
    assert again.test.indices == splits.test.indices


def test_make_splits_errors():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)
    with pytest.raises(ValueError, match="val_fraction"):
        data.make_splits(ds, val_fraction=1.5)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("imagenet")
