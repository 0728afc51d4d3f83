"""Your own data: a folder of images (one sub-folder per class) or arrays in a `.npz` file.

    load_dataset("imagefolder:photos", image_size=64)   # photos/<class>/*.png, or photos/{train,val,test}/<class>/
    load_dataset("npz:arrays.npz")                      # x [N, C, H, W] or [N, H, W], y [N]; x_test, y_test optional

Both end in the same `make_splits` checks as the built-in sets (label range, every class in every split, one
input shape), run before anything is trained. Images are decoded once, with Pillow (or torchvision when Pillow
is missing), resized to `image_size`, and held in memory as uint8 (N x C x S x S bytes), or uint16 when any
image has 16 bits (16-bit grayscale PNG or TIFF; full scale is 65535, not clipped to 255); samples come out as
float32, scaled to [0, 1] and then normalised as asked:

- `normalize="unit"`: [0, 1] as they are (the default, like the built-in sets);
- `normalize="dataset"`: per-channel mean and std of the training split (recorded in `DataSplits.preprocessing`,
  so a deployment can apply the same);
- `normalize="imagenet"`: ImageNet's mean and std, for weights trained on it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .splits import make_splits

__all__ = ["image_folder", "npz", "ImageTensors", "IMAGE_EXTENSIONS", "NORMALIZATIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NORMALIZATIONS = ("unit", "dataset", "imagenet")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_SPLIT_DIRS = ("train", "val", "test")


class ImageTensors(TensorDataset):
    """Images held as unsigned integers `[N, C, H, W]` (uint8, or uint16 for 16-bit images) with int64 labels; a
    sample is `((x / full - mean) / std, label)` in float32, `full` being 255 or 65535. A `TensorDataset`, so
    labels are read without decoding inputs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean=None, std=None):
        super().__init__(images, labels)
        c = images.shape[1]
        self.full = _FULL[images.dtype]
        self.mean = torch.tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(c, 1, 1)

    def __getitem__(self, index):
        x = self.tensors[0][index].float().div_(self.full)
        return (x - self.mean) / self.std, self.tensors[1][index]


