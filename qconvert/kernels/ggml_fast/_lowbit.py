"""Fast kernels for TQ1_0, TQ2_0 (256-weight blocks), Q1_0 (128) and Q2_0 (64): twins of
qconvert.kernels.ggml.lowbit (see there for the C rules, including the x86-64 integer conversions of NaN/inf).

Each kernel takes ``blocks`` float32 [nblocks, block], the (ignored) imatrix, blocks per row, ``out`` uint8
[nblocks, type_size] and the use-imatrix flag, like the other ggml_fast kernels. Blocks are independent, so
the kernels walk them one by one with branch-free element loops that LLVM vectorises.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._core import F0, F1, F_HALF, JIT, fp32_to_fp16, put_u16

F_TWO63 = np.float32(2.0**63)
F_TWO31 = np.float32(2.0**31)
QK = 256


@njit(inline="always", **JIT)
def _round_away(v):
    """C roundf for |v| < 2^31 (the caller handles the rest): v - trunc(v) is exact."""
    t = np.float32(np.trunc(v))
    up = np.abs(v - t) >= F_HALF
    return t + (np.float32(np.sign(v)) if up else F0)


@njit(inline="always", **JIT)
def _lround_plus1(v):
    """``int xi = lroundf(v) + 1``: NaN/inf/|v| >= 2^63 give LONG_MIN, whose + 1 keeps the low 32 bits: 1."""
    ok = np.abs(v) < F_TWO63
    r = np.int64(_round_away(v if ok else F0))
    return np.int32((r + 1) & 0xFFFFFFFF) if ok else np.int32(1)


@njit(inline="always", **JIT)
def _ternary_amax(blocks, b):
    """``amax = MAX(amax, fabsf(v))`` from 0 (ggml's macro): a NaN is kept only until the next element."""
    amax = F0
    for j in range(QK):
        a = np.abs(blocks[b, j])
        amax = amax if amax > a else a
    return amax


@njit(inline="always", **JIT)
def _ternary_levels(blocks, b, xi):
    """xi[j] = lroundf(x*id) + 1 for the block, returns d = amax."""
    amax = _ternary_amax(blocks, b)
    idv = F1 / amax if amax != F0 else F0
    for j in range(QK):
        xi[j] = _lround_plus1(blocks[b, j] * idv)
    return amax


@njit(inline="always", **JIT)
def _trits(xi, base, stride, count, extra):
    """uint8 ``q = q*3 + xi`` over xi[base + stride*n] (n < count), optional extra ``q *= 3``, then the
    ceiling division (q*256 + 242) / 243 stored in a uint8."""
    q = 0
    for n in range(count):
        q = (((q * 3) & 0xFF) + xi[base + stride * n]) & 0xFF
    if extra:
        q = (q * 3) & 0xFF
    return np.uint8(((q * 256 + 242) // 243) & 0xFF)


@njit(inline="always", **JIT)
def _pack_tq1(out, b, xi):
    """TQ1_0's qs (five trits a byte: 32 + 16 bytes) and qh (four a byte, 4 bytes)."""
    for m in range(32):
        out[b, m] = _trits(xi, m, 32, 5, False)
    for m in range(16):
        out[b, 32 + m] = _trits(xi, 160 + m, 16, 5, False)
    for j in range(4):
        out[b, 48 + j] = _trits(xi, 240 + j, 4, 4, True)


@njit(inline="always", **JIT)
def _pack_tq2(out, b, xi):
    """TQ2_0's qs: qs[32h + m] holds xi[128h + m + 32s] at bits 2s."""
    for h in range(2):
        for m in range(32):
            o = 128 * h + m
            q = (xi[o] & 3) | ((xi[o + 32] & 3) << 2) | ((xi[o + 64] & 3) << 4) | ((xi[o + 96] & 3) << 6)
            out[b, 32 * h + m] = np.uint8(q)


@njit(inline="always", **JIT)
def _ternary(blocks, out, two_bit):
    """quantize_row_tq1_0_ref / quantize_row_tq2_0_ref: each block's levels xi = lroundf(x/d) + 1, packed
    (TQ1_0, or TQ2_0 when two_bit), then d = amax."""
    xi = np.empty(QK, np.int32)
    for b in range(blocks.shape[0]):
        d = _ternary_levels(blocks, b, xi)
        if two_bit:
            _pack_tq2(out, b, xi)
        else:
            _pack_tq1(out, b, xi)
        put_u16(out, b, 64 if two_bit else 52, fp32_to_fp16(d))


@njit(**JIT)
def tq1_0(blocks, qw, nbr, out, use_qw):
    """quantize_row_tq1_0_ref (the imatrix is ignored)."""
    _ternary(blocks, out, False)


@njit(**JIT)
def tq2_0(blocks, qw, nbr, out, use_qw):
    """quantize_row_tq2_0_ref (the imatrix is ignored)."""
    _ternary(blocks, out, True)


@njit(**JIT)
def q1_0(blocks, qw, nbr, out, use_qw):
    """quantize_row_q1_0_ref: d = (Σ|x|, left to right) / 128, bit j = x_j >= 0."""
    for b in range(blocks.shape[0]):
        s = F0
        for j in range(128):
            s += np.abs(blocks[b, j])
        put_u16(out, b, 0, fp32_to_fp16(s / np.float32(128.0)))
        for k in range(16):
            q = 0
            for i in range(8):
                q |= (1 if blocks[b, 8 * k + i] >= F0 else 0) << i
            out[b, 2 + k] = np.uint8(q)


@njit(**JIT)
def q2_0(blocks, qw, nbr, out, use_qw):
    """quantize_row_q2_0_ref: d = amax, code = clamp((int)roundf(x/d) + 1, 0, 3)."""
    for b in range(blocks.shape[0]):
        amax = F0
        for j in range(64):
            a = np.abs(blocks[b, j])
            amax = a if a > amax else amax
        idv = F1 / amax if amax > F0 else F0
        put_u16(out, b, 0, fp32_to_fp16(amax))
        for k in range(16):
            q = 0
            for i in range(4):
                v = blocks[b, 4 * k + i] * idv
                ok = np.abs(v) < F_TWO31  # else (int) gives INT_MIN, clamped to code 0
                c = np.int32(_round_away(v if ok else F0)) + 1 if ok else 0
                c = 0 if c < 0 else (3 if c > 3 else c)
                q |= c << (2 * i)
            out[b, 2 + k] = np.uint8(q)
