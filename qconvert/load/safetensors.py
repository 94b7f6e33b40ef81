"""Safetensors files: our own validating header parser and lazy, memory-mapped tensor reads.

We do not trust the safetensors library for validation: a malformed header must become one `BadInput` line
naming the file and the problem, never a Rust panic or a gigantic allocation. Reads map the file privately
(copy-on-write) so `torch.frombuffer` gets a writable buffer and touches only the pages of that tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import BadInput, IOFailure
from qconvert.load.dtypes import DTYPES, torch_dtype

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation uses the same cap


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; nothing is read."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int  # absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: list[TensorInfo]  # in file (data offset) order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _bad(path: Path, problem: str) -> BadInput:
    return BadInput(problem, path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """-> (header JSON bytes, header length, file size). I/O errors become IOFailure."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(path, f"not a safetensors file: only {size} bytes (a header needs at least 8)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _bad(path, f"not a safetensors file: header length field says {n} bytes "
                                 f"but the file has {size} bytes (limit {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except (BadInput, IOFailure):
        raise
    except IsADirectoryError:
        raise _bad(path, "is a directory, expected a .safetensors file") from None
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path) from None
    if len(raw) != n:
        raise _bad(path, "truncated safetensors header")
    return raw, n, size


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _bad(path, "safetensors header is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"safetensors header is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"safetensors header is a JSON {type(obj).__name__}, expected an object")
    return obj


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON gives int, float or bool; bool is an int subclass we must refuse


def _tensor_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _bad(path, f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(path, f"{where}: unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (type(offsets) is list and len(offsets) == 2 and _is_int(offsets[0]) and _is_int(offsets[1])
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8 or end - begin != bits // 8:
        raise _bad(path, f"{where}: data_offsets span {end - begin} bytes but {dtype}{shape} needs "
                         f"{bits / 8:g} bytes")
    if data_start + end > size:
        raise _bad(path, f"{where}: data ends at byte {data_start + end} past the end of the file "
                         f"({size} bytes; truncated download?)")
    return TensorInfo(name, dtype, tuple(shape), end - begin, path, data_start + begin)


def _check_overlaps(path: Path, tensors: list[TensorInfo]) -> None:
    prev: TensorInfo | None = None
    for t in tensors:
        if t.nbytes == 0:
            continue
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise _bad(path, f"tensors {prev.name!r} and {t.name!r} overlap in the data section")
        prev = t


def _metadata(path: Path, meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _bad(path, "__metadata__ is not a JSON object")
    # The format says string -> string; tolerate other JSON values by showing them as JSON text.
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate a .safetensors header; reads only the header bytes."""
    path = Path(path)
    raw, n, size = _read_header_bytes(path)
    obj = _parse_json(path, raw)
    data_start = 8 + n
    metadata = _metadata(path, obj.pop("__metadata__", None))
    tensors = [_tensor_entry(path, name, entry, data_start, size) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    _check_overlaps(path, tensors)
    return SafetensorsHeader(path, tensors, metadata, data_start, size)


class MappedFile:
    """Per-tensor private (copy-on-write) mappings of one file: writable for torch, never written back.

    One mapping per tensor, not per file: a private writable mapping is charged against the kernel's
    commit limit, and a whole 100 GB file would be refused on a 16 GB machine. It also makes "reading one
    tensor maps only that tensor's bytes" literal. Each mapping lives as long as the arrays that view it.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise IOFailure(f"cannot open for reading: {e.strerror or e}", path) from None

    def close(self) -> None:
        self._file.close()  # live mappings keep their own descriptor

    def _mapped(self, t: TensorInfo) -> tuple[mmap.mmap, int]:
        """(mapping covering the tensor, offset of its first byte inside the mapping)."""
        start = t.offset - t.offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._file.fileno(), t.offset + t.nbytes - start, access=mmap.ACCESS_COPY,
                           offset=start)
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            raise IOFailure(f"cannot map tensor {t.name!r} ({t.nbytes} bytes): {why}", self.path) from None
        return mm, t.offset - start

    def numpy(self, t: TensorInfo) -> np.ndarray:
        """Zero-copy numpy view of the raw bits (BF16 as uint16, F8 as uint8, F4/F6 as flat bytes)."""
        dt = DTYPES[t.dtype]
        np_dtype = np.dtype(dt.numpy) if dt.numpy else np.dtype(np.uint8)
        shape = t.shape if dt.numpy else (t.nbytes,)
        if t.nbytes == 0:
            return np.empty(shape, dtype=np_dtype)
        mm, off = self._mapped(t)
        arr = np.frombuffer(mm, dtype=np_dtype, count=t.nbytes // np_dtype.itemsize, offset=off)
        return arr.reshape(shape)

    def torch(self, t: TensorInfo):
        """Zero-copy torch tensor in the native dtype (flat uint8 for sub-byte types)."""
        import torch  # lazy: inspect must not pay torch's import time

        tdtype = torch_dtype(t.dtype)
        if tdtype is None:
            tdtype, shape = torch.uint8, (t.nbytes,)
        else:
            shape = t.shape
        if t.nbytes == 0:
            return torch.empty(shape, dtype=tdtype)
        itemsize = torch.empty((), dtype=tdtype).element_size()
        mm, off = self._mapped(t)
        if t.offset % itemsize:  # unaligned data (legal in safetensors): copy instead of a misaligned view
            return torch.frombuffer(bytearray(mm[off:off + t.nbytes]), dtype=tdtype).reshape(shape)
        return torch.frombuffer(mm, dtype=tdtype, count=t.nbytes // itemsize, offset=off).reshape(shape)
