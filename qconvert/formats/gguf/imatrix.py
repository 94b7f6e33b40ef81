"""Importance-matrix files as llama.cpp reads and writes them (reference/gguf.md §4.3).

Two formats:
* GGUF (llama-imatrix's default): `general.type = imatrix`, `imatrix.datasets/chunk_count/chunk_size`, and per
  entry `<name>.in_sum2` (raw sums of x², ne [n_per_row, n_mat]) and `<name>.counts` (tokens per matrix,
  ne [1, n_mat]).
* legacy `.dat`: per entry the mean times `ncall`, then an optional (chunk count, dataset) trailer.

`Imatrix.weights(name)` is exactly the float32 array llama-quantize hands to the quantizer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys

from qconvert.errors import BadInput, IOFailure
from qconvert.formats.output import atomic_file

GGUF_MAGIC = b"GGUF"
DEFAULT_CHUNK_SIZE = (
    512  # llama-imatrix's default n_ctx / n_parallel, used to turn .dat data back into raw sums
)
_SUMS, _COUNTS = ".in_sum2", ".counts"
_MAX_NAME = 1 << 16  # no tensor name is longer; a bigger length means the file is not an imatrix
_TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")


@dataclass
class Imatrix:
    """entries: name -> (sums float32 [n_mat, n_per_row], counts float32 [n_mat]).

    For a file read from `.dat` (`legacy=True`) sums are the stored values, (Σx²/count)*ncall, in one row, and
    counts is [ncall]: that is what llama.cpp's loader keeps too."""

    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def weights(self, name: str) -> np.ndarray | None:
        """What llama-quantize passes for `name` (float32 [n_mat * n_per_row]), or None without an entry."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        sums, counts = entry
        sums = np.asarray(sums, dtype=np.float32)
        if self.legacy:
            ncall = int(np.asarray(counts).reshape(-1)[0]) if np.size(counts) else 0
            flat = sums.reshape(-1)
            return flat / np.float32(ncall) if ncall > 0 else flat.copy()
        sums = sums.reshape(len(counts), -1)
        out = np.empty_like(sums)
        for j, c in enumerate(_lround(counts)):
            # an expert no token was routed to gets neutral weights
            out[j] = sums[j] / np.float32(c) if c > 0 else np.float32(1.0)
        return out.reshape(-1)

    def weights_for(self, name: str, ne0: int, n_mat: int = 1) -> np.ndarray | None:
        """weights(name) checked against the tensor like llama-quantize: a size mismatch is an error,
        except for token_embd (whose stale entry is ignored)."""
        w = self.weights(name)
        if w is None or w.size == ne0 * n_mat:
            return w
        if name in _TOKEN_EMBD:
            return None
        raise BadInput(f"imatrix entry {name} has {w.size} values but the tensor needs {ne0 * n_mat}")

    def to_raw(self, chunk_size: int | None = None) -> Imatrix:
        """Raw sums and counts (GGUF semantics); legacy data is scaled like llama-imatrix --in-file does."""
        if not self.legacy:
            return self
        return merge_imatrices([self], chunk_size)


def _lround(x: Any) -> np.ndarray:
    """C lround: half away from zero, as llama.cpp's loader reads counts."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


