"""Your own data: image folders (built from scikit-learn's digits) and .npz arrays, with the same checks as the
built-in sets, run before anything is trained."""

import os

import numpy as np
import pytest
import torch

from gpp_ext.data import load_dataset
from gpp_ext.data.files import image_folder, npz
from gpp_ext.testing import digits_image_folder


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return digits_image_folder(tmp_path_factory.mktemp("flat") / "digits", per_class=30, size=16)


def test_flat_folder_is_split_stratified_and_matches_the_digits(flat):
    splits = load_dataset(f"imagefolder:{flat}", seed=0, progress=False)
    assert splits.classes == tuple(str(d) for d in range(10)) and splits.num_classes == 10
    assert splits.input_shape == (1, 16, 16)  # grayscale PNGs give one channel
    assert len(splits.train) + len(splits.val) + len(splits.test) == 300
    x, y = splits.train[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    # the pixels are the digits' own (x16 -> x255, nearest-neighbour upscaling 8 -> 16), not a decoding artefact
    from sklearn.datasets import load_digits

    digits = load_digits()
    first = digits.images[np.flatnonzero(digits.target == 0)[0]]
    img, label = splits.train.dataset[0]  # sorted file order: class 0's first image
    assert int(label) == 0
    assert np.abs(img[0, ::2, ::2].numpy() * 255 - np.round(first * 255 / 16)).max() < 0.01
    assert splits.preprocessing["normalize"] == "unit" and splits.preprocessing["channels"] == 1


def test_split_folders_rgb_resize_and_dataset_normalisation(tmp_path):
    folder = digits_image_folder(tmp_path / "d", per_class=20, size=10, layout="splits", rgb=True)
    splits = image_folder(folder, image_size=8, normalize="dataset", progress=False)
    assert splits.input_shape == (3, 8, 8)
    assert len(splits.test) == 10 * 4  # the test/ folder, a fifth of each class
    # normalised by the training split's statistics: mean ~0, std ~1 over the training images
    xs = torch.stack([splits.train.dataset[i][0] for i in range(len(splits.train.dataset))])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-2
    assert len(splits.preprocessing["mean"]) == 3


def test_val_folder_is_used_as_the_validation_set(tmp_path):
    folder = digits_image_folder(tmp_path / "d", per_class=20, size=8, layout="splits")
    os.rename(os.path.join(folder, "test"), os.path.join(folder, "val"))
    digits_image_folder(tmp_path / "t", per_class=10, size=8)
    os.rename(tmp_path / "t", os.path.join(folder, "test"))
    splits = image_folder(folder, progress=False)
    assert len(splits.val) == 40 and len(splits.test) == 100 and len(splits.train) == 160


@pytest.mark.parametrize("damage,match", [
    ("missing_class", "has no folder for class '9'"),
    ("empty_class", "holds no images"),
    ("broken_image", "cannot decode"),
    ("one_class", "at least 2"),
    ("sizes", "pass image_size"),
])
def test_bad_folders_are_refused_by_name(tmp_path, damage, match):
    folder = digits_image_folder(tmp_path / "d", per_class=10, size=8, layout="splits")
    if damage == "missing_class":
        for f in os.listdir(os.path.join(folder, "test", "9")):
            os.unlink(os.path.join(folder, "test", "9", f))
        os.rmdir(os.path.join(folder, "test", "9"))
    elif damage == "empty_class":
        for f in os.listdir(os.path.join(folder, "train", "3")):
            os.unlink(os.path.join(folder, "train", "3", f))
    elif damage == "broken_image":
        with open(os.path.join(folder, "train", "2", "0002.png"), "wb") as f:
            f.write(b"not a png")
    elif damage == "one_class":
        folder = tmp_path / "one"
        (folder / "a").mkdir(parents=True)
    elif damage == "sizes":
        from PIL import Image

        Image.new("L", (9, 9)).save(os.path.join(folder, "train", "1", "big.png"))
    with pytest.raises(ValueError, match=match):
        image_folder(folder, progress=False)


def test_missing_folder_and_bad_options():
    with pytest.raises(FileNotFoundError, match="imagefolder: no folder"):
        load_dataset("imagefolder:/no/such/folder")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("imagefolder:")
    with pytest.raises(ValueError, match="normalize must be one of"):
        image_folder(".", normalize="zscore")


def test_npz_with_and_without_a_test_split(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, size=(200, 8, 8), dtype=np.uint8)
    y = np.arange(200) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    splits = npz(tmp_path / "a.npz")
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 4 and len(splits.test) == 40
    assert float(splits.train[0][0].max()) <= 1.0  # uint8 scaled to [0, 1]
    np.savez(tmp_path / "b.npz", x=x.astype(np.float32), y=y, x_test=x[:20].astype(np.float32), y_test=y[:20],
             classes=np.array(["a", "b", "c", "d"]))
    splits = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert len(splits.test) == 20 and splits.classes == ("a", "b", "c", "d")


@pytest.mark.parametrize("arrays,match", [
    (dict(x=np.zeros((10, 4, 4))), "must hold arrays 'x' and 'y'"),
    (dict(x=np.zeros((10, 4, 4)), y=np.zeros(9, dtype=int)), "must be \\[N\\] labels for the 10 samples"),
    (dict(x=np.zeros((10, 4, 4)), y=np.full(10, 0.5)), "integer class indices"),
    (dict(x=np.zeros((10, 4, 4)), y=np.arange(10) % 2, x_test=np.zeros((4, 4, 4))), "only one of"),
    (dict(x=np.full((10, 4, 4), np.nan), y=np.arange(10) % 2), "NaN"),
    (dict(x=np.zeros((20, 4, 4)), y=np.arange(20) % 2, x_test=np.zeros((4, 5, 5)), y_test=np.arange(4) % 2),
     "test inputs are \\[1, 5, 5\\]"),
    (dict(x=np.zeros((20, 4, 4)), y=np.arange(20) % 3 * 2), "not the class indices 0..K-1"),
])
def test_bad_npz_is_refused_by_name(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        npz(tmp_path / "bad.npz")


def test_npz_not_a_file(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(ValueError, match="cannot read"):
        npz(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        npz(tmp_path / "none.npz")
    np.save(tmp_path / "one.npy", np.zeros((4, 8, 8), dtype=np.float32))  # a single array, not x and y
    with pytest.raises(ValueError, match=r"one\.npy holds a single array \(a \.npy file, shape \(4, 8, 8\)\)"):
        npz(tmp_path / "one.npy")
