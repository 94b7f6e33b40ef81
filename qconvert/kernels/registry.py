"""The GGUF block types: each registered once, with its NumPy reference and, where one exists, its numba twin.

Every list of GGUF types in the package is derived from BLOCK_TYPES: the types ``--tensor-type`` and
``--output-tensor-type`` accept (formats/gguf/mixture.parse_tensor_type), the float / quantized sets the
mixture rules read, and the fast-path table. Adding a type is one line below (steps: qconvert/kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from . import ggml_fast
from .ggml import float as _float
from .ggml import fp4_blocks, iq1, iq2, iq3, iq4, kquants, legacy, lowbit
from .ggml.helpers import BlockKernel, as_imatrix, as_rows, missing_imatrix
from .ggml_fast import FastKernel, _fp4, _iq1, _iq2, _iq3, _iq4, _kquants, _legacy, _lowbit


@dataclass(frozen=True)
class BlockType:
    """One block type: ``reference`` is the spec (a kernels/ggml class), ``fast`` its byte-identical twin."""

    reference: type[BlockKernel]
    fast: FastKernel | None = None

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.reference.qtype

    @property
    def quantized(self) -> bool:
        return self.reference.quantized

    def quantize(self, rows: np.ndarray, imatrix: np.ndarray | None = None,
                 threads: int | None = None) -> np.ndarray:
        """rows float32 [nrows, n_per_row], imatrix float32 [n_per_row] -> uint8 [nrows, row_bytes]: the
        twin when there is one (on `threads` threads), the reference otherwise."""
        if self.fast is None:
            return self.reference.quantize(rows, imatrix)
        ref = self.reference
        if imatrix is None and ref.requires_imatrix:
            raise missing_imatrix(ref.qtype.name)
        rows = as_rows(rows, ref.block_size, ref.qtype)
        imatrix = as_imatrix(imatrix, rows.shape[1])
        return ggml_fast.run(self.fast, ref.block_size, ref.type_size, rows, imatrix, threads)


def _register(*types: BlockType) -> dict[GGMLQuantizationType, BlockType]:
    table: dict[GGMLQuantizationType, BlockType] = {}
    for b in types:
        if b.qtype in table:
            raise ValueError(f"block type {b.qtype.name} registered twice")
        table[b.qtype] = b
    return table


# One line per block type: its reference class and its fast twin (the order is --tensor-type's error message).
BLOCK_TYPES: dict[GGMLQuantizationType, BlockType] = _register(
    BlockType(_float.F32),
    BlockType(_float.F16),
    BlockType(_float.BF16),
    BlockType(legacy.Q4_0, _legacy.q4_0),
    BlockType(legacy.Q4_1, _legacy.q4_1),
    BlockType(legacy.Q5_0, _legacy.q5_0),
    BlockType(legacy.Q5_1, _legacy.q5_1),
    BlockType(legacy.Q8_0, _legacy.q8_0),
    BlockType(kquants.Q2_K, _kquants.q2k),
    BlockType(kquants.Q3_K, _kquants.q3k),
    BlockType(kquants.Q4_K, _kquants.q4k),
    BlockType(kquants.Q5_K, _kquants.q5k),
    BlockType(kquants.Q6_K, _kquants.q6k),
    BlockType(iq4.IQ4_NL, _iq4.iq4_nl),
    BlockType(iq4.IQ4_XS, _iq4.iq4_xs),
    BlockType(iq3.IQ3_XXS, _iq3.iq3_xxs),
    BlockType(iq3.IQ3_S, _iq3.iq3_s),
    BlockType(iq2.IQ2_XXS, _iq2.iq2_xxs),
    BlockType(iq2.IQ2_XS, _iq2.iq2_xs),
    BlockType(iq2.IQ2_S, _iq2.iq2_s),
    BlockType(iq1.IQ1_S, _iq1.iq1_s),
    BlockType(iq1.IQ1_M, _iq1.iq1_m),
    BlockType(lowbit.TQ1_0, _lowbit.tq1_0),
    BlockType(lowbit.TQ2_0, _lowbit.tq2_0),
    BlockType(lowbit.Q1_0, _lowbit.q1_0),
    BlockType(lowbit.Q2_0, _lowbit.q2_0),
    BlockType(fp4_blocks.MXFP4, _fp4.mxfp4),
    BlockType(fp4_blocks.NVFP4, _fp4.nvfp4),
)

FLOAT_TYPES: tuple[GGMLQuantizationType, ...] = tuple(t for t, b in BLOCK_TYPES.items() if not b.quantized)
QUANTIZED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(t for t, b in BLOCK_TYPES.items() if b.quantized)
FAST_TYPES: tuple[GGMLQuantizationType, ...] = tuple(t for t, b in BLOCK_TYPES.items() if b.fast is not None)


def block_type(qtype: GGMLQuantizationType | int) -> BlockType:
    try:
        return BLOCK_TYPES[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"no GGUF kernel for type {qtype!r}") from None


def quantize(x: np.ndarray, qtype: GGMLQuantizationType | int, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """The bytes ggml_quantize_chunk writes for x float32 [..., n_per_row] (n_per_row a multiple of the block
    size): uint8 [nrows, row_bytes], nrows the product of the leading axes.

    imatrix: None, float32 [n_per_row], or [n_mat, n_per_row] for a stack of n_mat matrices (MoE experts:
    the rows split into n_mat equal parts, each quantized with its own row, as llama-quantize does).
    threads: for the fast twin (None = every core); the bytes never depend on it."""
    b = block_type(qtype)
    x = np.asarray(x)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    if imatrix is None:
        return b.quantize(rows, None, threads)
    imatrix = np.asarray(imatrix, dtype=np.float32)
    n_mat = imatrix.shape[0] if imatrix.ndim > 1 else 1
    if n_mat == 1:
        return b.quantize(rows, imatrix.reshape(-1), threads)
    rows = as_rows(rows, b.reference.block_size, b.qtype)
    if rows.shape[0] % n_mat:
        raise ValueError(f"{rows.shape[0]} rows do not split into {n_mat} matrices (one imatrix row each)")
    per = rows.reshape(n_mat, -1, rows.shape[1])
    return np.concatenate([b.quantize(p, imatrix[i], threads) for i, p in enumerate(per)])


def dequantize(q: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """uint8 [nrows, row_bytes] -> float32 [nrows, n_per_row], as ggml's to_float (the reference's)."""
    return block_type(qtype).reference.dequantize(q)
