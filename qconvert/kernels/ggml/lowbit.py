"""Ternary and 1/2-bit types without a search: TQ1_0, TQ2_0 (256-weight blocks), Q1_0 (128), Q2_0 (64).

Ports of ``quantize_row_{tq1_0,tq2_0,q1_0,q2_0}_ref`` (ggml-quants.c; shared/reference/gguf-lowbit.md §4).
ggml ignores the imatrix for all four (``quantize_q1_0`` / ``quantize_q2_0`` call the same ref function row
by row when one is given), so ``qw`` is unused here.

Integer conversions follow the x86-64 build, because NaN/inf input and subnormal scales reach them:
* TQ*: ``lroundf`` (glibc) rounds half away from zero and returns LONG_MIN for NaN, ±inf and |v| >= 2^63;
  ``int xi = lroundf(v) + 1`` keeps the low 32 bits, so those give xi = 1 (the zero trit).
* Q2_0: ``(int)roundf(v)`` is cvttss2si: INT_MIN for NaN and |v| >= 2^31, then clamped to code 0.
* uint8_t accumulators wrap modulo 256.
Such values appear when ``1/amax`` overflows (amax subnormal: id = inf) or amax is inf or NaN.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .helpers import F32, QK_K, BlockKernel, fp16_bytes, lanes, macro_max, read_fp16, running_max, seqsum

_TWO63 = F32(2.0**63)
_TWO31 = F32(2.0**31)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf on float32 (v - trunc(v) is exact, so the half test is exact); NaN/inf pass through."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t).astype(F32)


def lroundf_plus1(v: np.ndarray) -> np.ndarray:
    """``int xi = lroundf(v) + 1`` as int64: LONG_MIN for NaN/inf/out of range, then the low 32 bits."""
    ok = np.abs(v) < _TWO63  # False for NaN
    r = np.where(ok, _round_half_away(np.where(ok, v, F32(0))), F32(0)).astype(np.int64)
    r = np.where(ok, r, np.int64(np.iinfo(np.int64).min)) + 1
    return ((r + 2**31) & 0xFFFFFFFF) - 2**31  # conversion of a long to int keeps the low 32 bits


def _ternary_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x in lanes of 256, d = amax, id) as quantize_row_tq{1,2}_0_ref: ``amax = MAX(amax, fabsf(v))``."""
    xs = lanes(x, QK_K)
    amax = macro_max(np.abs(xs))
    inv = np.where(amax != 0, F32(1) / amax, F32(0))  # `d ? 1/d : 0`: NaN is true
    return xs, amax, inv


def _pack_trits(xi: np.ndarray, extra_shift: bool) -> np.ndarray:
    """uint8 ``q = q*3 + xi`` over xi [k, lanes] (most significant first), optionally ``q *= 3`` once more,
    then the ceiling division ``(q*256 + 242) / 243`` stored in a uint8."""
    q = np.zeros(xi.shape[1:], dtype=np.int64)
    for t in xi:
        q = (((q * 3) & 0xFF) + t) & 0xFF
    if extra_shift:
        q = (q * 3) & 0xFF
    return ((q * 256 + 242) // 243) & 0xFF


def _ternary_dequant(qbytes: np.ndarray, n: int) -> np.ndarray:
    """Trit n of every byte: ``((uint8)(b*3^n) * 3) >> 8`` minus 1, as int32."""
    return ((((qbytes.astype(np.int32) * _POW3[n]) & 0xFF) * 3) >> 8) - 1


class TQ1_0(BlockKernel):
    qtype = T.TQ1_0

    @classmethod
    def quantize_rows(cls, x, qw):
        xs, amax, inv = _ternary_scale(x)
        xi = lroundf_plus1(xs * inv)  # [256, nb]
        head = xi[:160].reshape(5, 32, -1)  # byte m: weights m + 32n
        mid = xi[160:240].reshape(5, 16, -1)  # byte 32 + m: weights 160 + m + 16n
        tail = xi[240:].reshape(4, 4, -1)  # qh[j]: weights 240 + j + 4m
        qs = np.concatenate([_pack_trits(head, False), _pack_trits(mid, False)])  # [48, nb]
        qh = _pack_trits(tail, True)  # [4, nb]
        return np.concatenate([qs.T.astype(np.uint8), qh.T.astype(np.uint8), fp16_bytes(amax)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 52:54])[:, None]
        parts = [_ternary_dequant(b[:, 0:32], n) for n in range(5)]
        parts += [_ternary_dequant(b[:, 32:48], n) for n in range(5)]
        parts += [_ternary_dequant(b[:, 48:52], n) for n in range(4)]
        return np.concatenate(parts, axis=1).astype(F32) * d


class TQ2_0(BlockKernel):
    qtype = T.TQ2_0

    @classmethod
    def quantize_rows(cls, x, qw):
        xs, amax, inv = _ternary_scale(x)
        xi = (lroundf_plus1(xs * inv) & 3).reshape(2, 4, 32, -1)  # [h, n, m, lanes]: weight 128h + 32n + m
        q = xi[:, 0] | (xi[:, 1] << 2) | (xi[:, 2] << 4) | (xi[:, 3] << 6)  # [2, 32, nb]
        return np.concatenate([q.reshape(64, -1).T.astype(np.uint8), fp16_bytes(amax)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 64:66])[:, None]
        qs = b[:, :64].reshape(-1, 2, 1, 32).astype(np.int32)
        shifts = (2 * np.arange(4)).reshape(1, 1, 4, 1)
        q = ((qs >> shifts) & 3) - 1  # [nb, h, n, m]
        return q.reshape(b.shape[0], -1).astype(F32) * d


class Q1_0(BlockKernel):
    qtype = T.Q1_0

    @classmethod
    def quantize_rows(cls, x, qw):
        xs = lanes(x, 128)
        d = seqsum(np.abs(xs)) / F32(128)
        bits = (xs >= 0).astype(np.uint8).T.reshape(-1, 16, 8)  # NaN -> 0, ±0 -> 1
        qs = np.packbits(bits, axis=2, bitorder="little")[:, :, 0]
        return np.concatenate([fp16_bytes(d), qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        bits = np.unpackbits(b[:, 2:18], axis=1, bitorder="little")
        return np.where(bits == 1, d, -d)


class Q2_0(BlockKernel):
    qtype = T.Q2_0

    @classmethod
    def quantize_rows(cls, x, qw):
        xs = lanes(x, 64)
        d = running_max(np.abs(xs))  # `if (a > amax) amax = a`: NaN never enters
        inv = np.where(d > 0, F32(1) / d, F32(0))
        v = _round_half_away(xs * inv)
        ok = np.abs(v) < _TWO31
        q = np.where(ok, np.where(ok, v, F32(0)).astype(np.int64), np.iinfo(np.int32).min) + 1
        q = np.clip(q, 0, 3).T.reshape(-1, 16, 4)  # [nb, byte, weight in byte]
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        return np.concatenate([fp16_bytes(d), qs.astype(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        q = (b[:, 2:18, None].astype(np.int32) >> (2 * np.arange(4))) & 3
        return (q.reshape(b.shape[0], -1) - 1).astype(F32) * d
