"""Kernels for IQ3_XXS and IQ3_S (256-weight super-blocks of eight 32-weight sub-blocks, 4-weight groups).

Literal float32 ports of quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl (ggml-quants.c:3938, :4169),
with or without an imatrix; the spec is qconvert.kernels.ggml.iq3. One sub-block at a time, with the
trial scales of its candidate loop side by side as lanes: the trials are independent until the
(sequential, cheap) accept chain, so rounding, keys and the two 32-term sums vectorize over trials while
each trial keeps C's order of operations. Only the off-grid neighbour scans stay scalar.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ..ggml import iq3 as _spec
from ..ggml.grids import search_failed
from ._core import F0, F1, F7, F15, F31, JIT, fp32_to_fp16, odd_level, put_u16
from ._grids import (
    FLT_MAX,
    accept_trials,
    best_neighbour,
    count_off,
    flat_tables,
    positive_scale,
    refit_scale,
    round_trials,
    search_scratch,
    start_trials,
    sub_start,
    superblock,
    trial_sums,
)

F_FIFTH = np.float32(0.2)
EPS_XXS = np.float32(1e-8)
FUDGE_XXS = np.float32(1.0125)
FUDGE_S = np.float32(1.033)
G32 = np.repeat(np.arange(1, 16, 2, dtype=np.float32)[None], 4, axis=0).reshape(-1)  # odd level of row 8i+l


@functools.cache
def tables(is_s: bool) -> tuple[np.ndarray, ...]:
    """Kernel tables of the 512-point (IQ3_S) or 256-point (IQ3_XXS) grid: ggml's (kmap, neighbours, coords,
    levels) and ``rows`` int32 [4*len(neighbours)]: for list entry j, rows[4j+i] = 8*i + l_i is where the
    term of its coordinate i sits in the kernel's per-trial term table."""
    kmap, neigh, coords, levels = flat_tables(_spec.tables(512 if is_s else 256))
    rows = (8 * np.arange(4) + levels[neigh].astype(np.int32)).astype(np.int32)  # count slots: unused
    return kmap, neigh, coords, levels, rows.reshape(-1)


@njit(inline="always", **JIT)
def _key(lev, row, t):
    """Packed 12-bit key of the group whose levels are lev[row .. row+3, t]."""
    return (np.int32(lev[row, t]) | (np.int32(lev[row + 1, t]) << 3) | (np.int32(lev[row + 2, t]) << 6)
            | (np.int32(lev[row + 3, t]) << 9))


