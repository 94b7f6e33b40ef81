"""Non-linear 4-bit types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks, 6-bit sub-scales).

Port of ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` / ``quantize_iq4_xs`` call it (ntry = 7; this is
what llama-quantize runs, not ``quantize_row_iq4_nl_ref``'s ntry = -1). Without an imatrix the weights are
x², with one ``qw * sqrt(sigma2 + x²)`` where sigma2 = 2·Σx²/super_block_size.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .helpers import (
    F32,
    GROUP_MAX_EPS,
    KVALUES_IQ4NL,
    QK_K,
    BlockKernel,
    best_index_iq4nl,
    first_absmax,
    fp16_bytes,
    impl_weights,
    lanes,
    le_bytes,
    nearest_int,
    read_fp16,
    seqsum,
    unlanes,
)

NTRY = 7


def _weights(x: np.ndarray, qw: np.ndarray | None, super_block: int) -> tuple[np.ndarray, np.ndarray]:
    """(x in lanes of 32, weights in lanes of 32)."""
    xs = lanes(x, 32)
    if qw is None:
        return xs, xs * xs
    sigma2 = seqsum(lanes(x * x, super_block)) * F32(2.0 / super_block)  # a power of two: exact
    return xs, impl_weights(x, qw, 32, sigma2)


def _search_scale(xs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-32 scale search of quantize_row_iq4_nl_impl (levels are not kept: callers recompute them)."""
    amax, smax = first_absmax(xs)

    def sums(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = KVALUES_IQ4NL[best_index_iq4nl(inv * xs)]
        wq = w * q
        return seqsum(wq * xs), seqsum(wq * q)

    d = (-smax) / KVALUES_IQ4NL[0]
    sumqx, sumq2 = sums(F32(1) / d)
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(F32(itry - 127) / smax)
        accept = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_d = sumqx / sumq2
        d = np.where(accept, new_d, d)
        best = np.where(accept, new_d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d)


def _nibbles(L: np.ndarray, nb: int) -> np.ndarray:
    """Levels [32, lanes] -> [nb, bytes]: sub-block element j low nibble, j+16 high nibble."""
    return unlanes((L[:16] | (L[16:] << 4)), nb).astype(np.uint8)


def _decode(qs: np.ndarray) -> np.ndarray:
    """[n, 16*k] packed bytes -> grid values [n, 32*k]."""
    q = qs.reshape(qs.shape[0], -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return KVALUES_IQ4NL[(q & 0xF).reshape(qs.shape[0], -1)]


class IQ4_NL(BlockKernel):
    qtype = T.IQ4_NL

    @classmethod
    def quantize_rows(cls, x, qw):
        xs, w = _weights(x, qw, 32)
        d = _search_scale(xs, w)
        inv = np.where(d != 0, F32(1) / d, F32(0))  # the float d, not its fp16
        L = best_index_iq4nl(inv * xs)
        return np.concatenate([fp16_bytes(d), _nibbles(L, L.shape[1])], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        return read_fp16(b[:, 0:2])[:, None] * _decode(b[:, 2:])


class IQ4_XS(BlockKernel):
    qtype = T.IQ4_XS

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        xs, w = _weights(x, qw, QK_K)
        scales = np.ascontiguousarray(_search_scale(xs, w).reshape(nb, 8).T)
        _, max_scale = first_absmax(scales)
        d = (-max_scale) / F32(32)  # an all-zero super-block gives d = -0.0 (stored 0x8000)
        inv_d = np.where(d != 0, F32(1) / d, F32(0))
        ls = np.clip(nearest_int(inv_d * scales), -32, 31)
        dl = d * ls.astype(F32)
        inv_dl = np.where(dl != 0, F32(1) / dl, F32(0))
        L = best_index_iq4nl(np.ascontiguousarray(inv_dl.T).reshape(-1) * xs)
        ls = ls + 32
        scales_l = ((ls[0::2] & 0xF) | ((ls[1::2] & 0xF) << 4)).T.astype(np.uint8)
        scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8)[:, None]), axis=0)
        return np.concatenate([fp16_bytes(d), le_bytes(scales_h, "<u2"), scales_l, _nibbles(L, nb)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        sh = np.ascontiguousarray(b[:, 2:4]).view("<u2").astype(np.int32)  # [n, 1]
        sl = b[:, 4:8].astype(np.int32)
        ls = ((sl[:, np.arange(8) // 2] >> (4 * (np.arange(8) % 2))) & 0xF) | (
            ((sh >> (2 * np.arange(8))) & 3) << 4
        )
        dl = np.repeat(d * (ls - 32).astype(F32), 32, axis=1)
        return dl * _decode(b[:, 8:])
