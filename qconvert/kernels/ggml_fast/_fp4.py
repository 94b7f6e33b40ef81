"""Fast kernels for MXFP4 (32-weight blocks) and NVFP4 (64 = 4 x 16): twins of
qconvert.kernels.ggml.fp4_blocks, with the E2M1 code search of qconvert.kernels.fp4.nearest_ggml_run.

Same signature as the other ggml_fast kernels; the imatrix is ignored (as by ggml).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..fp4 import nearest_ggml_run
from ..ggml.fp4_blocks import E8M0_HALF, LOG2F_UP, UE4M3_HALF
from ._core import F0, F_HALF, JIT, f32_bits

F448 = np.float32(448.0)
F512 = np.float32(512.0)
F6 = np.float32(6.0)


@njit(inline="always", **JIT)
def _strict_amax(x):
    """``if (amax < fabsf(v)) amax = fabsf(v)`` from 0 over a 1-D x: NaN never enters."""
    amax = F0
    for j in range(x.shape[0]):
        a = np.abs(x[j])
        amax = a if amax < a else amax
    return amax


@njit(inline="always", **JIT)
def mxfp4_exponent(amax):
    """``amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`` on x86-64 (see ggml/fp4_blocks.py)."""
    if not (amax > F0):
        return 0
    bits = np.int64(f32_bits(amax)) & 0xFFFFFFFF
    if bits >= 0x7F800000:  # inf: (int)inf is INT_MIN, low byte 0
        return 0
    if bits >= 0x00800000:
        n = np.int64(bits >> 23) - 127
    else:
        n = np.int64(-150)
        v = bits
        while v:
            v >>= 1
            n += 1
    if bits >= LOG2F_UP[n + 149]:
        n += 1
    return np.int32((n + 125) & 0xFF)


@njit(inline="always", **JIT)
def ue4m3_encode(v):
    """ggml_fp32_to_ue4m3: half-up rounding of the 4th mantissa bit, truncating subnormal path, clamp 448."""
    if not (v > F0):
        return 0
    if v > F448:
        v = F448
    bits = np.int64(f32_bits(v)) & 0xFFFFFFFF
    exp = np.int64((bits >> 23) & 0xFF) - 127 + 7
    man = np.int64((bits >> 20) & 7)
    if exp <= 0:
        m = np.int64(v * F512 + F_HALF)
        m = 7 if m > 7 else m
        return 0 if m < 1 else np.int32(m)
    if exp >= 15:
        return 0x7E
    man += (bits >> 19) & 1
    if man > 7:
        man = 0
        exp += 1
        if exp >= 15:
            return 0x7E
    return np.int32((exp << 3) | man)


@njit(**JIT)
def mxfp4(blocks, qw, nbr, out, use_qw):
    """quantize_row_mxfp4_ref, blocks [nb, 32] (C-contiguous)."""
    flat = blocks.reshape(-1)
    codes = np.empty(32, np.int32)
    for b in range(blocks.shape[0]):
        e = mxfp4_exponent(_strict_amax(blocks[b]))
        out[b, 0] = np.uint8(e)
        nearest_ggml_run(flat, 32 * b, 32, E8M0_HALF[e], codes, 0)
        for j in range(16):
            out[b, 1 + j] = np.uint8(codes[j] | (codes[16 + j] << 4))


@njit(**JIT)
def nvfp4(blocks, qw, nbr, out, use_qw):
    """quantize_row_nvfp4_ref, blocks [nb, 64] (C-contiguous) of four 16-weight sub-blocks."""
    flat = blocks.reshape(-1)
    codes = np.empty(64, np.int32)
    for b in range(blocks.shape[0]):
        for s in range(4):
            ue = ue4m3_encode(_strict_amax(blocks[b, 16 * s : 16 * s + 16]) / F6)
            out[b, s] = np.uint8(ue)
            nearest_ggml_run(flat, 64 * b + 16 * s, 16, UE4M3_HALF[ue], codes, 16 * s)
        for s in range(4):
            for j in range(8):
                out[b, 4 + 8 * s + j] = np.uint8(codes[16 * s + j] | (codes[16 * s + 8 + j] << 4))
