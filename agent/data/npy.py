""".npy files through numpy's own format functions (`numpy.lib.format`): a header that is written
before the final shape is known and rewritten in place once it is, and the data offset of a file.

numpy's version 1.0 header leaves room for the first axis to grow to 21 digits (it pads the header
so that it can be "modified in-place when changing the array size"), so the header of
(0, *row_shape) and of (n, *row_shape) have the same length and the data never moves. Files
written by older versions of this project (a fixed 128-byte header) read the same way: readers
take the data offset from each file's own header, never from a constant.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

COPY_BLOCK_BYTES = 64 << 20


def header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """numpy's version 1.0 .npy header (magic, length, dict, padding) of a C-order array."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": npy_format.dtype_to_descr(np.dtype(dtype)),
                                            "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


@dataclass(frozen=True)
class Header:
    """What a .npy file's header says, and where its data starts (bytes)."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int


def read_header(file: str | os.PathLike | BinaryIO) -> Header:
    """The header of a .npy file (path or binary file at position 0); raises ValueError when the file
    is not a .npy file (numpy's own parser)."""
    if not hasattr(file, "read"):
        with open(file, "rb") as f:
            return read_header(f)
    version = npy_format.read_magic(file)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(file)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return Header(tuple(shape), bool(fortran_order), np.dtype(dtype), file.tell())


def data_offset(path: str | os.PathLike) -> int:
    """Byte offset of the array data in a .npy file."""
    return read_header(path).offset


class Appender:
    """Writes a C-order .npy file row block by row block (rows of `row_shape`), hashing the data
    bytes as they are written; `finish()` rewrites the header with the final row count."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self.sha256 = hashlib.sha256()
        self._file: BinaryIO = open(self.path, "wb")
        self._header_bytes = len(header(self.dtype, (0, *self.row_shape)))
        self._file.write(header(self.dtype, (0, *self.row_shape)))

    def write(self, data: np.ndarray) -> None:
        """Append data (rows, *row_shape), converted to the file's dtype."""
        data = np.ascontiguousarray(data, dtype=self.dtype)
        raw = data.reshape(-1).view(np.uint8)
        self._file.write(raw)
        self.sha256.update(raw)
        self.rows += data.shape[0]

    def copy_from(self, source: str | os.PathLike, rows: int) -> None:
        """Append the data of another .npy file holding `rows` rows of the same dtype and row shape."""
        with open(source, "rb") as src:
            src.seek(data_offset(source))
            while block := src.read(COPY_BLOCK_BYTES):
                self._file.write(block)
                self.sha256.update(block)
        self.rows += rows

    def finish(self) -> tuple[int, ...]:
        """Write the final header, fsync and close; returns the array's shape."""
        shape = (self.rows, *self.row_shape)
        final = header(self.dtype, shape)
        if len(final) != self._header_bytes:  # numpy pads for a 21-digit first axis: cannot happen
            raise ValueError(f"{self.path}: the .npy header of shape {shape} does not fit the space reserved for it")
        self._file.seek(0)
        self._file.write(final)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return shape

    def close(self) -> None:
        self._file.close()
