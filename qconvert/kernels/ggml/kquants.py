"""K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Ports of ``quantize_row_<T>_ref`` (no imatrix) and ``quantize_row_<T>_impl`` (imatrix) from
ggml/src/ggml-quants.c. Sub-blocks are the lanes of the helpers (see helpers.py); per-super-block values
are arrays shaped ``[sub-blocks per super-block, nb]``. After the scales are quantized, every sub-block
is re-quantized with the stored fp16 ``d``/``dmin`` unless its effective scale is 0 (then the search's
levels stay), exactly as in C.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .helpers import (
    F32,
    GROUP_MAX_EPS,
    QK_K,
    BlockKernel,
    block_sigma2,
    first_absmax,
    fp16_bytes,
    fp16_round,
    impl_weights,
    lanes,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    read_fp16,
    running_max,
    seqsum,
    unlanes,
    wrap_i8,
    wrap_u8,
)

_BITS8 = np.arange(8, dtype=np.int32)[:, None]


def _per_block(v: np.ndarray, nb: int) -> np.ndarray:
    """Lane values [nb*k] -> [k, nb] (sub-block index first)."""
    return np.ascontiguousarray(v.reshape(nb, -1).T)


def _per_lane(v: np.ndarray) -> np.ndarray:
    """[k, nb] -> lane order [nb*k]."""
    return np.ascontiguousarray(v.T).reshape(-1)


def _requant(L: np.ndarray, dl: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Keep the search's levels where the stored sub-block scale is 0 (C: ``if (!d) continue``)."""
    return np.where(dl != 0, levels, L)


def _pack_2bit(Lb: np.ndarray) -> np.ndarray:
    """[nb, 256] levels in 0..3 -> qs [nb, 64]: qs[32h+l] holds 128h+l+32k at bits 2k."""
    r = Lb.reshape(-1, 2, 4, 32)
    qs = r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)
    return qs.reshape(-1, 64).astype(np.uint8)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K).astype(np.int32)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales/mins [8, nb] (uint8 values, may exceed 63 in degenerate cases) -> 12 bytes [nb, 12]."""
    b = np.concatenate(
        [
            ls[0:4] | ((ls[4:8] >> 4) << 6),
            lm[0:4] | ((lm[4:8] >> 4) << 6),
            (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4),
        ],
        axis=0,
    )
    return wrap_u8(b).T.astype(np.uint8)


def _unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: [nb, 12] bytes -> (sc, m) [nb, 8]."""
    b = b.astype(np.int32)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_q3_scales(lsc: np.ndarray) -> np.ndarray:
    """16 six-bit scales (0..63) [16, nb] -> 12 bytes [nb, 12]."""
    lo, hi = lsc & 0xF, lsc >> 4
    b = np.concatenate(
        [lo[0:8] | (lo[8:16] << 4), hi[0:4] | (hi[4:8] << 2) | (hi[8:12] << 4) | (hi[12:16] << 6)]
    )
    return wrap_u8(b).T.astype(np.uint8)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    """12 bytes [nb, 12] -> the 6-bit values [nb, 16] (stored as scale + 32)."""
    b = b.astype(np.int32)
    lo = np.concatenate([b[:, 0:8] & 0xF, b[:, 0:8] >> 4], axis=1)
    hi = np.concatenate([(b[:, 8:12] >> s) & 3 for s in (0, 2, 4, 6)], axis=1)
    return lo | (hi << 4)