# ---- reading -----------------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> Imatrix:
    """GGUF imatrix or legacy .dat; like llama-quantize, GGUF is tried first."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise BadInput("no such imatrix file", path) from None
    except IsADirectoryError:
        raise BadInput("imatrix path is a directory", path) from None
    except OSError as e:
        raise IOFailure(f"cannot read imatrix: {e.strerror}", path) from None
    if magic == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_dat(path)


def _field(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = GGUFReader(path)
        kind = _field(reader, Keys.General.TYPE)
        datasets = _field(reader, Keys.IMatrix.DATASETS)
        chunk_count = _field(reader, Keys.IMatrix.CHUNK_COUNT)
        chunk_size = _field(reader, Keys.IMatrix.CHUNK_SIZE)
        tensors = {t.name: t for t in reader.tensors}
    except (
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        struct.error,
        OverflowError,
        UnicodeDecodeError,
    ) as e:
        raise BadInput(f"not a valid GGUF file (truncated or corrupt: {e})", path) from None
    if kind is not None and kind != "imatrix":
        raise BadInput(f"not an imatrix (general.type is {kind!r})", path)
    entries = _gguf_entries(path, tensors)
    if datasets is None or chunk_count is None or chunk_size is None:
        # llama-quantize refuses such files ("missing imatrix metadata")
        raise BadInput(
            "missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)", path
        )
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise BadInput("imatrix.datasets must be an array of strings", path)
    return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size))


def _gguf_entries(path: Path, tensors: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pairs: dict[str, list[Any]] = {}
    for name, t in tensors.items():
        for i, suffix in enumerate((_SUMS, _COUNTS)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[i] = t
    if not any(s is not None for s, _ in pairs.values()):
        raise BadInput("not an imatrix (no <name>.in_sum2 tensors)", path)
    entries = {}
    for name in sorted(pairs):
        sums_t, counts_t = pairs[name]
        if sums_t is None or counts_t is None:
            have, miss = (_SUMS, _COUNTS) if counts_t is None else (_COUNTS, _SUMS)
            raise BadInput(f"{name}{have} has no matching {name}{miss}", path)
        if sums_t.tensor_type != GGMLQuantizationType.F32 or counts_t.tensor_type != GGMLQuantizationType.F32:
            raise BadInput(f"{name}: in_sum2 and counts must be F32", path)
        sums = np.array(sums_t.data, dtype=np.float32).reshape(-1)
        counts = np.array(counts_t.data, dtype=np.float32).reshape(-1)
        if counts.size == 0 or sums.size % counts.size != 0:
            raise BadInput(f"{name}: {sums.size} sums do not split into {counts.size} matrices", path)
        _check_values(path, name, sums, counts)
        entries[name] = (sums.reshape(counts.size, -1), counts)
    return entries


def _check_values(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if not np.isfinite(sums).all() or not np.isfinite(counts).all():
        raise BadInput(f"{name}: non-finite values", path)
    if (counts < 0).any():
        raise BadInput(f"{name}: negative counts", path)


class _Cursor:
    """Little-endian reads from a byte buffer with one error for running off the end."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise BadInput(f"truncated legacy imatrix (reading {what} at byte {self.pos})", self.path)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(path: Path) -> Imatrix:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IOFailure(f"cannot read imatrix: {e.strerror}", path) from None
    cur = _Cursor(data, path)
    if len(data) < 4:
        raise BadInput("not an imatrix (empty or too short)", path)
    n_entries = cur.i32("entry count")
    # the smallest entry is 16 bytes (name length, 1-byte name, ncall, nval, one float)
    if n_entries < 1 or n_entries > cur.left() // 16:
        raise BadInput(f"not an imatrix (neither GGUF nor legacy .dat: {n_entries} entries claimed)", path)
    entries = {}
    for i in range(n_entries):
        name_len = cur.i32(f"entry {i} name length")
        if not 0 < name_len <= _MAX_NAME:
            raise BadInput(f"not an imatrix (entry {i} has a name of {name_len} bytes)", path)
        raw = cur.take(name_len, f"entry {i} name").split(b"\0", 1)[0]  # llama.cpp stops at a NUL
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"not an imatrix (entry {i} name is not UTF-8)", path) from None
        ncall = cur.i32(f"{name} ncall")
        nval = cur.i32(f"{name} value count")
        if nval < 1 or ncall < 0:
            raise BadInput(f"{name}: bad sizes (ncall {ncall}, nval {nval})", path)
        values = np.frombuffer(cur.take(4 * nval, f"{name} values"), dtype="<f4").astype(np.float32)
        counts = np.array([ncall], dtype=np.float32)
        _check_values(path, name, values, counts)
        entries[name] = (values.reshape(1, -1), counts)
    chunk_count, datasets = _read_trailer(cur)
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def _read_trailer(cur: _Cursor) -> tuple[int, list[str]]:
    """The optional (last chunk, dataset name) trailer; like llama.cpp, an incomplete one is ignored."""
    if cur.left() < 4:
        return 0, []
    chunk_count = cur.i32("chunk count")
    if cur.left() < 4:
        return chunk_count, []
    n = cur.i32("dataset length")
    if n <= 0 or n > cur.left():
        return chunk_count, []
    name = cur.take(n, "dataset").split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return chunk_count, [name]


# ---- writing -----------------------------------------------------------------------------------------------


class _Writer(GGUFWriter):
    """GGUFWriter that can also write an empty string array (llama-imatrix does when no dataset is known)."""

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _atomic(path: Path, write) -> None:
    """Run write(tmp) and rename tmp onto path; remove tmp on any failure (formats/output.py)."""
    with atomic_file(path, "imatrix") as tmp:
        write(tmp)


def _sorted_names(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: n.encode())  # std::sort on std::string: bytewise


def _ggml_dims(a: np.ndarray) -> np.ndarray:
    """Drop outer dimensions of size 1: gguf.cpp writes ggml_n_dims, so ne [64, 1] is stored as 1-D."""
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    return a


