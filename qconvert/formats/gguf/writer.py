"""Streaming GGUF writer with llama-quantize's KV semantics, written atomically.

The header (KV + every tensor info) is written first, since the plan knows every tensor's type and size;
the data then follows one tensor at a time, so memory does not grow with the model. Layout and padding
come from gguf-py's GGUFWriter (32-byte alignment), which was verified byte-identical with llama-quantize
when KV order and tensor order match (reference gguf.md §3.4, §6).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qconvert.formats.output import atomic_file, check_output_path

# gguf-py logs an INFO line per file and a WARNING per re-set key; neither is for our users.
logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)

GGUF_QUANT_VERSION = 2  # GGML_QNT_VERSION of the llama.cpp we match


def row_nbytes(qtype: gguf.GGMLQuantizationType, ne0: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return ne0 // block * size


def tensor_nbytes(qtype: gguf.GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    nrows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    return nrows * row_nbytes(qtype, ne[0])


class GGUFOutput(gguf.GGUFWriter):
    """KV store + tensor table of one output file.

    `add_*` keeps a re-set key at its first position (what convert_hf_to_gguf.py does);
    `set_value` removes and re-appends it (what llama.cpp's gguf_set_val_* does).
    """

    def __init__(self, arch: str):
        super().__init__(None, arch)

    def add_key_value(self, key: str, val: Any, vtype: gguf.GGUFValueType,
                      sub_type: gguf.GGUFValueType | None = None) -> None:
        self.kv_data[0][key] = gguf.GGUFValue(value=val, type=vtype, sub_type=sub_type)

    def set_value(self, key: str, val: Any, vtype: gguf.GGUFValueType,
                  sub_type: gguf.GGUFValueType | None = None) -> None:
        self.kv_data[0].pop(key, None)
        self.add_key_value(key, val, vtype, sub_type)

    def remove_key(self, key: str) -> None:
        self.kv_data[0].pop(key, None)

    def kv(self) -> dict[str, gguf.GGUFValue]:
        return self.kv_data[0]

    def finalize_kv(self, ftype: int, overrides: Iterable[tuple[str, Any, gguf.GGUFValueType]] = ()) -> None:
        """The trailing KV of a llama-quantize output: version, file type, no split keys, then overrides."""
        self.set_value(gguf.Keys.General.QUANTIZATION_VERSION, GGUF_QUANT_VERSION, gguf.GGUFValueType.UINT32)
        self.set_value(gguf.Keys.General.FILE_TYPE, int(ftype), gguf.GGUFValueType.UINT32)
        for key in (gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                    gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT):
            self.remove_key(key)
        for key, val, vtype in overrides:
            self.set_value(key, val, vtype)

    def add_planned_tensor(self, name: str, ne: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
        """Register a tensor (ggml order shape) before any data is written; returns its byte size."""
        nbytes = tensor_nbytes(qtype, ne)
        # a non-uint8 dtype makes GGUFWriter take the shape as element counts (numpy order)
        self.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        return nbytes


def header_nbytes(out: GGUFOutput, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes before the first tensor's data: fixed header, the KVs as they stand, one info per tensor
    (name, ne), padded to the alignment. Packs the KVs as GGUFWriter.write_kv_data_to_file does."""
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    for key, val in out.kv().items():
        n += len(out._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        n += len(out._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
    for name, ne in tensors:
        n += 8 + len(name.encode("utf-8")) + 4 + 8 * len(ne) + 4 + 8
    return gguf.GGUFWriter.ggml_pad(n, out.data_alignment)


def write_gguf(out: GGUFOutput, target: Path, tensors: Iterable[np.ndarray]) -> None:
    """Write header, then each tensor's bytes as they come, to a temp file renamed on success.

    `tensors` yields uint8 (or any dtype) arrays in the order of add_planned_tensor. On any error
    or Ctrl-C the temp file is removed; OS errors become one-line IOFailure (formats/output.py).
    """
    check_output_path(target)
    with atomic_file(target, "GGUF file") as tmp:
        try:
            out.write_header_to_file(tmp)
            out.write_kv_data_to_file()
            out.write_ti_data_to_file()
            for data in tensors:
                out.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            if any(out.tensors[0]):
                raise RuntimeError("fewer tensor data than tensor infos were written")
            _close_synced(out)
        except BaseException:
            _close_quietly(out)  # before the temp file is removed
            raise


def _close_synced(out: GGUFOutput) -> None:
    if out.fout is not None:
        for f in out.fout:
            f.flush()
            os.fsync(f.fileno())
    out.close()


def _close_quietly(out: GGUFOutput) -> None:
    try:
        out.close()
    except OSError:
        pass  # the disk may be full: the file is removed next anyway
