"""Kernels for IQ1_S and IQ1_M (256-weight super-blocks, 8-weight groups on {-1, 0, +1} shifted by ±1/8).

Literal float32 ports of quantize_row_iq1_s_impl / quantize_row_iq1_m_impl (ggml-quants.c:4508, :4692);
the spec is qconvert.kernels.ggml.iq1. Every sub-block is sorted (stably: ties keep their index order,
as glibc's merge sort does) and gets its prefix sums; then the exhaustive split search runs with the
sub-blocks of BATCH super-blocks side by side as lanes: the candidates come in the same order for every
sub-block, so each step is a vector step with C's operations, and C's sequential accept chain becomes a
per-lane update (done only when some lane accepts). Grid snapping and the refits are per sub-block; an
off-grid group's neighbour scan scores its whole list in one vector loop.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ..ggml import iq1 as _spec
from ..ggml.grids import search_failed
from ..ggml.helpers import missing_imatrix
from ._core import F0, F1, F2, F7, F15, F256, JIT, fp32_to_fp16, odd_level, put_u16
from ._grids import FLT_MAX, key8, load_group, scan, soa_tables, square_sum

DELTA = np.float32(0.125)
X_P = np.array([-1.0 + 0.125, 0.125, 1.0 + 0.125], np.float32)
X_M = np.array([-1.0 - 0.125, -0.125, 1.0 - 0.125], np.float32)
EPS_S = np.float32(1e-12)  # GROUP_MAX_EPS_IQ1_S
EPS_M = np.float32(1e-7)  # GROUP_MAX_EPS_IQ1_M
FUDGE_S = np.float32(1.125)
FUDGE_M = np.float32(1.1125)
P0, P1, P2 = X_P[0], X_P[1], X_P[2]
M0, M1, M2 = X_M[0], X_M[1], X_M[2]
MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int32)  # IQ1_M qh shift bits of best_k


@functools.cache
def tables() -> tuple[np.ndarray, ...]:
    """(kmap, start, count, lev, idx, levels): _grids.soa_tables of the shared IQ1 grid (levels 0., 1., 2.
    in the lists) and levels float32 [2048, 8]."""
    t = _spec.tables()
    return (*soa_tables(t), t.levels.astype(np.float32))


@njit(inline="always", **JIT)
def _sort(x, base, n, order, lane, rank):
    """order[lane, 0:n] = the positions 0..n-1 of x[base:base+n] in stable ascending order (ties in index
    order, as glibc's merge sort leaves them): position i goes to rank #{j: x_j < x_i} + #{j < i: x_j ==
    x_i}, counted with vector compares. Returns False if the sub-block holds a NaN (ranks are then not a
    permutation; C's sums are NaN whatever the order, so no split is ever accepted: the caller drops it)."""
    nan = False
    for i in range(n):
        rank[np.uint64(i)] = 0
        nan |= x[base + i] != x[base + i]
    for j in range(n):
        xj = x[base + j]
        for i in range(n):
            ui = np.uint64(i)
            xi = x[base + ui]
            rank[ui] += np.int64((xj < xi) | ((xj == xi) & (j < i)))
    if nan:
        return False
    for i in range(n):
        order[lane, rank[i]] = i
    return True


@njit(inline="always", **JIT)
def _snap(L, off, x, w, base, scale, xx0, kmap, start, count, lev, idx, levels, g):
    """Grid index of the group L[off:off+8] (levels 0..2), replaced in L by its best neighbour when off the
    grid (iq1_find_best_neighbour2: the full weight and the signed x, q = xx0 + l; if no score is below
    FLT_MAX ggml scans the whole grid reading past the group, ggml-quants.c:4467: the caller refuses);
    returns (index, was off grid), index -1 when the search failed."""
    u = key8(L, off)
    gi = kmap[u]
    if gi >= 0:
        return gi, False
    load_group(g, x, w, base + off)
    gi = scan(start[u], count[u], lev, idx, g, scale, xx0)
    if gi >= 0:
        for i in range(8):
            L[off + i] = levels[gi, i]
    return gi, True


@njit(inline="always", **JIT)
def _xx0(k, grp):
    """xx[0] of group grp's level table for the shift code k: 0 (+,+), 1 (+,-), 2 (-,+), 3 (-,-), the
    first group's shift first; + is X_P. IQ1_S shifts its whole sub-block alike (k is 0 or 3)."""
    plus = k < 2 if grp == 0 else k % 2 == 0
    return X_P[0] if plus else X_M[0]


@njit(inline="always", **JIT)
def _settle(lane, code, scl, order, n, x, wt, base, L, gidx, kmap, start, count, lev, idx, levels, g):
    """The accepted split of a live sub-block made final, as C does after the search: the levels from the
    sorted order (mirrored, 2 - l, with the scale and the shift code when the scale is negative), every
    group snapped to the grid, and the scale refit (sumqx/sumq2, if both are positive) when one was off
    it. Returns (scale, shift code k, ok); ok False where ggml aborts (no neighbour, a NaN scale)."""
    c = code[lane]
    i1 = c // (4 * (n + 1))
    i2 = (c // 4) % (n + 1)
    k = c % 4
    for j in range(n):
        L[order[lane, j]] = F0 if j < i1 else (F1 if j < i2 else F2)
    scale = scl[lane]
    if scale < F0:
        for j in range(n):
            L[j] = F2 - L[j]
        scale = -scale
        k = 3 - k
    any_off = False
    for grp in range(n // 8):
        gi, was_off = _snap(L, 8 * grp, x, wt, base, scale, _xx0(k, grp), kmap, start, count, lev, idx,
                            levels, g)
        if gi < 0:
            return scale, k, False
        gidx[grp] = gi
        any_off |= was_off
    if any_off:
        sumqx = F0
        sumq2 = F0
        for j in range(n):
            w = wt[base + j]
            q = _xx0(k, j // 8) + L[j]
            sumqx = sumqx + (w * q) * x[base + j]
            sumq2 = sumq2 + (w * q) * q
        if sumqx > F0 and sumq2 > F0:
            scale = sumqx / sumq2
    return scale, k, scale >= F0  # GGML_ASSERT(scale >= 0): a NaN scale fails


@njit(inline="always", **JIT)
def _weights(x, qw, qoff, use_qw, weight):
    """weight = qw*sqrtf(sigma2 + x*x), sigma2 = 2*Σx²/256; x*x without an imatrix (IQ1_M only)."""
    sigma2 = (F2 * square_sum(x, 256)) / F256
    for i in range(256):
        xi = x[i]
        weight[i] = qw[qoff + i] * np.sqrt(sigma2 + xi * xi) if use_qw else xi * xi


BATCH = 4  # super-blocks per split search: 32 (IQ1_S) / 64 (IQ1_M) sub-blocks as lanes
NLANES = 16 * BATCH


@njit(inline="always", **JIT)
def _accept(qx, q2, best, scl, code, cand, hit, nl):
    """C's accept step for every lane: ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2)`` then
    ``scale = sumqx/sumq2; best = scale*sumqx``. ``hit`` (the number of lanes that accept) was counted by
    the caller, so a step no lane takes costs no division."""
    if hit > 0:
        for lane in range(nl):
            ul = np.uint64(lane)
            if q2[ul] > F0 and qx[ul] * qx[ul] > best[ul] * q2[ul]:
                scl[ul] = qx[ul] / q2[ul]
                best[ul] = scl[ul] * qx[ul]
                code[ul] = cand


@njit(inline="always", **JIT)
def _offer(sumqx, sumq2, best, qx, q2, ul):
    """Keep lane ul's candidate sums for _accept; 1 if C would accept it, else 0 (counted, so that a step no
    lane takes costs no division)."""
    qx[ul] = sumqx
    q2[ul] = sumq2
    return np.int32((sumq2 > F0) & (sumqx * sumqx > best[ul] * sumq2))


@njit(inline="always", **JIT)
def _try_s(sx, sw, i1, i2, c0, c1, c2, best, qx, q2, nl):
    """sumqx / sumq2 of the IQ1_S split (i1, i2) with the level table (c0, c1, c2), in C's order, for every
    lane; returns how many lanes would accept it. (The lane count is a run-time value: a constant one
    makes LLVM unroll the loop instead of vectorizing it.)"""
    hit = np.int32(0)
    for lane in range(nl):
        ul = np.uint64(lane)
        a = sx[i1, ul] - sx[0, ul]
        bb = sx[i2, ul] - sx[i1, ul]
        c = sx[32, ul] - sx[i2, ul]
        wa = sw[i1, ul] - sw[0, ul]
        wb = sw[i2, ul] - sw[i1, ul]
        wc = sw[32, ul] - sw[i2, ul]
        sumqx = (a * c0 + bb * c1) + c * c2
        sumq2 = ((wa * c0) * c0 + (wb * c1) * c1) + (wc * c2) * c2
        hit += _offer(sumqx, sumq2, best, qx, q2, ul)
    return hit


@njit(**JIT)
def _splits_s(sx, sw, best, scl, code, nl):
    """The exhaustive 3-way split search of IQ1_S, one sub-block per lane: i1 outer, i2 >= i1 inner, x_p
    before x_m. code = 4*(33*i1 + i2) + k, k = 0 (x_p) or 3 (x_m: both of _xx0's shifts minus), or -1
    where nothing was accepted."""
    qx = np.empty(NLANES, np.float32)
    q2 = np.empty(NLANES, np.float32)
    for i1 in range(33):
        for i2 in range(i1, 33):
            cand = np.int32(4 * (33 * i1 + i2))
            hit = _try_s(sx, sw, i1, i2, P0, P1, P2, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand, hit, nl)
            hit = _try_s(sx, sw, i1, i2, M0, M1, M2, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand + np.int32(3), hit, nl)


@njit(inline="always", **JIT)
def _pair(ax, a2, bx, b2, best, qx, q2, nl):
    """IQ1_M: sumqx = first half's + second half's, sumq2 likewise, for every lane; how many accept."""
    hit = np.int32(0)
    for lane in range(nl):
        ul = np.uint64(lane)
        hit += _offer(ax[0, ul] + bx[1, ul], a2[0, ul] + b2[1, ul], best, qx, q2, ul)
    return hit


@njit(**JIT)
def _splits_m(px, pw, best, scl, code, nl):
    """The split search of IQ1_M, one sub-block per lane, from the per-half prefix sums; per split the four
    shift pairs k = (+,+), (+,-), (-,+), (-,-) in order (first group's shift first).
    code = 4*(17*i1 + i2) + k, or -1."""
    p2 = X_P[2]
    m2 = X_M[2]
    cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1]
    cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1]
    cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2]
    qxp = np.empty((2, NLANES), np.float32)
    qxm = np.empty((2, NLANES), np.float32)
    q2p = np.empty((2, NLANES), np.float32)
    q2m = np.empty((2, NLANES), np.float32)
    qx = np.empty(NLANES, np.float32)
    q2 = np.empty(NLANES, np.float32)
    for i1 in range(17):
        for i2 in range(i1, 17):
            cand = np.int32(4 * (17 * i1 + i2))
            for h in range(2):
                for lane in range(nl):
                    ul = np.uint64(lane)
                    sxh = px[h, i1, ul] + px[h, i2, ul]
                    t = px[h, 16, ul]
                    u = pw[h, 16, ul]
                    qxp[h, ul] = t * p2 - sxh
                    qxm[h, ul] = t * m2 - sxh
                    q2p[h, ul] = ((u * p2) * p2 + pw[h, i1, ul] * cp1) + pw[h, i2, ul] * cp2
                    q2m[h, ul] = ((u * m2) * m2 + pw[h, i1, ul] * cm1) + pw[h, i2, ul] * cm2
            hit = _pair(qxp, q2p, qxp, q2p, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand, hit, nl)
            hit = _pair(qxp, q2p, qxm, q2m, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand + np.int32(1), hit, nl)
            hit = _pair(qxm, q2m, qxp, q2p, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand + np.int32(2), hit, nl)
            hit = _pair(qxm, q2m, qxm, q2m, best, qx, q2, nl)
            _accept(qx, q2, best, scl, code, cand + np.int32(3), hit, nl)


@njit(inline="always", **JIT)
def _lane_start(x, base, n, eps, lane, live, scl, best, code, order, rank):
    """A sub-block's zero test (max|x| < eps), the search's start values and its stable sort."""
    mx = np.abs(x[base])
    for i in range(1, n):
        a = np.abs(x[base + i])
        mx = mx if mx > a else a
    scl[lane] = mx
    best[lane] = -FLT_MAX
    code[lane] = -1
    sorted_ok = _sort(x, base, n, order, lane, rank)
    live[lane] = sorted_ok and not (mx < eps)
    if not sorted_ok:  # a NaN: no prefix sums to speak of, never accepted (see _sort)
        for j in range(n):
            order[lane, j] = j


@njit(inline="always", **JIT)
def _scratch(n):
    """The buffers both kernels use, for sub-blocks of n: weight [BATCH, 256], the sort's order [NLANES, n]
    and rank [n], the search state per lane (live, best, scale, code), the levels L [n], the shift codes
    [256/n] and a group's x and w for the neighbour scan [16]."""
    return (np.empty((BATCH, 256), np.float32), np.empty((NLANES, n), np.int64), np.empty(n, np.int64),
            np.empty(NLANES, np.bool_), np.empty(NLANES, np.float32), np.empty(NLANES, np.float32),
            np.empty(NLANES, np.int32), np.empty(n, np.float32), np.empty(256 // n, np.int64),
            np.empty(16, np.float32))


@njit(inline="always", **JIT)
def _batch_start(blocks, qw, nbr, use_qw, b0, nbat, n, eps, weight, live, scl, best, code, order, rank):
    """The weights of BATCH super-blocks from b0 on and the start of the split search of each of their
    sub-blocks of n (lane = (256/n)*block + sub-block)."""
    nsub = 256 // n
    for h in range(nbat):
        x = blocks[b0 + h]
        _weights(x, qw, ((b0 + h) % nbr) * 256, use_qw, weight[h])
        for ib in range(nsub):
            _lane_start(x, n * ib, n, eps, nsub * h + ib, live, scl, best, code, order, rank)


@njit(inline="always", **JIT)
def _prefix_s(blocks, weight, b0, nbat, order, sx, sw):
    """IQ1_S: the prefix sums of w*x and w over each sub-block's sorted order [position, lane]."""
    for lane in range(8 * nbat):
        x = blocks[b0 + lane // 8]
        wt = weight[lane // 8]
        base = 32 * (lane % 8)
        sx[0, lane] = F0
        sw[0, lane] = F0
        for j in range(32):
            i = base + order[lane, j]
            sx[j + 1, lane] = sx[j, lane] + wt[i] * x[i]
            sw[j + 1, lane] = sw[j, lane] + wt[i]


@njit(inline="always", **JIT)
def _prefix_m(blocks, weight, b0, nbat, order, px, pw):
    """IQ1_M: the same per half (group) of the sub-block [half, position, lane]: a position adds to its
    own half's sums and carries the other's."""
    for lane in range(16 * nbat):
        x = blocks[b0 + lane // 16]
        wt = weight[lane // 16]
        base = 16 * (lane % 16)
        for hh in range(2):
            px[hh, 0, lane] = F0
            pw[hh, 0, lane] = F0
        for j in range(16):
            e = order[lane, j]
            i = base + e
            hh = 0 if e < 8 else 1
            px[hh, j + 1, lane] = px[hh, j, lane] + wt[i] * x[i]
            px[1 - hh, j + 1, lane] = px[1 - hh, j, lane]
            pw[hh, j + 1, lane] = pw[hh, j, lane] + wt[i]
            pw[1 - hh, j + 1, lane] = pw[1 - hh, j, lane]


@njit(inline="always", **JIT)
def _put_s(o, ib, gi):
    """IQ1_S sub-block ib's four grid indices: low bytes in qs, the high 3 bits in its qh word."""
    hq = 0
    for k in range(4):
        o[2 + 4 * ib + k] = np.uint8(gi[k] & 255)
        hq |= (gi[k] >> 8) << (3 * k)
    o[34 + 2 * ib] = np.uint8(hq & 255)
    o[35 + 2 * ib] = np.uint8(hq >> 8)


@njit(inline="always", **JIT)
def _put_m(o, ib, gi):
    """IQ1_M sub-block ib's two grid indices: low bytes in qs, the high 3 bits in the qh nibbles."""
    o[2 * ib] = np.uint8(gi[0] & 255)
    o[2 * ib + 1] = np.uint8(gi[1] & 255)
    o[32 + ib] = np.uint8((gi[0] >> 8) | ((gi[1] >> 8) << 4))


@njit(inline="always", **JIT)
def _scales_s(out, b, scl, lane0, bk, max_scale):
    """IQ1_S's fp16 d (max_scale/15, fudged) and the sub-blocks' 3-bit scales with their shift bit."""
    o = out[b]
    d = max_scale / F15
    put_u16(out, b, 0, fp32_to_fp16(d * FUDGE_S))
    inv = F1 / d
    for ib in range(8):
        ls = np.int32(odd_level(inv * scl[lane0 + ib], F7))
        if bk[ib] == 3:  # shifted down
            ls |= 8
        o[35 + 2 * ib] = np.uint8(o[35 + 2 * ib] | (ls << 4))


@njit(inline="always", **JIT)
def _scales_m(o, x, wt, scl, lane0, bk, gidx, levels, max_scale):
    """IQ1_M's 3-bit sub-block scales and shift bits, and its super-scale refit over all 256 weights (zero
    sub-blocks included: grid point 0, X_P) whose fp16 is spread over the top nibbles of the scale words."""
    d = max_scale / F15
    inv = F1 / d
    sumqx = F0
    sumq2 = F0
    sc = 0
    for ib in range(16):
        ls = np.int32(odd_level(inv * scl[lane0 + ib], F7))
        sc |= np.int64(ls) << (16 * (ib // 4) + 3 * (ib % 4))
        o[32 + ib] = np.uint8(o[32 + ib] | MASKS[bk[ib]])
        fl = np.float32(2 * ls + 1)
        for k in range(2):
            xx0 = _xx0(bk[ib], k)
            gi = gidx[ib, k]
            for j in range(8):
                e = 16 * ib + 8 * k + j
                w = wt[e]
                q = (xx0 + levels[gi, j]) * fl
                sumqx = sumqx + (w * q) * x[e]
                sumq2 = sumq2 + (w * q) * q
    if sumq2 > F0:
        d = sumqx / sumq2
    hd = np.int64(fp32_to_fp16(d * FUDGE_M))
    for j in range(4):  # nibble j of the fp16 in the top nibble of scale word j
        sc |= ((hd >> (4 * j)) & 15) << (16 * j + 12)
    for j in range(8):
        o[48 + j] = np.uint8((sc >> (8 * j)) & 255)


@njit(inline="always", **JIT)
def _kernel(blocks, qw, nbr, out, use_qw, m, kmap, start, count, lev, idx, levels):
    """quantize_iq1_s (m False: sub-blocks of 32, out [nblocks, 50]) / quantize_iq1_m (m True: of 16, out
    [nblocks, 56]), BATCH super-blocks per split search. Returns -1, or the first block on which ggml aborts
    (inf/NaN weights). Inlined into kernel_s and kernel_m, so that m and the sub-block size are constants
    there (IQ1_M's sort and settling loops ran ~8% slower over a run-time size)."""
    n = 16 if m else 32
    nsub = 256 // n
    weight, order, rank, live, best, scl, code, L, bk, g = _scratch(n)
    sx = np.empty((33, NLANES), np.float32)  # IQ1_S prefix sums [position, lane = 8*block + sub-block]
    sw = np.empty((33, NLANES), np.float32)
    px = np.empty((2, 17, NLANES), np.float32)  # IQ1_M per-half prefix sums [half, position, lane]
    pw = np.empty((2, 17, NLANES), np.float32)
    gidx = np.empty((16, 4), np.int32)  # grid index of each group [sub-block, group]
    nb = blocks.shape[0]
    for b0 in range(0, nb, BATCH):
        nbat = min(BATCH, nb - b0)
        eps = EPS_M if m else EPS_S
        _batch_start(blocks, qw, nbr, use_qw, b0, nbat, n, eps, weight, live, scl, best, code, order, rank)
        if m:
            _prefix_m(blocks, weight, b0, nbat, order, px, pw)
            _splits_m(px, pw, best, scl, code, 16 * nbat)
        else:
            _prefix_s(blocks, weight, b0, nbat, order, sx, sw)
            _splits_s(sx, sw, best, scl, code, 8 * nbat)
        for h in range(nbat):
            b = b0 + h
            x = blocks[b]
            o = out[b]
            o[:] = 0
            max_scale = F0
            for ib in range(nsub):
                lane = nsub * h + ib
                gidx[ib, :] = 0
                bk[ib] = 0
                if not live[lane] or code[lane] < 0:
                    scl[lane] = F0
                    continue
                scale, bk[ib], ok = _settle(lane, code, scl, order, n, x, weight[h], n * ib, L, gidx[ib],
                                            kmap, start, count, lev, idx, levels, g)
                if not ok:
                    return b
                if m:
                    _put_m(o, ib, gidx[ib])
                else:
                    _put_s(o, ib, gidx[ib])
                scl[lane] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:  # d and the scale bits stay 0 (IQ1_M: no shift bits); the indices stay
                continue
            if m:
                _scales_m(o, x, weight[h], scl, nsub * h, bk, gidx, levels, max_scale)
            else:
                _scales_s(out, b, scl, nsub * h, bk, max_scale)
    return -1


@njit(**JIT)
def kernel_s(blocks, qw, nbr, out, kmap, start, count, lev, idx, levels):
    """quantize_iq1_s (always with an imatrix), see _kernel."""
    return _kernel(blocks, qw, nbr, out, True, False, kmap, start, count, lev, idx, levels)


@njit(**JIT)
def kernel_m(blocks, qw, nbr, out, use_qw, kmap, start, count, lev, idx, levels):
    """quantize_iq1_m, see _kernel."""
    return _kernel(blocks, qw, nbr, out, use_qw, True, kmap, start, count, lev, idx, levels)


def iq1_s(blocks, qw, nbr, out, use_qw):
    """IQ1_S in ggml_fast's calling convention; BadInput where ggml aborts (no imatrix, inf/NaN weights)."""
    if not use_qw:
        raise missing_imatrix("IQ1_S")
    if kernel_s(blocks, qw, nbr, out, *tables()) >= 0:
        raise search_failed("IQ1_S")


def iq1_m(blocks, qw, nbr, out, use_qw):
    """IQ1_M in ggml_fast's calling convention; BadInput where ggml aborts (inf/NaN weights)."""
    if kernel_m(blocks, qw, nbr, out, use_qw, *tables()) >= 0:
        raise search_failed("IQ1_M")

