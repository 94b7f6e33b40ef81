"""A GGUF file as conversion input (qconvert as a drop-in for llama-quantize).

All KV pairs are kept in file order; tensors are read one at a time from the memory map, either as their
raw bytes (copied when the type does not change) or dequantized to float32.
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qconvert.arch.tensors import PlannedTensor
from qconvert.errors import BadInput, IOFailure
from qconvert.formats.gguf.writer import GGUFOutput
from qconvert.load.gguf_file import open_gguf


@dataclass
class GGUFSource:
    path: Path
    arch: str
    header: GGUFOutput                      # the input KVs, in order
    tensors: list[PlannedTensor]
    raw: dict[str, tuple[gguf.GGMLQuantizationType, Any]]  # name -> (type, uint8 view of the stored bytes)


def read_gguf_source(path: Path) -> GGUFSource:
    open_gguf(path).close()  # our validated header parser first: a bad file is one BadInput line
    try:
        reader = gguf.GGUFReader(path, "r")
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path) from e
    except (ValueError, KeyError, IndexError) as e:
        raise BadInput(f"not a valid GGUF file: {e}", path) from e
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise BadInput("GGUF file has no general.architecture", path)
    arch = str(arch_field.contents())
    header = GGUFOutput(arch)
    header.kv().clear()  # keep the input's own KV order, general.architecture included
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # header pseudo-fields (version, counts)
        _copy_field(header, key, field)
    tensors, raw = [], {}
    for t in reader.tensors:
        ne = tuple(int(n) for n in t.shape)
        shape = tuple(reversed(ne))
        raw[t.name] = (gguf.GGMLQuantizationType(t.tensor_type), t.data)
        tensors.append(PlannedTensor(t.name, shape, t.name, _dequantizer(t, shape, reader.data),
                                     t.tensor_type.name))
    return GGUFSource(path, arch, header, tensors, raw)


def _copy_field(header: GGUFOutput, key: str, field: Any) -> None:
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else gguf.GGUFValueType.UINT8
        header.add_key_value(key, list(field.contents()), vtype, sub_type=sub)
    else:
        header.add_key_value(key, field.contents(), vtype)


def _dequantizer(t: Any, shape: tuple[int, ...], file_map: np.memmap):
    qtype = gguf.GGMLQuantizationType(t.tensor_type)

    def read() -> np.ndarray:
        x = gguf.quants.dequantize(np.asarray(t.data), qtype)
        _release(file_map, int(t.data_offset), int(t.n_bytes))
        return np.asarray(x, dtype=np.float32).reshape(shape)
    return read


def _release(file_map: np.memmap, start: int, nbytes: int) -> None:
    """Unmap a tensor's pages once read: the file stays in the page cache, but the process's RSS no longer
    grows to the whole input file (a 2 GB BF16 GGUF otherwise shows as 2 GB resident)."""
    mm = getattr(file_map, "_mmap", None)
    lo = start - start % mmap.PAGESIZE
    if mm is None or not hasattr(mm, "madvise"):
        return
    with contextlib.suppress(ValueError, OSError):
        mm.madvise(mmap.MADV_DONTNEED, lo, start + nbytes - lo)