_FULL = {torch.uint8: 255.0, torch.uint16: 65535.0}
# Pillow modes: 8-bit grayscale, 16-bit (or wider) grayscale integers, floats; everything else is colour.
_GRAY8 = ("1", "L", "LA", "La")
_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _from_pillow(path: str, mode: str | None, size: int | None) -> np.ndarray:
    """An image file as `[C, H, W]`: uint8, or uint16 for 16-bit (and 32-bit integer or float) grayscale, whose
    full range Pillow's own conversion to 8 bits would clip. `mode` "L" or "RGB" converts; None keeps 1 channel
    for a grayscale file and 3 for any other."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _GRAY16 or im.mode == "F":
            a = np.asarray(im)
            if im.mode == "F":
                if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
                    raise ValueError(f"a floating-point image must hold values in [0, 1], found "
                                     f"[{np.nanmin(a):g}, {np.nanmax(a):g}]; save it as 8- or 16-bit")
                a = a * 65535.0
            elif a.min() < 0 or a.max() > 65535:
                raise ValueError(f"a {im.mode} image must hold values in 0..65535 (16 bits), found "
                                 f"[{a.min()}, {a.max()}]; save it as 8- or 16-bit")
            f = Image.fromarray(a.astype(np.float32))  # mode F
            if size is not None and f.size != (size, size):
                f = f.resize((size, size), Image.BILINEAR)
            a = np.clip(np.rint(np.asarray(f, dtype=np.float32)), 0, 65535).astype(np.uint16)[None]
            return np.repeat(a, 3, axis=0) if mode == "RGB" else a
        target = mode or ("L" if im.mode in _GRAY8 else "RGB")
        im = im.convert(target)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decoder():
    try:
        import PIL  # noqa: F401

        return _from_pillow
    except ImportError:
        pass
    try:
        import torchvision.io as tio
        import torchvision.transforms.functional as TF
    except ImportError:
        raise ValueError("imagefolder: decoding images needs Pillow (pip install Pillow) or torchvision") from None

    def decode(path, mode, size):
        x = tio.decode_image(tio.read_file(path), mode=tio.ImageReadMode.UNCHANGED)  # uint8, or uint16
        x = x[:1] if x.shape[0] in (1, 2) else x[:3]  # alpha dropped
        if mode == "L" and x.shape[0] == 3:
            x = TF.rgb_to_grayscale(x)
        elif mode == "RGB" and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if size is not None and tuple(x.shape[1:]) != (size, size):
            wide = x.dtype != torch.uint8
            x = TF.resize(x.float() if wide else x, [size, size], antialias=True)
            x = x.round().clamp(0, 65535).to(torch.int32).numpy().astype(np.uint16) if wide else x
        return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    return decode


def _class_dirs(folder: str) -> list:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _files(folder: str, classes: list, where: str) -> tuple:
    """(paths, labels) of the images under `folder/<class>/` (nested folders included), in a fixed order."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        root = os.path.join(folder, name)
        if not os.path.isdir(root):
            raise ValueError(f"imagefolder: {where} has no folder for class {name!r} ({root}); every split needs "
                             f"the same class folders")
        found = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not found:
            raise ValueError(f"imagefolder: {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return paths, labels


def _decode_all(paths: list, channels: int | None, size: int | None, progress: bool) -> torch.Tensor:
    """Every image as one `[N, C, H, W]` tensor. `channels` None: 3 when any image has colour (a grayscale one
    is then repeated over the three, which loses nothing), else 1. uint8, or uint16 when any image has 16 bits
    (8-bit ones are then scaled by 257, so 255 stays full scale)."""
    from tqdm.auto import tqdm

    decode = _decoder()
    mode = {1: "L", 3: "RGB", None: None}[channels]
    arrays, first = [], None
    for path in tqdm(paths, desc="decoding images", leave=False, disable=None if progress else True):
        try:
            a = decode(path, mode, size)
        except Exception as error:
            raise ValueError(f"imagefolder: cannot decode {path} ({type(error).__name__}: {error})") from error
        if first is None:
            first = (path, a.shape[1:])
        elif a.shape[1:] != first[1]:
            raise ValueError(f"imagefolder: {path} is {a.shape[2]}x{a.shape[1]} but {first[0]} is "
                             f"{first[1][1]}x{first[1][0]}; pass image_size (--image-size) to resize them all")
        arrays.append(a)
    c = max(a.shape[0] for a in arrays)
    wide = any(a.dtype == np.uint16 for a in arrays)
    out = np.empty((len(arrays), c, *first[1]), dtype=np.uint16 if wide else np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.astype(np.uint16) * 257 if wide and a.dtype == np.uint8 else a  # broadcasts 1 -> 3 channels
    return torch.from_numpy(out)


def _stats(images: torch.Tensor) -> tuple:
    """Per-channel mean and std of uint8 or uint16 images in [0, 1] units, accumulated in float64."""
    x = images.to(torch.float64).div_(_FULL[images.dtype]).transpose(0, 1).reshape(images.shape[1], -1)
    mean, std = x.mean(1), x.std(1).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def image_folder(folder, image_size: int | None = None, channels: int | None = None, normalize: str = "unit",
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, progress: bool = True):
    """`DataSplits` of a folder of labelled images.

    Layouts: `folder/<class>/*` (validation and test sets are carved out, stratified and seeded), or
    `folder/train/<class>/*` with `folder/test/<class>/*` and optionally `folder/val/<class>/*` (else validation
    is carved out of train). Class names are the sorted sub-folder names of the training folder.

    Args:
        image_size: resize every image to this square size (default: keep; all must then have one size).
        channels: 1 (grayscale) or 3 (RGB); default 3 when any image has colour, 1 when all are grayscale.
        normalize: "unit", "dataset" or "imagenet" (see the module's doc).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"imagefolder: no folder {folder}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"imagefolder: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"imagefolder: channels must be 1 or 3, got {channels}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"imagefolder: image_size must be a positive int, got {image_size!r}")
    split_dirs = {s: os.path.join(folder, s) for s in _SPLIT_DIRS if os.path.isdir(os.path.join(folder, s))}
    if split_dirs and "train" not in split_dirs:
        raise ValueError(f"imagefolder: {folder} has {', '.join(split_dirs)} but no train/ folder")
    if split_dirs and set(_class_dirs(folder)) - set(_SPLIT_DIRS):
        raise ValueError(f"imagefolder: {folder} mixes split folders (train/, test/) with other folders "
                         f"{sorted(set(_class_dirs(folder)) - set(_SPLIT_DIRS))[:4]}; use one layout")
    train_dir = split_dirs.get("train", folder)
    classes = _class_dirs(train_dir)
    if len(classes) < 2:
        raise ValueError(f"imagefolder: {train_dir} must hold one sub-folder per class (at least 2), found "
                         f"{classes or 'none'}")
    listed = {s: _files(d, classes, d) for s, d in (split_dirs.items() if split_dirs else [("train", folder)])}
    extra = {s: sorted(set(_class_dirs(d)) - set(classes)) for s, d in split_dirs.items()}
    extra = {s: e for s, e in extra.items() if e}
    if extra:
        s, e = next(iter(extra.items()))
        raise ValueError(f"imagefolder: {split_dirs[s]} has class folders {e[:4]} that train/ lacks")
    all_paths = [p for paths, _ in listed.values() for p in paths]
    images = _decode_all(all_paths, channels, image_size, progress)
    channels = images.shape[1]
    sets, start = {}, 0
    for s, (paths, labels) in listed.items():
        sets[s] = (images[start:start + len(paths)], torch.tensor(labels, dtype=torch.long))
        start += len(paths)
    mean = std = None
    if normalize == "imagenet":
        mean, std = (list(v[:1]) if channels == 1 else list(v) for v in _IMAGENET)
    elif normalize == "dataset":
        mean, std = _stats(sets["train"][0])
    make = lambda s: ImageTensors(*sets[s], mean, std) if s in sets else None  # noqa: E731
    splits = make_splits(make("train"), make("test"), val_fraction, test_fraction, seed=seed,
                         name=f"imagefolder:{folder}", classes=classes, val=make("val"))
    splits.preprocessing = {"scale": 1 / _FULL[images.dtype], "mean": mean or [0.0] * channels,
                            "std": std or [1.0] * channels,
                            "channels": channels, "image_size": list(images.shape[2:]), "normalize": normalize}
    return splits


def _array(data, key: str, path: str):
    try:
        a = data[key]
    except ValueError as error:  # numpy refuses object arrays without allow_pickle (which would run code)
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise ValueError(f"npz: {path}: array {key!r} holds Python objects, which are not read (loading them "
                             f"could run code); save numeric arrays (x as numbers, y as integers, classes as "
                             f"strings)") from None
        raise ValueError(f"npz: {path}: cannot read array {key!r} ({error})") from error
    except Exception as error:  # a damaged member: zlib, zipfile, a cut-short header
        raise ValueError(f"npz: {path}: cannot read array {key!r} ({type(error).__name__}: {error}); the file is "
                         f"damaged or incomplete") from error
    if a.dtype == object:
        raise ValueError(f"npz: {path}: array {key!r} holds Python objects; save numeric arrays")
    if key != "classes" and not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"npz: {path}: array {key!r} must be numeric, got dtype {a.dtype}")
    return a


def _scaled(x: np.ndarray, key: str, path: str) -> torch.Tensor:
    """`x` as float32: floats as they are; uint8 and uint16 images divided by their full scale (255, 65535);
    other integers (int32, int64, ...: arrays built from Python lists) divided by 255 when they lie in
    0..255, refused otherwise (their scale is unknown)."""
    if np.issubdtype(x.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"npz: {path}: {key!r} holds complex numbers; save real-valued arrays")
    if x.dtype == np.bool_:
        return torch.from_numpy(x.astype(np.float32))
    full = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(x.dtype.newbyteorder("="))
    if full is None:
        low, high = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(f"npz: {path}: {key!r} holds {x.dtype} values in [{low}, {high}], whose scale is "
                             f"unknown; save images as uint8 (0..255) or uint16 (0..65535), or features as floats")
        full = 255.0
    return torch.from_numpy((x.astype(np.float64) / full).astype(np.float32))


def npz(path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, classes=None):
    """`DataSplits` of arrays in a `.npz` file: `x` `[N, C, H, W]` (or `[N, H, W]`, one channel; or `[N, F]`
    features) and integer labels `y` `[N]`, optionally `x_test`/`y_test` (else a test set is carved out) and
    `classes` (class names). uint8 and uint16 images are scaled to [0, 1] by their full scale (255, 65535),
    other integer arrays by 255 when they lie in 0..255 (else refused); floats are taken as they are."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz: no file {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"npz: cannot read {path} ({type(error).__name__}: {error}); expected a .npz file written "
                         f"by numpy.savez with arrays x and y") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"npz: {path} holds a single array (a .npy file, shape {getattr(data, 'shape', '?')}); "
                         f"expected a .npz file written by numpy.savez with arrays x and y")
    with data:
        keys = set(data.files)
        if not {"x", "y"} <= keys:
            raise ValueError(f"npz: {path} must hold arrays 'x' and 'y' (found {sorted(keys)})")
        if ("x_test" in keys) != ("y_test" in keys):
            raise ValueError(f"npz: {path} holds only one of 'x_test' and 'y_test'; give both or neither")
        arrays = {k: _array(data, k, path) for k in ("x", "y", "x_test", "y_test", "classes") if k in keys}
    if classes is None and "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].tolist()]

    def tensors(xk, yk):
        x, y = arrays[xk], arrays[yk]
        if x.ndim not in (2, 3, 4):
            raise ValueError(f"npz: {path}: {xk!r} must be [N, C, H, W], [N, H, W] or [N, F], got shape {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"npz: {path}: {yk!r} must be [N] labels for the {x.shape[0]} samples of {xk!r}, got "
                             f"shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
                raise ValueError(f"npz: {path}: {yk!r} must hold integer class indices, got {y.dtype}")
        xt = _scaled(x, xk, path)
        if xt.dim() == 3:
            xt = xt.unsqueeze(1)
        if not torch.isfinite(xt).all():
            raise ValueError(f"npz: {path}: {xk!r} holds NaN or infinite values")
        return TensorDataset(xt, torch.from_numpy(y.astype(np.int64)))

    test = tensors("x_test", "y_test") if "x_test" in arrays else None
    return make_splits(tensors("x", "y"), test, val_fraction, test_fraction, seed=seed, name=f"npz:{path}",
                       classes=classes)