class Q2_K(BlockKernel):
    qtype = T.Q2_K

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        xs = lanes(x, 16)
        if qw is None:
            scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True, False)
            sc, mn = _per_block(scales, nb), _per_block(mins, nb)
            max_scale, max_min = running_max(sc), running_max(mn)
            has_s, has_m = max_scale > 0, max_min > 0
            ls = np.where(has_s, wrap_u8(nearest_int((F32(15) / max_scale) * sc)), 0)
            lm = nearest_int((F32(15) / max_min) * mn)
            sbytes = np.where(has_m, wrap_u8(ls | (lm << 4)), ls)
            d = np.where(has_s, max_scale / F32(15), F32(0))
            dmin = np.where(has_m, max_min / F32(15), F32(0))
        else:
            w = impl_weights(x, qw, 16, block_sigma2(x))
            sw = _per_block(seqsum(w), nb)
            scales, mins, L = make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, False, True)
            d, Ls = make_qp_quants(_per_block(scales, nb), 15, sw)
            dmin, Lm = make_qp_quants(_per_block(mins, nb), 15, sw)
            sbytes = wrap_u8(Ls | (Lm << 4))
        dl = _per_lane(fp16_round(d) * (sbytes & 0xF).astype(F32))
        ml = _per_lane(fp16_round(dmin) * (sbytes >> 4).astype(F32))
        L = _requant(L, dl, np.clip(nearest_int((xs + ml) / dl), 0, 3))
        qs = _pack_2bit(unlanes(L, nb))
        return np.concatenate([sbytes.T.astype(np.uint8), qs, fp16_bytes(d), fp16_bytes(dmin)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        sc = b[:, 0:16].astype(np.int32)
        d, dmin = read_fp16(b[:, 80:82])[:, None], read_fp16(b[:, 82:84])[:, None]
        dl = np.repeat(d * (sc & 0xF).astype(F32), 16, axis=1)
        ml = np.repeat(dmin * (sc >> 4).astype(F32), 16, axis=1)
        return dl * _unpack_2bit(b[:, 16:80]).astype(F32) - ml


class Q3_K(BlockKernel):
    qtype = T.Q3_K

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        xs = lanes(x, 16)
        if qw is None:
            scales, L = make_q3_quants(xs, 4)
            sc = _per_block(scales, nb)
            _, max_scale = first_absmax(sc)
            nonzero = max_scale != 0
            iscale = F32(-32) / max_scale
            lsc = np.clip(wrap_i8(nearest_int(iscale * sc)), -32, 31) + 32
            lsc = np.where(nonzero, lsc, 0)  # C memsets the scale bytes and stores d = 0
            d = np.where(nonzero, F32(1) / iscale, F32(0))
        else:
            w = impl_weights(x, qw, 16, block_sigma2(x, twice=True))
            sw = _per_block(seqsum(w), nb)
            scales, L = make_qx_quants(xs, 4, w)
            d, lsc = make_qx_quants(_per_block(scales, nb), 32, sw)
        dl = _per_lane(fp16_round(d) * (lsc - 32).astype(F32))
        L = _requant(L, dl, np.clip(nearest_int(xs / dl), -4, 3) + 4)
        Lb = unlanes(L, nb)
        high = (Lb > 3).astype(np.int32)
        Lb = Lb - 4 * high
        hmask = np.bitwise_or.reduce(high.reshape(nb, 8, 32) << _BITS8, axis=1).astype(np.uint8)
        return np.concatenate([hmask, _pack_2bit(Lb), _pack_q3_scales(lsc), fp16_bytes(d)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 108:110])[:, None]
        dl = np.repeat(d * (_unpack_q3_scales(b[:, 96:108]) - 32).astype(F32), 16, axis=1)
        hbit = ((b[:, None, 0:32].astype(np.int32) >> _BITS8) & 1).reshape(-1, QK_K)
        q = _unpack_2bit(b[:, 32:96]) - np.where(hbit != 0, 0, 4)
        return dl * q.astype(F32)


class _Q45K(BlockKernel):
    """Q4_K and Q5_K share everything but nmax, the _ref search constants and the bit packing."""

    nmax: int
    ref_search: tuple[float, float, int]
    clamp_impl_scales: bool

    @classmethod
    def _levels(cls, x, qw):
        nb = x.size // QK_K
        xs = lanes(x, 32)
        if qw is None:
            av_x = np.sqrt(seqsum(xs * xs) / F32(32))
            rmin, rdelta, nstep = cls.ref_search
            scales, mins, L = make_qkx_quants(
                xs, av_x + np.abs(xs), cls.nmax, rmin, rdelta, nstep, False, False
            )
            sc, mn = _per_block(scales, nb), _per_block(mins, nb)
            max_scale, max_min = running_max(sc), running_max(mn)
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
            ls = np.minimum(63, wrap_u8(nearest_int(inv_scale * sc)))  # uint8 wrap first, then MIN
            lm = np.minimum(63, wrap_u8(nearest_int(inv_min * mn)))
            d, dmin = max_scale / F32(63), max_min / F32(63)
        else:
            w = impl_weights(x, qw, 32, block_sigma2(x, twice=True))
            sw = _per_block(seqsum(w), nb)
            scales, mins, L = make_qkx_quants(xs, w, cls.nmax, -0.9, 0.05, 36, False, True)
            d, ls = make_qp_quants(_per_block(scales, nb), 63, sw)
            dmin, lm = make_qp_quants(_per_block(mins, nb), 63, sw)
            if cls.clamp_impl_scales:
                ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        sbytes = _pack_scale_min_k4(ls, lm)
        sc, m = _unpack_scale_min_k4(sbytes)
        dl = (fp16_round(d)[:, None] * sc.astype(F32)).reshape(-1)
        ml = (fp16_round(dmin)[:, None] * m.astype(F32)).reshape(-1)
        L = _requant(L, dl, np.clip(nearest_int((xs + ml) / dl), 0, cls.nmax))
        head = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), sbytes], axis=1)
        return head, unlanes(L, nb).reshape(nb, 4, 2, 32)

    @classmethod
    def _scales(cls, b):
        d, dmin = read_fp16(b[:, 0:2])[:, None], read_fp16(b[:, 2:4])[:, None]
        sc, m = _unpack_scale_min_k4(b[:, 4:16])
        return np.repeat(d * sc.astype(F32), 32, axis=1), np.repeat(dmin * m.astype(F32), 32, axis=1)


