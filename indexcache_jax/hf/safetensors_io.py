"""Read and write the safetensors format with NumPy, memory-mapped, including bf16 and fp8.

Why not the `safetensors` package: its NumPy and Flax readers reject float8 (DeepSeek's released weights are fp8),
and its NumPy reader rejects bf16. The format is small and fully specified (an 8-byte little-endian header length,
a JSON header of {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes), and reading it ourselves
lets every check name the file and the tensor. `ml_dtypes` (a jax dependency) supplies bf16 and fp8 for NumPy.

Reading checks the whole header first, then either maps the file and hands out views (`tensor`) or reads one tensor
into a fresh array (`read`, what the loader uses, so at most one tensor is in flight beyond the loaded weights).
Writing goes to a temporary name and is renamed into place, so an interrupted export never leaves a half-written
file under the final name.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit


class SafetensorsError(ValueError):
    """A safetensors file is truncated, malformed or holds something we cannot read; the message names it."""


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file. Use as a context manager; `tensor(name)` returns a view."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: file does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: truncated: {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{self.path}: header claims {header_len} bytes but the file has {size} "
                                       f"(truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has an unreadable header entry {entry!r} "
                                       f"({type(err).__name__}: {err})") from err
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not fit shape "
                                       f"{list(shape)} of {entry['dtype']}")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} needs bytes up to {end} of the data "
                                       f"section but the file holds {data_size}")
            self._entries[name] = (dtype, shape, begin, end)
        self._map = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._map = None  # views handed out keep the mapping alive until they are dropped

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name`, backed by the file (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        return self._map[begin:end].view(dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """A fresh, writable copy of tensor `name`, read with pread and not through the mapping: pages of a mapping
        count as the process's resident memory until it is unmapped, so a loader streaming a whole shard through
        `tensor` would briefly hold the shard twice; `read` holds only this one tensor."""
        dtype, shape, begin, end = self._entries[name]
        out = np.empty(end - begin, np.uint8)
        view, done = memoryview(out), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            while done < len(out):  # one read() returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        return out.view(dtype).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.tensor(name)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` (C-order, little-endian) to `path` atomically; returns the bytes written."""
    path = pathlib.Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in tensors:
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data section 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            array.astype(array.dtype.newbyteorder("<"), copy=False).tofile(f)
    os.replace(tmp, path)
    return 8 + len(encoded) + offset
