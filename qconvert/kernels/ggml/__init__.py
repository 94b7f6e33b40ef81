"""NumPy reference kernels for GGUF block types: the executable spec, byte-identical to llama.cpp's
``ggml_quantize_chunk`` (x86-64 build, no FMA), with and without an importance matrix.

    quantize(x, qtype, imatrix=None) -> uint8 [nrows, row_bytes]
    dequantize(q, qtype) -> float32 [nrows, n_per_row]
    TYPES[qtype] -> the block class (quantize / dequantize classmethods, block_size, type_size)
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from . import float as _float
from . import iq3, iq4, kquants, legacy
from .helpers import BlockKernel

TYPES: dict[GGMLQuantizationType, type[BlockKernel]] = {
    cls.qtype: cls
    for cls in (
        _float.F32,
        _float.F16,
        _float.BF16,
        legacy.Q4_0,
        legacy.Q4_1,
        legacy.Q5_0,
        legacy.Q5_1,
        legacy.Q8_0,
        kquants.Q2_K,
        kquants.Q3_K,
        kquants.Q4_K,
        kquants.Q5_K,
        kquants.Q6_K,
        iq4.IQ4_NL,
        iq4.IQ4_XS,
        iq3.IQ3_XXS,
        iq3.IQ3_S,
    )
}


def kernel(qtype: GGMLQuantizationType | int) -> type[BlockKernel]:
    try:
        return TYPES[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"no GGUF kernel for type {qtype!r}") from None


def quantize(
    x: np.ndarray, qtype: GGMLQuantizationType | int, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """x: float32 [nrows, n_per_row] (n_per_row a multiple of the block size); imatrix: float32 [n_per_row].
    Returns the exact bytes ggml_quantize_chunk writes, uint8 [nrows, n_per_row // block * type_size]."""
    return kernel(qtype).quantize(x, imatrix)


def dequantize(q: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """uint8 [nrows, row_bytes] -> float32 [nrows, n_per_row], as ggml's to_float."""
    return kernel(qtype).dequantize(q)


__all__ = ["TYPES", "BlockKernel", "dequantize", "kernel", "quantize"]
