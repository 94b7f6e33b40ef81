"""The ternary lattice types IQ1_S and IQ1_M (256-weight super-blocks, 8-weight groups on {-1, 0, +1}).

Ports of ``quantize_row_iq1_s_impl`` (ggml-quants.c:4508) and ``quantize_row_iq1_m_impl`` (:4692)
(shared/reference/gguf-lowbit.md §3.6-3.7). Per sub-block (32 weights for IQ1_S, 16 for IQ1_M) the
weights are sorted, and every split of the sorted order into three runs (levels 0, 1, 2 = -1, 0, +1,
shifted by ±IQ1S_DELTA) is scored exactly from prefix sums; the best split's groups are then snapped to
the 2048-point grid (neighbour lists of grids.py, scored with the full weight and the signed x) and
the scale refit. Sub-blocks are the lanes ``[element, lane]``.

imatrix: IQ1_S cannot run without one (ggml aborts; here ValueError). IQ1_M without one weighs by x².
The sort must be stable (glibc 2.36's qsort is a merge sort): equal values keep their index order.
"""

from __future__ import annotations

import functools

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as T

from .grids import FLT_MAX, GridTables, gguf_py_grid, search_failed
from .helpers import (
    F32,
    QK_K,
    BlockKernel,
    fp16_bits,
    fp16_bytes,
    fp16_to_f32,
    lanes,
    lattice_weights,
    le_bytes,
    macro_max,
    nearest_int,
    read_fp16,
    seqsum,
)
from .iq2 import KMAP_SIZE, KMAXQ

DELTA = F32(0.125)  # IQ1S_DELTA = IQ1M_DELTA (ggml-common.h:1132)
X_P = np.array([F32(-1) + DELTA, DELTA, F32(1) + DELTA], dtype=F32)  # levels shifted up
X_M = np.array([F32(-1) - DELTA, -DELTA, F32(1) - DELTA], dtype=F32)  # levels shifted down
# iq1s_grid (ggml-common.h:1135) holds, as int8, the level l_i(k) - 1 of the quantizer grid entry k
MAGNITUDE = np.array(gguf.quants.IQ1_S.grid_map, dtype=F32)  # -1, 0, 1
_SEARCH_CHUNK = 2048  # neighbour searches per pass (bounds the [m, maxlen, 8] scratch)


def kgrid() -> np.ndarray:
    """kgrid_1bit_2048 (ggml-quants.c:2911), shared by IQ1_S and IQ1_M: level (0..2) of coordinate i at
    bits 2i..2i+1. Read from gguf-py, which ships the same entries as IQ1_S.grid_hex (see iq2.kgrid)."""
    return gguf_py_grid(gguf.quants.IQ1_S, ncoord=8, bits=2, hex_bits=2)


@functools.cache
def tables() -> GridTables:
    """iq2xs_init_impl(IQ1_S / IQ1_M): nwant = 3 distinct distances, reachable keys only."""
    return GridTables.build(kgrid(), ncoord=8, bits=2, kmap_size=KMAP_SIZE, nwant=3, kmax=KMAXQ)


# ---------------------------------------------------------------------------------------------- pieces


def sort_lanes(xs: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable ascending sort of each lane by x: (order [n, lanes], sorted x, sorted weight).

    Ties keep index order, as glibc's merge sort does (NaN lanes never produce a candidate, so how they
    sort does not matter)."""
    order = np.argsort(xs, axis=0, kind="stable")
    return order, np.take_along_axis(xs, order, axis=0), np.take_along_axis(weight, order, axis=0)


def assign_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Sorted positions < i1 get level 0, [i1, i2) level 1, the rest 2: L [n, lanes] by element."""
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(order.shape[0])[:, None], axis=0)
    return (pos >= i1).astype(np.int64) + (pos >= i2)