class Q4_K(_Q45K):
    qtype = T.Q4_K
    nmax = 15
    ref_search = (-1.0, 0.1, 20)
    clamp_impl_scales = False  # quantize_row_q4_K_impl stores Ls as is

    @classmethod
    def quantize_rows(cls, x, qw):
        head, Lr = cls._levels(x, qw)
        qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)
        return np.concatenate([head, qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        dl, ml = cls._scales(b)
        qs = b[:, 16:144].reshape(-1, 4, 1, 32)
        q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
        return dl * q.reshape(-1, QK_K).astype(F32) - ml


class Q5_K(_Q45K):
    qtype = T.Q5_K
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_impl_scales = True

    @classmethod
    def quantize_rows(cls, x, qw):
        head, Lr = cls._levels(x, qw)
        high = (Lr > 15).astype(np.int32).reshape(-1, 8, 32)  # index 2c + half = bit of qh
        qh = np.bitwise_or.reduce(high << _BITS8, axis=1).astype(np.uint8)
        ql = ((Lr[:, :, 0] & 0xF) | ((Lr[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)
        return np.concatenate([head, qh, ql], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        dl, ml = cls._scales(b)
        qs = b[:, 48:176].reshape(-1, 4, 1, 32)
        lo = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
        hi = (b[:, None, 16:48].astype(np.int32) >> _BITS8) & 1
        q = lo.reshape(-1, QK_K).astype(np.int32) | (hi.reshape(-1, QK_K) << 4)
        return dl * q.astype(F32) - ml


class Q6_K(BlockKernel):
    qtype = T.Q6_K

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        xs = lanes(x, 16)
        # the imatrix path uses the raw importance as weights (its sigma2 variant is commented out in C)
        scales, L = make_qx_quants(xs, 32, None if qw is None else lanes(np.broadcast_to(qw, x.shape), 16))
        sc = _per_block(scales, nb)
        amax, max_scale = first_absmax(sc)
        iscale = F32(-128) / max_scale
        d = F32(1) / iscale
        sc8 = wrap_i8(np.minimum(127, nearest_int(iscale * sc)))
        dl = _per_lane(fp16_round(d) * sc8.astype(F32))
        L = _requant(L, dl, np.clip(nearest_int(xs / dl), -32, 31) + 32)
        r = unlanes(L, nb).reshape(nb, 2, 4, 32)
        ql = np.concatenate(
            [(r[:, :, 0] & 0xF) | ((r[:, :, 2] & 0xF) << 4), (r[:, :, 1] & 0xF) | ((r[:, :, 3] & 0xF) << 4)],
            axis=2,
        ).reshape(nb, 128)
        h = r >> 4
        qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(nb, 64)
        out = np.concatenate([ql, qh, wrap_u8(sc8).T, fp16_bytes(d)], axis=1).astype(np.uint8)
        out[amax < GROUP_MAX_EPS] = 0  # all-zero super-block: C memsets the whole block
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 208:210])[:, None]
        dl = np.repeat(d * b[:, 192:208].view(np.int8).astype(F32), 16, axis=1)
        ql = b[:, 0:128].reshape(-1, 2, 2, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
        lo = (ql & 0xF).transpose(0, 1, 3, 2, 4).reshape(-1, 2, 4, 32)  # quarter k = 2*nibble + ql half
        hi = (
            b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ) & 3
        q = (lo.astype(np.int32) | (hi.astype(np.int32) << 4)) - 32
        return dl * q.reshape(-1, QK_K).astype(F32)
