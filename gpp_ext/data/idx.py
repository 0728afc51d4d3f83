"""Reader for the IDX files of MNIST-format data sets (MNIST, Fashion-MNIST), plain or gzip-compressed."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

__all__ = ["read_idx"]

# IDX type codes -> big-endian numpy dtypes
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> torch.Tensor:
    """Reads an IDX file (optionally .gz) into a tensor of its stored shape and type.

    Raises `ValueError` naming the file when it is not a valid IDX file (bad magic, unknown type, truncated).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:  # cut short (EOFError) or damaged (BadGzipFile, zlib)
            raise ValueError(f"read_idx: {path} is a damaged or truncated gzip file ({error}); download or copy it "
                             f"again (or reinstall the data package)") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (magic {raw[:4].hex() or 'empty'})")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {path} is truncated in its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path} holds {len(raw) - header} data bytes, its header says "
                         f"{count * dtype.itemsize} (shape {shape})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))