def best_neighbour(t: GridTables, keys: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray,
                   xx: np.ndarray, what: str) -> np.ndarray:
    """iq1_find_best_neighbour2 for m groups: score ``Σ (w·diff)·diff``, ``diff = scale·xx[l] - x`` with
    the full weight and the signed x (x, w [8, m]); the first minimum below FLT_MAX wins. xx [m, 3] is each
    group's level table.

    ggml falls back to scanning the whole grid when no listed score is below FLT_MAX; that scan reads
    past the group (ggml-quants.c:4467 indexes xval with the grid loop variable), so its outcome is not
    defined by the data. It only happens for inf/NaN weights: BadInput, like the other grid types."""
    lists, counts = t.padded
    levels = t.levels.astype(np.int64)
    out = np.empty(keys.shape[0], dtype=np.int64)
    for a in range(0, keys.shape[0], _SEARCH_CHUNK):
        sl = slice(a, a + _SEARCH_CHUNK)
        n = counts[keys[sl]]
        cand = lists[keys[sl], : int(n.max())]
        valid = np.arange(cand.shape[1]) < n[:, None]
        lv = levels[cand]  # [m, maxlen, 8]
        q = xx[sl][np.arange(cand.shape[0])[:, None, None], lv]  # xx[l] of each candidate coordinate
        d2 = np.zeros(cand.shape, dtype=F32)
        for i in range(8):
            diff = scale[sl, None] * q[:, :, i] - x[i, sl, None]
            d2 += (w[i, sl, None] * diff) * diff
        ok = valid & (d2 < FLT_MAX)
        if not ok.any(axis=1).all():
            raise search_failed(what)
        j = np.argmin(np.where(ok, d2, np.inf), axis=1)
        out[sl] = cand[np.arange(cand.shape[0]), j]
    return out


