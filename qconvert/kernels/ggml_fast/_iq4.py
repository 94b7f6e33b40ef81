"""Lane kernel for IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks).

Port of quantize_row_iq4_nl_impl with ntry = 7, the call quantize_iq4_nl / quantize_iq4_xs make (with or
without an imatrix; without one the weights are x*x). Lanes are (super-)blocks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._core import (
    F0,
    F1,
    F_EPS,
    JIT,
    NL,
    clampf,
    fp32_to_fp16,
    lane_absmax,
    lane_sumsq,
    live_lanes,
    load_lanes,
    nearest_int,
    put_u16,
)

KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
NTRY = 7

X = 0
QW = 256
W = 512
L = 544
SC = 800
SIG, AMAX, MAXV, SQX, SQ2, DD, BEST, ID, AMS, MXS, DBLK = range(808, 819)
NROWS = 820


@njit(inline="always", **JIT)
def best_index(al):
    """best_index_int8 over kvalues_iq4nl: the binary search's answer, written without branches on lanes.

    Between the ends, the search stops at mu = 1 + #{i in 1..14 : !(al < v[i])} (also right for NaN: 15)."""
    if al <= KV[0]:
        return 0
    if al >= KV[15]:
        return 15
    mu = 1
    for i in range(1, 15):
        if not (al < KV[i]):
            mu += 1
    return mu - 1 if al - KV[mu - 1] < KV[mu] - al else mu


@njit(**JIT)
def _sums(S, xr, n, idrow):
    """sumqx, sumq2 for levels best_index(id*x) of each lane."""
    for k in range(NL):
        S[SQX, k] = F0
        S[SQ2, k] = F0
    for j in range(n):
        for k in range(NL):
            x = S[xr + j, k]
            q = KV[best_index(S[idrow, k] * x)]
            wq = S[W + j, k] * q
            S[SQX, k] = S[SQX, k] + wq * x
            S[SQ2, k] = S[SQ2, k] + wq * q


@njit(**JIT)
def iq4(blocks, qw, nbr, out, xs, use_qw):
    """quantize_iq4_nl (xs False, 32-weight blocks) / quantize_iq4_xs (xs True, 256-weight super-blocks)."""
    sbs = blocks.shape[1]
    nsub = sbs // 32
    S = np.empty((NROWS, NL), np.float32)
    lsc = np.zeros((NL, 8), np.int32)
    two_over = np.float32(2.0) / np.float32(sbs)
    for b0 in range(0, blocks.shape[0], NL):
        load_lanes(blocks, b0, S, X)
        if use_qw:
            for k in range(NL):
                off = ((b0 + k) % nbr) * sbs
                for e in range(sbs):
                    S[QW + e, k] = qw[off + e]
        lane_sumsq(S, X, sbs, SIG)
        for k in range(NL):
            S[SIG, k] = S[SIG, k] * two_over
        for ib in range(nsub):
            xr = X + 32 * ib
            for j in range(32):
                for k in range(NL):
                    x = S[xr + j, k]
                    if use_qw:
                        S[W + j, k] = S[QW + 32 * ib + j, k] * np.sqrt(S[SIG, k] + x * x)
                    else:
                        S[W + j, k] = x * x
            lane_absmax(S, xr, 32, AMAX, MAXV)
            for k in range(NL):
                d = -S[MAXV, k] / KV[0]
                S[ID, k] = F1 / d
            _sums(S, xr, 32, ID)
            for k in range(NL):
                sumq2 = S[SQ2, k]
                d = S[SQX, k] / sumq2 if sumq2 > F0 else F0
                S[DD, k] = d
                S[BEST, k] = d * S[SQX, k]
            for itry in range(-NTRY, NTRY + 1):
                for k in range(NL):
                    S[ID, k] = (np.float32(itry) + KV[0]) / S[MAXV, k]
                _sums(S, xr, 32, ID)
                for k in range(NL):
                    sumqx = S[SQX, k]
                    sumq2 = S[SQ2, k]
                    if sumq2 > F0 and sumqx * sumqx > S[BEST, k] * sumq2:
                        d = sumqx / sumq2
                        S[DD, k] = d
                        S[BEST, k] = d * sumqx
            for k in range(NL):
                S[SC + ib, k] = F0 if S[AMAX, k] < F_EPS else S[DD, k]
        lane_absmax(S, SC, nsub, AMS, MXS)
        if xs:
            for k in range(NL):
                d = -S[MXS, k] / np.float32(32.0)
                S[DBLK, k] = d
                idv = F1 / d if d != F0 else F0
                for ib in range(8):
                    lv = clampf(nearest_int(idv * S[SC + ib, k]), np.float32(-32.0), np.float32(31.0))
                    dl = d * lv
                    S[SC + ib, k] = F1 / dl if dl != F0 else F0  # idl of the sub-block
                    lsc[k, ib] = np.int32(lv) + 32
            for ib in range(8):
                for j in range(32):
                    for k in range(NL):
                        S[L + 32 * ib + j, k] = np.float32(best_index(S[SC + ib, k] * S[X + 32 * ib + j, k]))
        else:
            for k in range(NL):
                s0 = S[SC, k]
                S[DBLK, k] = s0
                S[ID, k] = F1 / s0 if s0 != F0 else F0
            for j in range(32):
                for k in range(NL):
                    S[L + j, k] = np.float32(best_index(S[ID, k] * S[X + j, k]))
        for k in range(live_lanes(out, b0)):
            b = b0 + k
            put_u16(out, b, 0, fp32_to_fp16(S[DBLK, k]))
            qs = 2
            if xs:
                qs = 8
                sh = 0
                for ib in range(8):
                    lv = lsc[k, ib]
                    sh |= (lv >> 4) << (2 * ib)
                    if ib % 2 == 0:
                        out[b, 4 + ib // 2] = np.uint8(lv & 0xF)
                    else:
                        out[b, 4 + ib // 2] = np.uint8(out[b, 4 + ib // 2] | ((lv & 0xF) << 4))
                put_u16(out, b, 2, sh & 0xFFFF)
            for i in range(nsub):
                for j in range(16):
                    lo = np.int32(S[L + 32 * i + j, k])
                    hi = np.int32(S[L + 32 * i + 16 + j, k])
                    out[b, qs + 16 * i + j] = np.uint8(lo | (hi << 4))


def _twin(xs):
    """The IQ4_NL / IQ4_XS twin (ggml_fast's calling convention)."""

    def twin(blocks, qw, nbr, out, use_qw):
        iq4(blocks, qw, nbr, out, xs, use_qw)

    return twin


iq4_nl = _twin(False)
iq4_xs = _twin(True)
