"""Fast kernels for MXFP4 (32-weight blocks) and NVFP4 (64 = 4 x 16): twins of
qconvert.kernels.ggml.fp4_blocks, with the E2M1 code search of qconvert.kernels.fp4.nearest_ggml_scaled.

Same signature as the other ggml_fast kernels; the imatrix is ignored (as by ggml).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..fp4 import nearest_ggml_scaled
from ..ggml.fp4_blocks import E8M0_HALF, LOG2F_UP, UE4M3_HALF
from ._core import F0, F_HALF, JIT, f32_bits

F448 = np.float32(448.0)
F512 = np.float32(512.0)
F6 = np.float32(6.0)
CHUNK = 64  # blocks per code search


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
    """quantize_row_mxfp4_ref, blocks [nb, 32] (C-contiguous). The code search runs over CHUNK blocks at
    once, with each element's half-scale spelled out, so that its loop is long enough to vectorise well."""
    nb = blocks.shape[0]
    flat = blocks.reshape(-1)
    codes = np.empty(CHUNK * 32, np.int32)
    dv = np.empty(CHUNK * 32, np.float32)
    for b0 in range(0, nb, CHUNK):
        n = min(CHUNK, nb - b0)
        for k in range(n):
            e = mxfp4_exponent(_strict_amax(blocks[b0 + k]))
            out[b0 + k, 0] = np.uint8(e)
            d = E8M0_HALF[e]
            for j in range(32):
                dv[32 * k + j] = d
        nearest_ggml_scaled(flat[32 * b0 : 32 * (b0 + n)], dv, codes)
        for k in range(n):
            for j in range(16):
                out[b0 + k, 1 + j] = np.uint8(codes[32 * k + j] | (codes[32 * k + 16 + j] << 4))


@njit(**JIT)
def nvfp4(blocks, qw, nbr, out, use_qw):
    """quantize_row_nvfp4_ref, blocks [nb, 64] (C-contiguous) of four 16-weight sub-blocks."""
    nb = blocks.shape[0]
    flat = blocks.reshape(-1)
    codes = np.empty(CHUNK * 64, np.int32)
    dv = np.empty(CHUNK * 64, np.float32)
    for b0 in range(0, nb, CHUNK):
        n = min(CHUNK, nb - b0)
        for k in range(n):
            for s in range(4):
                ue = ue4m3_encode(_strict_amax(blocks[b0 + k, 16 * s : 16 * s + 16]) / F6)
                out[b0 + k, s] = np.uint8(ue)
                d = UE4M3_HALF[ue]
                for j in range(16):
                    dv[64 * k + 16 * s + j] = d
        nearest_ggml_scaled(flat[64 * b0 : 64 * (b0 + n)], dv, codes)
        for k in range(n):
            for s in range(4):
                c = 64 * k + 16 * s
                for j in range(8):
                    out[b0 + k, 4 + 8 * s + j] = np.uint8(codes[c + j] | (codes[c + 8 + j] << 4))