@njit(**JIT)
def iq3(blocks, qw, nbr, out, use_qw, is_s, kmap, neigh, coords, levels, rows):
    """quantize_iq3_xxs (is_s False) / quantize_iq3_s (True): blocks [nblocks, 256] -> out [nblocks, 98|110].

    qw: the imatrix row (block b uses columns of b % nbr). Returns -1, or the first block on which ggml
    aborts (no neighbour score below FLT_MAX: inf/NaN weights)."""
    ntr = 19 if is_s else 31
    lo = -9 if is_s else -15
    weight, waux, xval, wx, L, lev, ong, flags, bsig, idt, tsc, sqx, sq2 = search_scratch()
    scales = np.empty(8, np.float32)
    terms = np.empty(32, np.float32)  # neighbour-score term of coordinate i at level l: [8*i + l]
    gx = np.empty(32, np.float32)
    gw = np.empty(32, np.float32)
    for b in range(blocks.shape[0]):
        x, o, qoff, sigma2 = superblock(blocks, out, b, nbr, True)
        max_scale = F0
        slot = 0  # IQ3_S: qs / signs pointer, not advanced by exactly-zero sub-blocks
        for ib in range(8):
            mx = sub_start(x, qw, qoff, 32 * ib, 32, use_qw, sigma2, False, not is_s, weight, waux, xval,
                           bsig)
            if (mx == F0) if is_s else (mx < EPS_XXS):
                scales[ib] = F0
                continue
            scale = mx / F15
            for k in range(8):
                flags[k] = not is_s
            for i in range(32):
                L[i] = F0  # kept when no trial is accepted
                wx[i] = weight[i] * xval[i]
            start_trials(idt, tsc, sqx, sq2, ntr, F15, lo, F_FIFTH, mx)
            round_trials(lev, idt, xval, 32, ntr, F7)
            for k in range(8):
                # iq3_find_best_neighbour scores Σ_i (waux_i*diff)*diff, diff = s*g - xval_i, and g is one of
                # 8 odd levels: the 32 possible terms are computed once per trial, in C's operations, and a
                # candidate's score is the sum of its four terms in C's order, which gives C's bits.
                for r in range(32):
                    gx[r] = xval[4 * k + r // 8]
                    gw[r] = waux[4 * k + r // 8]
                for t in range(ntr):
                    gi = kmap[_key(lev, 4 * k, t)]
                    ong[k, t] = gi >= 0
                    if gi >= 0:
                        continue
                    s = tsc[t]
                    for r in range(32):
                        diff = s * G32[r] - gx[r]
                        terms[r] = (gw[r] * diff) * diff
                    at = -gi - 1
                    best_d2 = FLT_MAX
                    gi = -1
                    for j in range(at + 1, at + 1 + neigh[at]):
                        d2 = F0 + terms[rows[4 * j]]
                        d2 = d2 + terms[rows[4 * j + 1]]
                        d2 = d2 + terms[rows[4 * j + 2]]
                        d2 = d2 + terms[rows[4 * j + 3]]
                        c = neigh[j]
                        lt = d2 < best_d2
                        best_d2 = d2 if lt else best_d2
                        gi = c if lt else gi
                    if gi < 0:
                        return b
                    for i in range(4):
                        lev[4 * k + i, t] = levels[gi, i]
            trial_sums(lev, weight, wx, sqx, sq2, 32, ntr)
            scale = accept_trials(sqx, sq2, ntr, lev, ong, 32, 8, scale, L, flags)
            if count_off(flags, 8) > 0 and scale > F0:
                inv = F1 / scale
                for k in range(8):
                    if flags[k] and not is_s:
                        continue
                    u = 0
                    for i in range(4):
                        lv = odd_level(inv * xval[4 * k + i], F7)
                        L[4 * k + i] = lv
                        u |= np.int32(lv) << (3 * i)
                    gi = kmap[u]
                    if gi < 0:
                        gi = best_neighbour(neigh, -gi - 1, coords, xval, waux, 4 * k, scale, 4)
                        if gi < 0:
                            return b
                        for i in range(4):
                            L[4 * k + i] = levels[gi, i]
                scale = refit_scale(weight, xval, L, 32, scale)
            scale = positive_scale(scale, bsig, 4, 255 if is_s else 127)
            for k in range(8):
                gi = kmap[np.int32(L[4 * k]) | (np.int32(L[4 * k + 1]) << 3) | (np.int32(L[4 * k + 2]) << 6)
                          | (np.int32(L[4 * k + 3]) << 9)]
                if is_s:
                    o[2 + 8 * slot + k] = np.uint8(gi & 255)
                    o[66 + ib] = np.uint8(o[66 + ib] | ((gi >> 8) << k))
                else:
                    o[2 + 8 * ib + k] = np.uint8(gi)
            if is_s:
                for r in range(4):
                    o[74 + 4 * slot + r] = np.uint8(bsig[r])
                slot += 1
            else:
                word = bsig[0] | (bsig[1] << 7) | (bsig[2] << 14) | (bsig[3] << 21)
                for j in range(4):
                    o[66 + 4 * ib + j] = np.uint8((word >> (8 * j)) & 255)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F0:
            if not is_s:  # IQ3_XXS clears every data byte; IQ3_S keeps what it wrote
                o[:] = 0
            continue
        d = max_scale / F31
        put_u16(out, b, 0, fp32_to_fp16(d * (FUDGE_S if is_s else FUDGE_XXS)))
        inv = F1 / d
        for ib in range(8):
            ls = np.int32(odd_level(inv * scales[ib], F15))
            if is_s:
                o[106 + ib // 2] = np.uint8(o[106 + ib // 2] | (ls << (4 * (ib % 2))))
            else:
                o[66 + 4 * ib + 3] = np.uint8(o[66 + 4 * ib + 3] | (ls << 4))
    return -1


def _twin(is_s: bool):
    """The IQ3_XXS / IQ3_S twin in ggml_fast's calling convention; inputs ggml aborts on are BadInput."""
    name = "IQ3_S" if is_s else "IQ3_XXS"

    def twin(blocks, qw, nbr, out, use_qw):
        if iq3(blocks, qw, nbr, out, use_qw, is_s, *tables(is_s)) >= 0:
            raise search_failed(name)

    return twin


iq3_xxs = _twin(False)
iq3_s = _twin(True)