def write_imatrix_gguf(path: str | Path, imat: Imatrix) -> None:
    """The file llama-imatrix writes (save_imatrix): metadata, then in_sum2/counts per entry, sorted."""
    imat = imat.to_raw(imat.chunk_size or None)

    def write(tmp: Path) -> None:
        w = _Writer(tmp, arch="imatrix")
        w.kv_data[0].pop(Keys.General.ARCHITECTURE, None)  # an imatrix has no architecture
        w.add_type("imatrix")
        w.add_key_value(Keys.IMatrix.DATASETS, list(imat.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, int(imat.chunk_count))
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(imat.chunk_size))
        for name in _sorted_names(imat.entries):
            sums, counts = imat.entries[name]
            counts = np.asarray(counts, dtype=np.float32).reshape(-1)
            if counts.size == 0 or np.size(sums) == 0:
                continue  # llama-imatrix stores only entries with data
            w.add_tensor(
                name + _SUMS, _ggml_dims(np.asarray(sums, dtype=np.float32).reshape(counts.size, -1))
            )
            w.add_tensor(name + _COUNTS, _ggml_dims(counts.reshape(-1, 1)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic(Path(path), write)


def _dat_entry(name: str, sums: np.ndarray, counts: np.ndarray, chunk_size: int) -> bytes | None:
    """One save_imatrix_legacy record from raw sums/counts, or None when no token reached it."""
    counts_i = _lround(counts)
    if counts_i.size == 0 or not counts_i.any():
        return None
    ncall = int((counts_i.max() + chunk_size - 1) // chunk_size)
    values = np.asarray(sums, dtype=np.float32).reshape(counts_i.size, -1)
    count = counts_i.astype(np.float32)[:, None]
    zero = count == 0
    # a matrix without data stores 1 (value 1 / count 1)
    tmp = (np.where(zero, np.float32(1), values) / np.where(zero, np.float32(1), count)) * np.float32(ncall)
    return _dat_record(name, ncall, tmp.astype(np.float32))


def _dat_record(name: str, ncall: int, values: np.ndarray) -> bytes:
    raw = name.encode("utf-8")
    flat = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, flat.size) + flat.tobytes()


def write_imatrix_dat(path: str | Path, imat: Imatrix) -> None:
    """The legacy file llama-imatrix --output-format dat writes (save_imatrix_legacy)."""
    records = []
    for name in _sorted_names(imat.entries):
        sums, counts = imat.entries[name]
        if imat.legacy:
            ncall = int(_lround(counts)[0]) if np.size(counts) else 0
            records.append(_dat_record(name, ncall, np.asarray(sums, dtype=np.float32)))
            continue
        if imat.chunk_size <= 0:
            raise BadInput("cannot write a .dat imatrix without a chunk size", path)
        rec = _dat_entry(name, sums, counts, imat.chunk_size)
        if rec is not None:
            records.append(rec)
    if not records:
        raise BadInput("no imatrix entry has data; a .dat file needs at least one", path)
    dataset = (imat.datasets[-1] if imat.datasets else "").encode("utf-8")
    blob = b"".join(
        [
            struct.pack("<i", len(records)),
            *records,
            struct.pack("<ii", int(imat.chunk_count), len(dataset)),
            dataset,
        ]
    )
    _atomic(Path(path), lambda tmp: tmp.write_bytes(blob))


# ---- merging -----------------------------------------------------------------------------------------------


def merge_imatrices(mats: Sequence[Imatrix], chunk_size: int | None = None) -> Imatrix:
    """Sum several imatrices as `llama-imatrix --in-file a,b,...` does (IMatrixCollector::load_imatrix).

    GGUF sums and counts add up; a legacy file contributes values*chunk_size and ncall*chunk_size. chunk_size
    defaults to the first GGUF input's, else 512."""
    if chunk_size is None:
        chunk_size = next(
            (m.chunk_size for m in mats if not m.legacy and m.chunk_size > 0), DEFAULT_CHUNK_SIZE
        )
    if chunk_size <= 0:
        raise BadInput(f"chunk size must be positive, not {chunk_size}")
    values: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    datasets: list[str] = []
    for m in mats:
        for name, (s, c) in m.entries.items():
            _merge_entry(
                values,
                counts,
                name,
                np.asarray(s, dtype=np.float32).reshape(-1),
                _lround(c),
                m.legacy,
                chunk_size,
            )
        datasets.extend(m.datasets)
    max_count = max((int(c.max()) for c in counts.values() if c.size), default=0)
    entries = {n: (values[n].reshape(counts[n].size, -1), counts[n].astype(np.float32)) for n in values}
    return Imatrix(entries, datasets, max_count // chunk_size, chunk_size)


def _merge_entry(
    values: dict, counts: dict, name: str, s: np.ndarray, c: np.ndarray, legacy: bool, chunk_size: int
) -> None:
    if name in values and values[name].size != s.size:
        raise BadInput(f"cannot merge imatrix entry {name}: {s.size} values vs {values[name].size}")
    if legacy:
        if name not in values:
            values[name], counts[name] = np.zeros_like(s), np.zeros(1, dtype=np.int64)
        ncall = int(c[0]) if c.size else 0
        values[name] = values[name] + s * np.float32(chunk_size)
        counts[name] = counts[name] + ncall * chunk_size
        return
    if name not in values:
        values[name], counts[name] = np.zeros_like(s), np.zeros(c.size, dtype=np.int64)
    elif counts[name].size == 1 and c.size > 1:
        counts[name] = np.full(c.size, counts[name][0], dtype=np.int64)
    elif counts[name].size != c.size:
        raise BadInput(f"cannot merge imatrix entry {name}: {c.size} counts vs {counts[name].size}")
    values[name] = values[name] + s
    counts[name] = counts[name] + c
