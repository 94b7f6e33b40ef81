"""Kernels for IQ2_XXS, IQ2_XS and IQ2_S (256-weight super-blocks, 8-weight groups on 3 levels).

Literal float32 ports of quantize_row_iq2_xxs_impl / _xs_impl / _s_impl (ggml-quants.c:3294, :3472, :5113)
with or without an imatrix; the spec is qconvert.kernels.ggml.iq2. As in _iq3: one sub-block at a time,
the trial scales of its candidate loop side by side as lanes (rounding, keys and the two sums vectorize
over trials, each keeping C's order of operations), then C's sequential accept chain over the trials.
An off-grid group's neighbour scan (``_grids.scan``) scores its whole list in one vector loop, each entry in
C's operations and summation order. Loops index with unsigned integers where they must vectorize (a
signed index carries numba's wraparound test, which turns loads into gathers).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ..ggml import iq2 as _spec
from ..ggml.grids import search_failed
from ..ggml.helpers import missing_imatrix
from ._core import (
    F0,
    F1,
    F2,
    F4,
    F5,
    F15,
    F31,
    F_TENTH,
    JIT,
    fp32_to_fp16,
    nearest_int,
    odd_level,
    put_u16,
    wrap_u8,
)
from ._grids import (
    NT,
    accept_trials,
    count_off,
    key8,
    load_group,
    positive_scale,
    refit_scale,
    round_trials,
    scan,
    search_scratch,
    soa_tables,
    start_trials,
    sub_start,
    superblock,
    trial_sums,
)

EPS_XXS_XS = np.float32(1e-15)  # GROUP_MAX_EPS
EPS_S = np.float32(1e-8)  # GROUP_MAX_EPS_IQ2_S
FUDGE_S = np.float32(0.9875)
POW4 = np.array([4.0**i for i in range(8)], np.float32)  # key = Σ level_i · 4^i
XXS, XS, S = 0, 1, 2


@functools.cache
def tables(kind: int) -> tuple[np.ndarray, ...]:
    """Kernel tables of IQ2_XXS (kind 0), IQ2_XS (1) or IQ2_S (2): (kmap, start, count, odd, idx, levels):
    _grids.soa_tables with the lists holding each point's odd coordinates 2l+1 (what C multiplies), and
    levels float32 [size, 8]."""
    t = _spec.tables((_spec.T.IQ2_XXS, _spec.T.IQ2_XS, _spec.T.IQ2_S)[kind])
    kmap, start, count, lev, idx = soa_tables(t)
    return kmap, start, count, F2 * lev + F1, idx, t.levels.astype(np.float32)


@njit(**JIT)
def make_qp32(x, w, L):
    """make_qp_quants(32, 4, x, L, w) (ggml-quants.c:1076): the start scale of IQ2_XXS. x may hold the
    flipped -|x| of an odd-parity run, so levels can be negative; they are stored (L) as the uint8 C keeps
    (wrapped) while the sums use the signed value, as in C."""
    nmax = F4
    mx = F0
    for i in range(32):
        mx = mx if mx > x[i] else x[i]
    if mx < EPS_XXS_XS:
        return F0
    iscale = nmax / mx
    for i in range(32):
        L[i] = wrap_u8(nearest_int(iscale * x[i]))
    scale = F1 / iscale
    best_mse = F0
    for i in range(32):
        diff = x[i] - scale * L[i]
        best_mse = best_mse + (w[i] * diff) * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F_TENTH * np.float32(step) + nmax) / mx
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(32):
            lv = nearest_int(iscale_is * x[i])
            lv = nmax if nmax < lv else lv
            diff = x[i] - scale_is * lv
            mse = mse + (w[i] * diff) * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(32):
        lv = nearest_int(iscale * x[i])
        lv = nmax if nmax < lv else lv
        L[i] = wrap_u8(lv)
        sumlx = sumlx + (w[i] * x[i]) * lv
        suml2 = suml2 + (w[i] * lv) * lv
    for _ in range(5):
        changed = False
        for i in range(32):
            wi = w[i]
            xi = x[i]
            li = L[i]
            slx = sumlx - (wi * xi) * li
            sl2 = suml2 - (wi * li) * li
            if slx > F0 and sl2 > F0:
                new_l = nearest_int((xi * sl2) / slx)
                new_l = nmax if nmax < new_l else new_l
                if new_l != li:
                    slx = slx + (wi * xi) * new_l
                    sl2 = sl2 + (wi * new_l) * new_l
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = wrap_u8(new_l)
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > F0 else F0


@njit(**JIT)
def iq2(blocks, qw, nbr, out, use_qw, kind, kmap, start, count, odd, idx, levels):
    """quantize_iq2_xxs (kind 0) / _xs (1) / _s (2): blocks [nblocks, 256] -> out [nblocks, 66|74|82].

    qw: the imatrix row (block b uses columns of b % nbr). Returns -1, or the first block on which ggml
    aborts (no neighbour score below FLT_MAX, or a NaN scale: inf/NaN weights)."""
    sub = 32 if kind == XXS else 16
    ng = sub // 8
    nsb = 256 // sub
    ntr = 13 if kind == XXS else 19
    ntp = 16 if kind == XXS else NT  # trials computed: a multiple of the vector width; past ntr unused
    lo = -6 if kind == XXS else -9
    eps = EPS_S if kind == S else EPS_XXS_XS
    weight, waux, xval, wx, L, lev, ong, flags, bsig, idt, tsc, sqx, sq2 = search_scratch()
    lqp = np.empty(32, np.float32)
    keys = np.empty((4, NT), np.int32)
    gidx = np.empty(4, np.int32)
    scales = np.empty(16, np.float32)
    g = np.empty(16, np.float32)
    for b in range(blocks.shape[0]):
        x, o, qoff, sigma2 = superblock(blocks, out, b, nbr, kind == S)
        max_scale = F0
        for ib in range(nsb):
            mx = sub_start(x, qw, qoff, sub * ib, sub, use_qw, sigma2, True, kind != S, weight, waux, xval,
                           bsig)
            if mx < eps:
                scales[ib] = F0
                continue
            if kind == XXS:
                scale = make_qp32(xval, weight, lqp)
                den = scale * np.float32(3.0)  # eff_max
                if den <= F0:
                    scales[ib] = F0
                    continue
            else:
                den = mx
                scale = mx / F5
            for k in range(ng):
                flags[k] = True
            for i in range(sub):
                L[i] = F0  # kept when no trial is accepted
                wx[i] = weight[i] * xval[i]
            start_trials(idt, tsc, sqx, sq2, ntp, F5, lo, F_TENTH, den)
            round_trials(lev, idt, xval, sub, ntp, F2)
            for k in range(ng):
                uk = np.uint64(k)
                for t in range(ntp):
                    tt = np.uint64(t)
                    u = F0
                    for i in range(8):
                        u = u + lev[np.uint64(8 * k + i), tt] * POW4[i]  # < 2^16: exact in float32
                    keys[uk, tt] = np.int32(u)
                load_group(g, xval, waux, 8 * k)
                for t in range(ntr):
                    u = keys[k, t]
                    gi = kmap[u]
                    ong[k, t] = gi >= 0
                    if gi >= 0:
                        continue
                    gi = scan(start[u], count[u], odd, idx, g, tsc[t], None)
                    if gi < 0:
                        return b
                    for i in range(8):
                        lev[8 * k + i, t] = levels[gi, i]
            trial_sums(lev, weight, wx, sqx, sq2, sub, ntp)
            scale = accept_trials(sqx, sq2, ntr, lev, ong, sub, ng, scale, L, flags)
            if scale > F0 and (kind == XXS or count_off(flags, ng) > 0):
                inv = F1 / scale
                for k in range(ng):
                    if kind != XXS and flags[k]:
                        continue
                    for i in range(8):
                        L[8 * k + i] = odd_level(inv * xval[8 * k + i], F2)
                    u = key8(L, 8 * k)
                    gi = kmap[u]
                    if gi < 0:
                        load_group(g, xval, waux, 8 * k)
                        gi = scan(start[u], count[u], odd, idx, g, scale, None)
                        if gi < 0:
                            return b
                        for i in range(8):
                            L[8 * k + i] = levels[gi, i]
                scale = refit_scale(weight, xval, L, sub, scale)
            scale = positive_scale(scale, bsig, ng, 255 if kind == S else 127)
            if not (scale >= F0):  # GGML_ASSERT(scale >= 0): a NaN scale
                return b
            for k in range(ng):
                gidx[k] = kmap[key8(L, 8 * k)]
            if kind == XXS:
                word = 0
                for k in range(4):
                    o[2 + 8 * ib + k] = np.uint8(gidx[k])
                    word |= bsig[k] << (7 * k)
                for j in range(4):
                    o[6 + 8 * ib + j] = np.uint8((word >> (8 * j)) & 255)
            elif kind == XS:
                for k in range(2):
                    q = gidx[k] | (bsig[k] << 9)
                    o[2 + 2 * (2 * ib + k)] = np.uint8(q & 255)
                    o[3 + 2 * (2 * ib + k)] = np.uint8((q >> 8) & 255)
            else:
                for k in range(2):
                    gg = 2 * ib + k
                    o[2 + gg] = np.uint8(gidx[k] & 255)
                    o[66 + gg // 4] = np.uint8(o[66 + gg // 4] | ((gidx[k] >> 8) << (2 * (gg % 4))))
                    o[34 + gg] = np.uint8(bsig[k])
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if max_scale == F0:
            if kind != S:  # IQ2_XXS / IQ2_XS clear the data; IQ2_S keeps what it wrote
                o[:] = 0
            continue
        d = max_scale / F31
        put_u16(out, b, 0, fp32_to_fp16(d * FUDGE_S if kind == S else d))
        inv = F1 / d
        for ib in range(nsb):
            ls = np.int32(odd_level(inv * scales[ib], F15))
            if kind == XXS:
                o[9 + 8 * ib] = np.uint8(o[9 + 8 * ib] | (ls << 4))
            else:
                at = (66 if kind == XS else 74) + ib // 2
                o[at] = np.uint8(o[at] | (ls << (4 * (ib % 2))))
    return -1


def _twin(kind: int):
    """The IQ2_XXS / IQ2_XS / IQ2_S twin in ggml_fast's calling convention; BadInput where ggml aborts."""
    name = ("IQ2_XXS", "IQ2_XS", "IQ2_S")[kind]

    def twin(blocks, qw, nbr, out, use_qw):
        if not use_qw and kind != S:
            raise missing_imatrix(name)
        if iq2(blocks, qw, nbr, out, use_qw, kind, *tables(kind)) >= 0:
            raise search_failed(name)

    return twin


iq2_xxs = _twin(XXS)
iq2_xs = _twin(XS)
iq2_s = _twin(S)