def snap(L: np.ndarray, xs: np.ndarray, weight: np.ndarray, scale: np.ndarray, xx: np.ndarray,
         active: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid index of every 8-group of L [8·ng, lanes] (off-grid groups of active lanes replaced in place
    by their best neighbour). xx [ng, lanes, 3] is each group's level table.
    Returns (index [ng, lanes], any group off the grid [lanes])."""
    t = tables()
    ng = L.shape[0] // 8
    idx = np.zeros((ng, L.shape[1]), dtype=np.int64)
    any_off = np.zeros(L.shape[1], dtype=bool)
    for g in range(ng):
        rows = slice(8 * g, 8 * g + 8)
        keys = t.key(L[rows])
        gi = t.kmap[keys].astype(np.int64)
        off = (gi < 0) & active
        sel = np.flatnonzero(off)
        if sel.size:
            gi[sel] = best_neighbour(t, keys[sel], xs[rows][:, sel], weight[rows][:, sel], scale[sel],
                                     xx[g, sel], what)
            L[rows, sel] = t.levels[gi[sel]].T
        idx[g] = np.where(active, gi, 0)
        any_off |= off
    return idx, any_off


def refit(L: np.ndarray, xs: np.ndarray, weight: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = Σ (w·q)·x, sumq2 = Σ (w·q)·q over the sub-block, q = xx[L] of each group, left to right."""
    q = np.take_along_axis(np.repeat(xx, 8, axis=0), L[:, :, None], axis=2)[:, :, 0]
    wq = weight * q
    return seqsum(wq * xs), seqsum(wq * q)


def level_tables(shift_plus: np.ndarray) -> np.ndarray:
    """Per-group level tables [..., 3]: X_P where shift_plus else X_M."""
    return np.where(shift_plus[..., None], X_P, X_M)


def group_tables(k: np.ndarray, ngroups: int) -> np.ndarray:
    """The level tables [ngroups, lanes, 3] of a sub-block's groups for its shift code k [lanes]:
    0 (+,+), 1 (+,-), 2 (-,+), 3 (-,-), the first group's shift first, + meaning X_P (IQ1_M's best_k);
    IQ1_S shifts all four of its groups alike, k is 0 or 3."""
    rest = level_tables(k % 2 == 0)
    return np.stack([level_tables(k < 2)] + [rest] * (ngroups - 1))


class _Split:
    """The split search's running choice per lane, as C keeps it: a candidate (sumqx, sumq2) is accepted
    ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2)``, then scale = sumqx/sumq2, best = scale*sumqx, and
    its split (i1, i2) and shift code k are kept. scale starts at max|x|, best at -FLT_MAX."""

    def __init__(self, xs: np.ndarray) -> None:
        nl = xs.shape[1]
        self.best = np.full(nl, -FLT_MAX, dtype=F32)
        self.scale = macro_max(np.abs(xs), from_first=True)
        self.i1 = np.full(nl, -1)
        self.i2 = np.full(nl, -1)
        self.k = np.zeros(nl, dtype=np.int64)

    def offer(self, sumqx: np.ndarray, sumq2: np.ndarray, i1: int, i2: int, k: int) -> None:
        acc = (sumq2 > 0) & (sumqx * sumqx > self.best * sumq2)
        new = sumqx / sumq2
        self.scale = np.where(acc, new, self.scale)
        self.best = np.where(acc, new * sumqx, self.best)
        self.i1 = np.where(acc, i1, self.i1)
        self.i2 = np.where(acc, i2, self.i2)
        self.k = np.where(acc, k, self.k)

    def settle(self, xs: np.ndarray, weight: np.ndarray, order: np.ndarray, eps: np.float32,
               what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The accepted split made final (C after the search): levels from the sorted order, mirrored
        (2 - l, with the scale and the shift code) where the scale is negative, the groups snapped to the
        grid and the scale refit where one was off it. Sub-blocks with max|x| < eps or no accepted split
        are dropped. Returns (scale, shift code, grid index [groups, lanes], active)."""
        active = ~(macro_max(np.abs(xs), from_first=True) < eps) & (self.i1 >= 0)
        L = assign_levels(order, self.i1, self.i2)
        neg = self.scale < 0
        L = np.where(neg, 2 - L, L)
        scale = np.where(neg, -self.scale, self.scale)
        k = np.where(neg, 3 - self.k, self.k)
        xx = group_tables(k, xs.shape[0] // 8)
        idx, any_off = snap(L, xs, weight, scale, xx, active, what)
        sumqx, sumq2 = refit(L, xs, weight, xx)
        scale = np.where(any_off & (sumqx > 0) & (sumq2 > 0), sumqx / sumq2, scale)
        if np.isnan(scale[active]).any():
            raise search_failed(what)
        return np.where(active, scale, F32(0)), np.where(active, k, 0), idx, active


def sub_scales(scale: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [nb], d = max_scale/15 [nb], 3-bit codes ls [sub-blocks per block, nb]) of the
    sub-block scales [lanes]."""
    per = np.ascontiguousarray(scale.reshape(nb, -1).T)
    max_scale = macro_max(per)
    d = max_scale / F32(15)
    inv = F32(1) / d
    return max_scale, d, np.clip(nearest_int(F32(0.5) * ((inv * per) - F32(1))), 0, 7)


# ---------------------------------------------------------------------------------------------- IQ1_S


def search_s(xs: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sub-blocks of 32: (scale, shift code 0 (+) or 3 (-), grid index [4, lanes], active) per lane."""
    n, nl = xs.shape
    order, xsrt, wsrt = sort_lanes(xs, weight)
    sumx = np.zeros((n + 1, nl), dtype=F32)
    sumw = np.zeros((n + 1, nl), dtype=F32)
    for j in range(n):
        sumx[j + 1] = sumx[j] + wsrt[j] * xsrt[j]
        sumw[j + 1] = sumw[j] + wsrt[j]
    split = _Split(xs)
    for i1 in range(n + 1):
        a = sumx[i1] - sumx[0]
        wa = sumw[i1] - sumw[0]
        for i2 in range(i1, n + 1):
            b, c = sumx[i2] - sumx[i1], sumx[n] - sumx[i2]
            wb, wc = sumw[i2] - sumw[i1], sumw[n] - sumw[i2]
            for xx, k in ((X_P, 0), (X_M, 3)):
                sumqx = (a * xx[0] + b * xx[1]) + c * xx[2]
                sumq2 = ((wa * xx[0]) * xx[0] + (wb * xx[1]) * xx[1]) + (wc * xx[2]) * xx[2]
                split.offer(sumqx, sumq2, i1, i2, k)
    return split.settle(xs, weight, order, F32(1e-12), "IQ1_S")


class IQ1_S(BlockKernel):
    qtype = T.IQ1_S
    requires_imatrix = True

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        weight = lattice_weights(x, qw, 32)
        scale, shift, idx, _ = search_s(lanes(x, 32), weight)
        max_scale, d, ls = sub_scales(scale, nb)
        ls = ls.T.reshape(-1) | np.where(shift == 3, 8, 0)
        # all scales zero: C skips the scale pass and keeps the indices it wrote (d = 0, ls bits 0)
        zero = np.repeat(max_scale == 0, 8)
        qh = np.bitwise_or.reduce((idx >> 8) << (3 * np.arange(4)[:, None]), axis=0)
        qh |= np.where(zero, 0, ls << 12)
        qs = np.ascontiguousarray((idx & 255).T).reshape(nb, 32).astype(np.uint8)
        d = np.where(max_scale == 0, F32(0), d * F32(1.125))
        return np.concatenate([fp16_bytes(d), qs, le_bytes(qh, "<u2").reshape(nb, 16)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])
        qs = b[:, 2:34].astype(np.int64).reshape(-1, 8, 4)
        qh = np.ascontiguousarray(b[:, 34:50]).view("<u2").astype(np.int64)  # [n, 8]
        idx = qs | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
        dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(F32)
        delta = np.where(qh & 0x8000, -DELTA, DELTA)
        grid = MAGNITUDE[tables().levels[idx]]  # [n, 8, 4, 8]
        return (dl[:, :, None, None] * (grid + delta[:, :, None, None])).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------- IQ1_M

_MASKS = np.array([0x00, 0x80, 0x08, 0x88])  # qh delta bits of best_k 0..3


def search_m(xs: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sub-blocks of 16 = two groups, each with its own shift: (scale, best_k 0..3, index [2, lanes],
    active). best_k: 0 (+,+), 1 (+,-), 2 (-,+), 3 (-,-), first group first; + means X_P."""
    n, nl = xs.shape
    order, xsrt, wsrt = sort_lanes(xs, weight)
    half = order >= n // 2  # [n, lanes]: sorted element j belongs to the second group
    px = np.zeros((2, n + 1, nl), dtype=F32)
    pw = np.zeros((2, n + 1, nl), dtype=F32)
    for j in range(n):
        wx = wsrt[j] * xsrt[j]
        for h in (0, 1):
            mine = half[j] == bool(h)
            px[h, j + 1] = np.where(mine, px[h, j] + wx, px[h, j])
            pw[h, j + 1] = np.where(mine, pw[h, j] + wsrt[j], pw[h, j])
    txs, tws = px[:, n], pw[:, n]
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    split = _Split(xs)
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            sx = px[:, i1] + px[:, i2]
            qx_p = txs * p2 - sx
            qx_m = txs * m2 - sx
            q2_p = ((tws * p2) * p2 + pw[:, i1] * cp1) + pw[:, i2] * cp2
            q2_m = ((tws * m2) * m2 + pw[:, i1] * cm1) + pw[:, i2] * cm2
            combos = ((qx_p[0] + qx_p[1], q2_p[0] + q2_p[1]), (qx_p[0] + qx_m[1], q2_p[0] + q2_m[1]),
                      (qx_m[0] + qx_p[1], q2_m[0] + q2_p[1]), (qx_m[0] + qx_m[1], q2_m[0] + q2_m[1]))
            for k, (sumqx, sumq2) in enumerate(combos):
                split.offer(sumqx, sumq2, i1, i2, k)
    return split.settle(xs, weight, order, F32(1e-7), "IQ1_M")


class IQ1_M(BlockKernel):
    qtype = T.IQ1_M

    @classmethod
    def quantize_rows(cls, x, qw):
        nb = x.size // QK_K
        weight = lattice_weights(x, qw, 16)
        scale, bk, idx, _ = search_m(lanes(x, 16), weight)
        max_scale, d, ls = sub_scales(scale, nb)  # ls [16, nb]
        # super-scale refit over all 256 weights, zero sub-blocks included (grid point 0, X_P)
        lv = tables().levels.astype(np.int64)[idx]  # [2, lanes, 8]
        xx = group_tables(bk, 2)[:, :, None, :].repeat(8, axis=2)  # [2, lanes, 8, 3]
        q = np.take_along_axis(xx, lv[..., None], axis=3)[..., 0]
        q = q * np.repeat((2 * ls.T.reshape(-1) + 1).astype(F32)[None, :, None], 8, axis=2)
        q_w = np.ascontiguousarray(q.transpose(1, 0, 2)).reshape(nb, QK_K).T  # [256, nb] in weight order
        wq = lanes(_unlane(weight, nb), QK_K) * q_w
        xb = lanes(x, QK_K)
        sumqx, sumq2 = seqsum(wq * xb), seqsum(wq * q_w)
        d = np.where(sumq2 > 0, sumqx / sumq2, d)
        s = fp16_bits(d * F32(1.1125)).astype(np.int64)
        words = np.bitwise_or.reduce(ls.reshape(4, 4, nb) << (3 * np.arange(4)[None, :, None]), axis=1)
        words |= ((s[None, :] >> (4 * np.arange(4)[:, None])) & 0xF) << 12
        # all scales zero: C skips the scale pass and keeps the indices it wrote (no shift bits, no scales)
        zero = max_scale == 0
        qh = (idx[0] >> 8) | ((idx[1] >> 8) << 4) | np.where(np.repeat(zero, 16), 0, _MASKS[bk])
        words = np.where(zero, 0, words)
        return np.concatenate([np.ascontiguousarray((idx & 255).T).reshape(nb, 32).astype(np.uint8),
                               qh.reshape(nb, 16).astype(np.uint8),
                               le_bytes(words.T.reshape(-1), "<u2").reshape(nb, 8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        sc = np.ascontiguousarray(b[:, 48:56]).view("<u2").astype(np.int64)  # [n, 4]
        bits = np.bitwise_or.reduce((sc >> 12) << (4 * np.arange(4)), axis=1)
        d = fp16_to_f32(bits)
        ls = (sc[:, np.arange(16) // 4] >> (3 * (np.arange(16) % 4))) & 7  # [n, 16]
        dl = d[:, None] * (2 * ls + 1).astype(F32)
        qs = b[:, 0:32].astype(np.int64).reshape(-1, 16, 2)
        qh = b[:, 32:48].astype(np.int64)  # [n, 16]
        idx = qs | (((qh[:, :, None] >> (4 * np.arange(2))) & 7) << 8)
        delta = np.where((qh[:, :, None] >> (3 + 4 * np.arange(2))) & 1, -DELTA, DELTA)  # [n, 16, 2]
        grid = MAGNITUDE[tables().levels[idx]]  # [n, 16, 2, 8]
        return (dl[:, :, None, None] * (grid + delta[..., None])).reshape(-1, QK_K)


def _unlane(v: np.ndarray, nb: int) -> np.ndarray:
    """[n, lanes] lanes of consecutive weights -> [nb, 256] rows of weights."""
    return np.ascontiguousarray(v.T).reshape(nb, QK_K)
