"""GGUF files in: our own validating header reader (versions 2 and 3, little-endian).

Only the header is read (KV pairs and tensor infos), through a read-only memory map, so a 100 GB file
inspects in milliseconds. Every count and length is checked against the bytes that remain before anything
is allocated, so a corrupt or hostile header becomes one `BadInput` line instead of a MemoryError.
The type tables are our own (importing gguf-py costs ~0.4 s); tests/load checks them against gguf-py.

Shapes: `GGUFTensor.ne` is ggml order (ne[0] = contiguous row length); `GGUFTensor.shape` is the
reversed, numpy/HF order [rows, cols], which is what `qconvert inspect` reports.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import BadInput, IOFailure

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FMT = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
_NUMPY = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}
# smallest encoding of one value of each type (strings: the u64 length; arrays: type + count)
_MIN_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FMT.items()}
_MIN_SIZE.update({ValueType.STRING: 8, ValueType.ARRAY: 12})

# ggml type id -> (name, elements per block, bytes per block); mirrors gguf.GGML_QUANT_SIZES
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}
# general.file_type (llama_ftype) -> name; mirrors gguf.LlamaFileType without the MOSTLY_ prefix
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0", 1024: "GUESSED",
}


@dataclass(frozen=True)
class GGUFField:
    type: ValueType
    value: Any  # python scalar / str; arrays: list (strings, nested) or 1-D numpy array (numbers)
    item_type: ValueType | None = None  # element type of an ARRAY


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_id: int
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous row length
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order [rows, cols] = reversed ne."""
        return tuple(reversed(self.ne))

    @property
    def numel(self) -> int:
        return math.prod(self.ne)


_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf: mmap.mmap | bytes, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int) -> int:
        if n > self.remaining():
            raise _Truncated(f"needs {n} bytes at offset {self.pos} but only {self.remaining()} remain")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str) -> Any:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings; the hot loop of a header (vocabularies of 100k+ tokens and merges)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = [""] * count
        for i in range(count):
            if pos + 8 > size:
                raise _Truncated(f"string length at offset {pos} runs past the end of the file")
            end = pos + 8 + unpack(buf, pos)[0]
            if end > size:
                raise _Truncated(f"string at offset {pos} runs past the end of the file")
            out[i] = buf[pos + 8:end].decode("utf-8", errors="replace")
            pos = end
        self.pos = pos
        return out


def _bad(path: Path, problem: str) -> BadInput:
    return BadInput(problem, path)


def _read_array(cur: _Cursor, path: Path, key: str, depth: int) -> GGUFField:
    item = _value_type(cur.scalar("<I"), path, key)
    count = cur.scalar("<Q")
    if count * _MIN_SIZE[item] > cur.remaining():  # before allocating anything
        raise _bad(path, f"key {key!r}: array claims {count} {item.name} elements but only "
                         f"{cur.remaining()} bytes remain in the file")
    if item in _NUMPY:
        n = count * _MIN_SIZE[item]
        start = cur.take(n)
        arr = np.frombuffer(cur.buf, dtype=_NUMPY[item], count=count, offset=start).copy()
        return GGUFField(ValueType.ARRAY, arr.astype(bool) if item == ValueType.BOOL else arr, item)
    if item == ValueType.STRING:
        return GGUFField(ValueType.ARRAY, cur.strings(count), item)
    if depth > 8:
        raise _bad(path, f"key {key!r}: arrays nested more than 8 deep")
    return GGUFField(ValueType.ARRAY, [_read_array(cur, path, key, depth + 1) for _ in range(count)], item)


def _value_type(raw: int, path: Path, key: str) -> ValueType:
    try:
        return ValueType(raw)
    except ValueError:
        raise _bad(path, f"key {key!r} has unknown GGUF value type {raw}") from None


def _read_value(cur: _Cursor, path: Path, key: str) -> GGUFField:
    vtype = _value_type(cur.scalar("<I"), path, key)
    if vtype == ValueType.STRING:
        return GGUFField(vtype, cur.string())
    if vtype == ValueType.ARRAY:
        return _read_array(cur, path, key, 0)
    return GGUFField(vtype, cur.scalar(_SCALAR_FMT[vtype]))


def _read_tensor_info(cur: _Cursor, path: Path) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string()
    n_dims = cur.scalar("<I")
    if n_dims > MAX_DIMS:
        raise _bad(path, f"tensor {name!r} has {n_dims} dimensions (ggml supports at most {MAX_DIMS})")
    ne = tuple(cur.scalar("<Q") for _ in range(n_dims))
    type_id = cur.scalar("<I")
    offset = cur.scalar("<Q")
    if type_id not in GGML_TYPES:
        raise _bad(path, f"tensor {name!r} has unknown ggml type {type_id}")
    return name, type_id, ne, offset


