"""Legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without an imatrix ggml runs the ``quantize_row_*_ref`` functions. gguf-py's quantizers give the same
levels and are reused, but their NumPy argmax/min/max pick a different signed zero than C's strict
sequential scans (an all-zero block starting with -0.0, a zero min of both signs), which flips the sign
bit of the stored d/m: the header is therefore recomputed here with C's scan order.

With an imatrix ggml runs ``quantize_row_*_impl`` (ported here): weights ``qw * sqrt(sigma2 + x²)``
with sigma2 the mean of x² over the *whole row*.
Q8_0 ignores the imatrix.
"""

from __future__ import annotations

from typing import ClassVar

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .helpers import (
    F32,
    BlockKernel,
    first_absmax,
    fp16_bytes,
    impl_weights,
    lanes,
    le_bytes,
    make_qkx_quants,
    make_qx_quants,
    read_fp16,
    row_sigma2,
)

_SHIFTS32 = np.arange(32, dtype=np.uint32)[:, None]


def _c_minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``min = FLT_MAX; max = -FLT_MAX; if (v < min) min = v; if (v > max) max = v;`` per block of 32."""
    xs = lanes(x, 32)
    mn, mx = xs[0].copy(), xs[0].copy()
    for row in xs[1:]:
        mn = np.where(row < mn, row, mn)
        mx = np.where(row > mx, row, mx)
    return mn, mx


def _ref_symmetric(x: np.ndarray, qtype: T, div: int) -> np.ndarray:
    """Q4_0/Q5_0 ref: gguf-py's bytes with d = max/-div from C's first strict abs-max (max starts at +0)."""
    out = gguf.quants.quantize(x, qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    out[:, 0:2] = fp16_bytes(first_absmax(lanes(x, 32))[1] / F32(-div))
    return out


def _ref_asymmetric(x: np.ndarray, qtype: T, nmax: int) -> np.ndarray:
    """Q4_1/Q5_1 ref: gguf-py's bytes with d = (max-min)/nmax and m = min from C's scans."""
    out = gguf.quants.quantize(x, qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    mn, mx = _c_minmax(x)
    out[:, 0:2] = fp16_bytes((mx - mn) / F32(nmax))
    out[:, 2:4] = fp16_bytes(mn)
    return out


def _impl_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """[nrows, n] -> per-element weights of the *_impl paths, in lanes of 32 (sigma2 of the whole row)."""
    return impl_weights(x, qw, 32, row_sigma2(x))


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Levels [32, lanes] -> qs [lanes, 16]: element j in the low nibble, j+16 in the high one."""
    return ((L[:16] & 0xF) | ((L[16:] & 0xF) << 4)).T.astype(np.uint8)


def _qh(L: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 levels -> little-endian u32 [lanes, 4]."""
    bits = ((L >> 4) & 1).astype(np.uint32) << _SHIFTS32
    return le_bytes(np.bitwise_or.reduce(bits, axis=0), "<u4")


def _unnibble(qs: np.ndarray) -> np.ndarray:
    """qs [nb, 16] -> levels [nb, 32] (low nibbles first)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _unqh(qh: np.ndarray) -> np.ndarray:
    """qh [nb, 4] -> bit 4 of each element, [nb, 32] (0 or 16)."""
    h = np.ascontiguousarray(qh).view("<u4")[:, 0].astype(np.uint32)
    return (((h[:, None] >> _SHIFTS32[:, 0]) & 1) << 4).astype(np.int32)


def _packed(L: np.ndarray, five: bool) -> list[np.ndarray]:
    """The level bytes after the header: qh (Q5_0 / Q5_1 only), then qs."""
    return [_qh(L), _nibbles(L)] if five else [_nibbles(L)]


def _unpacked(b: np.ndarray, five: bool) -> np.ndarray:
    """Levels [nb, 32] from the level bytes after the header (inverse of _packed)."""
    return _unnibble(b[:, 4:]) | _unqh(b[:, :4]) if five else _unnibble(b)


class _Legacy(BlockKernel):
    """Q4_0, Q5_0 (symmetric: d, levels l + nmax) and Q4_1, Q5_1 (asym: d and the min m) share everything
    but their constants: nmax = 2^(bits-1) symmetric, 2^bits - 1 asym; Q5's fifth bits go to qh."""

    bits: ClassVar[int]
    asym: ClassVar[bool] = False

    @classmethod
    def _nmax(cls) -> int:
        return (1 << cls.bits) - 1 if cls.asym else 1 << (cls.bits - 1)

    @classmethod
    def quantize_rows(cls, x, qw):
        nmax, five = cls._nmax(), cls.bits == 5
        if qw is None:
            return (_ref_asymmetric if cls.asym else _ref_symmetric)(x, cls.qtype, nmax)
        xs, w = lanes(x, 32), _impl_weights(x, qw)
        if cls.asym:
            d, the_min, L = make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False, True)
            return np.concatenate([fp16_bytes(d), fp16_bytes(-the_min), *_packed(L, five)], axis=1)
        d, L = make_qx_quants(xs, nmax, w)
        return np.concatenate([fp16_bytes(d), *_packed(L, five)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        if cls.asym:
            return _unpacked(b[:, 4:], cls.bits == 5).astype(F32) * d + read_fp16(b[:, 2:4])[:, None]
        return (_unpacked(b[:, 2:], cls.bits == 5) - cls._nmax()).astype(F32) * d


class Q4_0(_Legacy):
    qtype = T.Q4_0
    bits = 4


class Q5_0(_Legacy):
    qtype = T.Q5_0
    bits = 5


class Q4_1(_Legacy):
    qtype = T.Q4_1
    bits = 4
    asym = True


class Q5_1(_Legacy):
    qtype = T.Q5_1
    bits = 5
    asym = True


class Q8_0(BlockKernel):
    qtype = T.Q8_0

    @classmethod
    def quantize_rows(cls, x, qw):
        return gguf.quants.quantize(x, cls.qtype)  # ggml ignores the imatrix for Q8_0

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        return b[:, 2:].view(np.int8).astype(F32) * d
