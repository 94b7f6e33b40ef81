"""Scalar building blocks shared by the fast GGML kernels.

Everything here is a literal port of the helpers in ggml (ggml-quants.c / ggml-impl.h) in float32,
so that the lane kernels built on top of them produce the same bits as the C reference on x86-64.
Rules that keep the bits identical (see shared/reference/gguf.md §2.4 and §8):
  * every constant is a np.float32 (numba would otherwise promote to float64);
  * integer levels are converted to float32 before they are multiplied;
  * no fastmath, so LLVM never contracts a*b+c into an FMA.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Options for every kernel: IEEE division by zero on degenerate lanes (no exception), cached JIT,
# released GIL so threads can run row chunks concurrently.  Never add fastmath.
JIT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)

NL = 64  # lanes (blocks processed side by side); measured sweet spot in §8

F0 = np.float32(0.0)
F1 = np.float32(1.0)
F2 = np.float32(2.0)
F_HALF = np.float32(0.5)
F_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23, nearest_int's rounding constant
F_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
F_TENTH = np.float32(0.1)
F_TO_INF = np.float32(2.0**112)
F_TO_ZERO = np.float32(2.0**-110)
F_EXP_SCALE = np.float32(2.0**-112)
# the small integers the kernels divide by or clamp to, defined once
F4 = np.float32(4.0)
F5 = np.float32(5.0)
F7 = np.float32(7.0)
F15 = np.float32(15.0)
F31 = np.float32(31.0)
F32 = np.float32(32.0)
F63 = np.float32(63.0)
F127 = np.float32(127.0)
F128 = np.float32(128.0)
F256 = np.float32(256.0)


@intrinsic
def f32_bits(typingctx, x):
    """Bit pattern of a float32 as int32 (memcpy in C)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """float32 whose bit pattern is the int32/uint32 argument."""
    if x not in (types.int32, types.uint32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(x), codegen


@njit(inline="always", **JIT)
def nearest_int(f):
    """ggml nearest_int: round half to even through the 1.5*2^23 trick; exact port, float32 in, float32 out.

    Returning the integer as float32 keeps lane code in one type (the value is < 2^23, so exact)."""
    i = f32_bits(f + F_MAGIC)
    return np.float32(np.int32((i & np.int32(0x007FFFFF)) - np.int32(0x00400000)))


@njit(inline="always", **JIT)
def clampf(v, lo, hi):
    """MAX(lo, MIN(hi, v)) with C's macro semantics."""
    v = hi if hi < v else v
    return lo if lo > v else v


@njit(inline="always", **JIT)
def odd_level(v, top):
    """``MAX(0, MIN(top, nearest_int(0.5f*(v - 1))))``: the level l whose odd value 2l+1 is nearest to v
    (the lattice kernels' rounding of id*x, and of their 4-bit / 3-bit sub-block scales)."""
    return clampf(nearest_int(F_HALF * (v - F1)), F0, top)


@njit(inline="always", **JIT)
def wrap_u8(v):
    """float32 integer -> the value a uint8_t store keeps (C wraps modulo 256)."""
    return np.float32(np.int32(v) & np.int32(255))


@njit(inline="always", **JIT)
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16 without F16C (ggml-impl.h): round to nearest even, NaN -> 0x7E00. Returns int32."""
    base = (np.abs(f) * F_TO_INF) * F_TO_ZERO
    w = np.int64(f32_bits(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32(np.uint32(((bias >> 1) + 0x07800000) & 0xFFFFFFFF)) + base
    bits = np.int64(f32_bits(base)) & 0xFFFFFFFF
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    res = (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)
    return np.int32(res)


@njit(inline="always", **JIT)
def fp16_to_fp32(h):
    """GGML_FP16_TO_FP32 (ggml-impl.h), exact. h: int32 holding 16 bits."""
    w = (np.int64(h) & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = bits_f32(np.uint32(((two_w >> 4) + (0xE0 << 23)) & 0xFFFFFFFF)) * F_EXP_SCALE
    denormalized = bits_f32(np.uint32((two_w >> 17) | (126 << 23))) - F_HALF
    if two_w < (1 << 27):
        mag = np.int64(f32_bits(denormalized)) & 0xFFFFFFFF
    else:
        mag = np.int64(f32_bits(normalized)) & 0xFFFFFFFF
    return bits_f32(np.uint32(sign | mag))


@njit(inline="always", **JIT)
def fp16_round(f):
    """The float32 value a float32 takes after a round trip through ggml's fp16."""
    return fp16_to_fp32(fp32_to_fp16(f))


@njit(inline="always", **JIT)
def put_u16(out, b, off, h):
    """Little-endian u16 store."""
    out[b, off] = np.uint8(h & 0xFF)
    out[b, off + 1] = np.uint8((h >> 8) & 0xFF)


@njit(inline="always", **JIT)
def roundf(v):
    """C roundf: halves away from zero (v - trunc(v) is exact, so this is exact)."""
    t = np.float32(np.trunc(v))
    if np.abs(v - t) >= F_HALF:
        t = t + (F1 if v > F0 else -F1)
    return t


@njit(inline="always", **JIT)
def live_lanes(out, b0):
    """How many of the NL lanes from block b0 on hold a block (the last batch may be short)."""
    return min(NL, out.shape[0] - b0)


@njit(inline="always", **JIT)
def lane_sumsq(S, xr, n, row):
    """S[row] = Σ x*x over the rows S[xr:xr+n] of every lane, left to right from 0."""
    for k in range(NL):
        S[row, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            S[row, k] = S[row, k] + x * x


@njit(inline="always", **JIT)
def lane_absmax(S, xr, n, amax_row, max_row):
    """``if (fabsf(x) > amax) {amax = fabsf(x); max = x;}`` from amax = max = 0 over the rows S[xr:xr+n]
    of every lane: S[amax_row] = the largest |x|, S[max_row] = the first x that has it."""
    for k in range(NL):
        S[amax_row, k] = F0
        S[max_row, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            ax = np.abs(x)
            if ax > S[amax_row, k]:
                S[amax_row, k] = ax
                S[max_row, k] = x


@njit(**JIT)
def load_lanes(blocks, b0, S, row0):
    """Transpose blocks[b0:b0+NL] into S[row0 + e, lane]; missing lanes (past the end) are zero."""
    nb, bs = blocks.shape
    for k in range(NL):
        b = b0 + k
        if b < nb:
            for e in range(bs):
                S[row0 + e, k] = blocks[b, e]
        else:
            for e in range(bs):
                S[row0 + e, k] = F0