def _tensor_nbytes(path: Path, name: str, type_id: int, ne: tuple[int, ...]) -> int:
    tname, block, size = GGML_TYPES[type_id]
    row = ne[0] if ne else 1
    if row % block:
        raise _bad(path, f"tensor {name!r}: row length {row} is not a multiple of the {tname} block "
                         f"({block})")
    return row // block * size * math.prod(ne[1:])


def _check_version(path: Path, head: bytes) -> int:
    if head[:4] != GGUF_MAGIC:
        raise _bad(path, f"not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version = struct.unpack_from("<I", head, 4)[0]
    if version & 0xFFFF == 0 and struct.unpack_from(">I", head, 4)[0] in SUPPORTED_VERSIONS:
        raise _bad(path, "big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _bad(path, f"unsupported GGUF version {version} (supported: 2 and 3)")
    return version


class GGUFFile:
    """A validated GGUF header; tensor data stays on disk until `read_raw`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 24:
                    head = f.read()
                    if head[:4] != GGUF_MAGIC:
                        raise _bad(self.path, f"not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
                    raise _bad(self.path, f"truncated GGUF header ({self.file_size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (BadInput, IOFailure):
            raise
        except IsADirectoryError:
            raise _bad(self.path, "is a directory, expected a .gguf file") from None
        except FileNotFoundError:
            raise _bad(self.path, "no such file") from None
        except OSError as e:
            raise IOFailure(f"cannot read: {e.strerror or e}", self.path) from None
        try:
            self._parse()
        except _Truncated as e:
            self.close()
            raise _bad(self.path, f"truncated GGUF header: {e}") from None
        except BadInput:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.file_size)
        self.version = _check_version(self.path, bytes(self._mm[:8]))
        cur.take(8)
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        need = n_tensors * 24 + n_kv * 13  # smallest possible tensor info / KV pair
        if need > cur.remaining():
            raise _bad(self.path, f"header claims {n_tensors} tensors and {n_kv} metadata keys, which cannot "
                                  f"fit in a {self.file_size}-byte file")
        self.fields: dict[str, GGUFField] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.fields:
                raise _bad(self.path, f"duplicate metadata key {key!r}")
            self.fields[key] = _read_value(cur, self.path, key)
        infos = [_read_tensor_info(cur, self.path) for _ in range(n_tensors)]
        self.alignment = self._alignment()
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, type_id, ne, offset in infos:
            self._add_tensor(name, type_id, ne, offset)

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        ok = field.type == ValueType.UINT32 and field.value > 0 and field.value & (field.value - 1) == 0
        if not ok:
            raise _bad(self.path, f"general.alignment must be a power-of-two UINT32, got {field.value!r}")
        return field.value

    def _add_tensor(self, name: str, type_id: int, ne: tuple[int, ...], offset: int) -> None:
        if name in self.tensors:
            raise _bad(self.path, f"duplicate tensor name {name!r}")
        if offset % self.alignment:
            raise _bad(self.path, f"tensor {name!r}: data offset {offset} is not a multiple of the "
                                  f"alignment {self.alignment}")
        nbytes = _tensor_nbytes(self.path, name, type_id, ne)
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            raise _bad(self.path, f"tensor {name!r}: data ends at byte {start + nbytes} past the end of the "
                                  f"file ({self.file_size} bytes; truncated download?)")
        self.tensors[name] = GGUFTensor(name, type_id, ne, start, nbytes)

    def value(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.value

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (rows = prod(ne[1:])), a view of the map."""
        t = self.tensors[name]
        rows = math.prod(t.ne[1:])
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return arr.reshape(rows, t.nbytes // rows if rows else 0)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from the process once read (they stay in the page cache): streaming a whole
        file then costs one tensor of RSS, not the file's size."""
        t = self.tensors[name]
        lo = t.offset - t.offset % mmap.PAGESIZE
        if self._mm is not None and hasattr(self._mm, "madvise"):
            with contextlib.suppress(ValueError, OSError):
                self._mm.madvise(mmap.MADV_DONTNEED, lo, t.offset + t.nbytes - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # arrays still view the map; the GC unmaps it
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | Path) -> GGUFFile:
    """Validate and read the header of a GGUF file (v2/v3). Raises BadInput / IOFailure naming the file."""
    return GGUFFile(path)


def is_gguf(path: str | Path) -> bool:
    """True if the file starts with the GGUF magic (False for anything unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
