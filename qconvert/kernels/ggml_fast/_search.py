"""Lane versions of ggml's scale searches (make_qkx2/3, make_qx, make_qp, make_q3 in ggml-quants.c).

Each function runs the C algorithm for NL independent sub-blocks at once. Data live in one float32 scratch
buffer S[row, lane]: rows [xr, xr+n) hold x, [wr, wr+n) the weights, the result levels go to [lr, lr+n)
and per-lane state to rows from `tr` on (one buffer: separate arrays made LLVM add alias checks and stay
scalar). Within a lane the float32 operations happen in the same order as in C; branches become selects.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._core import F0, F1, F_EPS, F_TENTH, JIT, NL, clampf, lane_absmax, nearest_int, wrap_u8

# state rows relative to `tr`
MN, MX, SW, SX, SCALE, BEST, BI, BM, DEG, ISC, SL, SL2, SXL, D, CHG, AUX = range(16)
NSTATE = AUX  # the level scratch of n rows starts at tr + AUX


@njit(**JIT)
def make_qkx(S, n, nmax, rmin, rdelta, nstep, use_mad, xr, wr, lr, tr, scale_row, min_row):
    """make_qkx2_quants / make_qkx3_quants (with weights): asymmetric scale+min search.

    Writes scale to S[scale_row], the_min (= -min) to S[min_row] and the levels to S[lr:lr+n]."""
    for k in range(NL):
        x0 = S[xr, k]
        w0 = S[wr, k]
        S[tr + MN, k] = x0
        S[tr + MX, k] = x0
        S[tr + SW, k] = w0
        S[tr + SX, k] = w0 * x0
    for i in range(1, n):
        for k in range(NL):
            x = S[xr + i, k]
            w = S[wr + i, k]
            mn = S[tr + MN, k]
            mx = S[tr + MX, k]
            S[tr + MN, k] = x if x < mn else mn
            S[tr + MX, k] = x if x > mx else mx
            S[tr + SW, k] = S[tr + SW, k] + w
            S[tr + SX, k] = S[tr + SX, k] + w * x
    for k in range(NL):
        mn = S[tr + MN, k]
        mn = F0 if mn > F0 else mn
        S[tr + MN, k] = mn
        mx = S[tr + MX, k]
        # qkx2 tests max == min, qkx3 max <= min: identical since min <= max (and both false on NaN)
        S[tr + DEG, k] = F1 if mx == mn else F0
        iscale = nmax / (mx - mn)
        S[tr + ISC, k] = iscale
        S[tr + SCALE, k] = F1 / iscale
        S[tr + BI, k] = iscale
        S[tr + BM, k] = mn
        S[tr + BEST, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            mn = S[tr + MN, k]
            lv = clampf(nearest_int(S[tr + ISC, k] * (x - mn)), F0, nmax)
            diff = S[tr + SCALE, k] * lv + mn - x
            diff = np.abs(diff) if use_mad else diff * diff
            S[tr + BEST, k] = S[tr + BEST, k] + S[wr + i, k] * diff
    for step in range(nstep + 1):
        fstep = np.float32(step)
        for k in range(NL):
            S[tr + ISC, k] = (rmin + rdelta * fstep + nmax) / (S[tr + MX, k] - S[tr + MN, k])
            S[tr + SL, k] = F0
            S[tr + SL2, k] = F0
            S[tr + SXL, k] = F0
        for i in range(n):
            for k in range(NL):
                x = S[xr + i, k]
                lv = clampf(nearest_int(S[tr + ISC, k] * (x - S[tr + MN, k])), F0, nmax)
                S[tr + AUX + i, k] = lv
                wl = S[wr + i, k] * lv
                S[tr + SL, k] = S[tr + SL, k] + wl
                S[tr + SL2, k] = S[tr + SL2, k] + wl * lv
                S[tr + SXL, k] = S[tr + SXL, k] + wl * x
        for k in range(NL):
            sw = S[tr + SW, k]
            sx = S[tr + SX, k]
            sl = S[tr + SL, k]
            sl2 = S[tr + SL2, k]
            sxl = S[tr + SXL, k]
            dd = sw * sl2 - sl * sl
            this_scale = (sw * sxl - sx * sl) / dd
            this_min = (sl2 * sx - sl * sxl) / dd
            if this_min > F0:
                this_min = F0
                this_scale = sxl / sl2
            S[tr + D, k] = dd
            S[tr + SL, k] = this_scale  # reuse rows: SL = this_scale, SL2 = this_min, SXL = error
            S[tr + SL2, k] = this_min
            S[tr + SXL, k] = F0
        for i in range(n):
            for k in range(NL):
                diff = S[tr + SL, k] * S[tr + AUX + i, k] + S[tr + SL2, k] - S[xr + i, k]
                diff = np.abs(diff) if use_mad else diff * diff
                S[tr + SXL, k] = S[tr + SXL, k] + S[wr + i, k] * diff
        for k in range(NL):
            cur = S[tr + SXL, k]
            if S[tr + D, k] > F0 and cur < S[tr + BEST, k]:
                S[tr + BEST, k] = cur
                S[tr + SCALE, k] = S[tr + SL, k]
                S[tr + BI, k] = S[tr + ISC, k]
                S[tr + BM, k] = S[tr + MN, k]
                S[tr + MN, k] = S[tr + SL2, k]
    # the levels are a pure function of the accepted (iscale, min): rebuild them once
    for i in range(n):
        for k in range(NL):
            lv = clampf(nearest_int(S[tr + BI, k] * (S[xr + i, k] - S[tr + BM, k])), F0, nmax)
            S[lr + i, k] = F0 if S[tr + DEG, k] != F0 else lv
    for k in range(NL):
        deg = S[tr + DEG, k] != F0
        S[scale_row, k] = F0 if deg else S[tr + SCALE, k]
        S[min_row, k] = -S[tr + MN, k]


@njit(inline="always", **JIT)
def _sym_sums(S, n, xr, wr, tr, lo, hi):
    """sumlx = Σ w*x*l and suml2 = Σ w*l*l (rows SL, SL2) with l = clamp(nearest_int(iscale*x), lo, hi),
    iscale from row ISC: make_qx_quants' sums for one candidate scale."""
    for k in range(NL):
        S[tr + SL, k] = F0
        S[tr + SL2, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            lv = clampf(nearest_int(S[tr + ISC, k] * x), lo, hi)
            w = S[wr + i, k]
            S[tr + SL, k] = S[tr + SL, k] + w * x * lv
            S[tr + SL2, k] = S[tr + SL2, k] + w * lv * lv


@njit(inline="always", **JIT)
def _any_changed(S, tr):
    """Whether a coordinate-descent sweep changed a level in some lane (row CHG). A lane whose sweep changed
    nothing would change nothing again: stopping it (C) == running it, so the sweeps end when none did."""
    changed = F0
    for k in range(NL):
        changed += S[tr + CHG, k]
    return changed != F0


@njit(**JIT)
def make_qx(S, n, nmax, xr, wr, lr, tr, scale_row):
    """make_qx_quants with rmse_type 1 and explicit weights (x*x is passed as weights when qw is NULL).

    Levels (l + nmax, or 0 for an all-zero group) go to S[lr:lr+n], the scale to S[scale_row]."""
    fn = np.float32(nmax)
    lo = -fn
    hi = fn - F1
    lane_absmax(S, xr, n, tr + MN, tr + MX)  # amax, max (signed)
    for k in range(NL):
        S[tr + DEG, k] = F1 if S[tr + MN, k] < F_EPS else F0
        iscale = -fn / S[tr + MX, k]
        S[tr + ISC, k] = iscale
        S[tr + BI, k] = iscale
    _sym_sums(S, n, xr, wr, tr, lo, hi)
    for k in range(NL):
        sumlx = S[tr + SL, k]
        suml2 = S[tr + SL2, k]
        scale = sumlx / suml2 if suml2 != F0 else F0
        S[tr + SCALE, k] = scale
        S[tr + BEST, k] = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        fstep = np.float32(step)
        for k in range(NL):
            S[tr + ISC, k] = -(fn + F_TENTH * fstep) / S[tr + MX, k]
        _sym_sums(S, n, xr, wr, tr, lo, hi)
        for k in range(NL):
            sumlx = S[tr + SL, k]
            suml2 = S[tr + SL2, k]
            if suml2 > F0 and sumlx * sumlx > S[tr + BEST, k] * suml2:
                scale = sumlx / suml2
                S[tr + SCALE, k] = scale
                S[tr + BEST, k] = scale * sumlx
                S[tr + BI, k] = S[tr + ISC, k]
    for i in range(n):
        for k in range(NL):
            lv = clampf(nearest_int(S[tr + BI, k] * S[xr + i, k]), lo, hi) + fn
            S[lr + i, k] = F0 if S[tr + DEG, k] != F0 else lv
    for k in range(NL):
        S[scale_row, k] = F0 if S[tr + DEG, k] != F0 else S[tr + SCALE, k]


@njit(**JIT)
def make_qp(S, n, nmax, xr, wr, lr, tr, scale_row):
    """make_qp_quants: quantize non-negative values (sub-block scales or mins) with weights.

    Levels are stored as the uint8_t C keeps (wrapped); the scale goes to S[scale_row]."""
    fn = np.float32(nmax)
    for k in range(NL):
        S[tr + MX, k] = F0
    for i in range(n):
        for k in range(NL):
            mx = S[tr + MX, k]
            x = S[xr + i, k]
            S[tr + MX, k] = mx if mx > x else x
    for k in range(NL):
        mx = S[tr + MX, k]
        S[tr + DEG, k] = F1 if mx < F_EPS else F0
        iscale = fn / mx
        S[tr + ISC, k] = iscale
        S[tr + SCALE, k] = F1 / iscale
        S[tr + BEST, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            lv = wrap_u8(nearest_int(S[tr + ISC, k] * x))
            diff = x - S[tr + SCALE, k] * lv
            S[tr + BEST, k] = S[tr + BEST, k] + S[wr + i, k] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        fstep = np.float32(step)
        for k in range(NL):
            iscale_is = (F_TENTH * fstep + fn) / S[tr + MX, k]
            S[tr + BI, k] = iscale_is
            S[tr + SL, k] = F1 / iscale_is
            S[tr + SL2, k] = F0
        for i in range(n):
            for k in range(NL):
                x = S[xr + i, k]
                lv = nearest_int(S[tr + BI, k] * x)
                lv = fn if fn < lv else lv
                diff = x - S[tr + SL, k] * lv
                S[tr + SL2, k] = S[tr + SL2, k] + S[wr + i, k] * diff * diff
        for k in range(NL):
            if S[tr + SL2, k] < S[tr + BEST, k]:
                S[tr + BEST, k] = S[tr + SL2, k]
                S[tr + ISC, k] = S[tr + BI, k]
    for k in range(NL):
        S[tr + SL, k] = F0
        S[tr + SL2, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            lv = nearest_int(S[tr + ISC, k] * x)
            lv = fn if fn < lv else lv
            S[lr + i, k] = wrap_u8(lv)
            w = S[wr + i, k]
            S[tr + SL, k] = S[tr + SL, k] + w * x * lv
            S[tr + SL2, k] = S[tr + SL2, k] + w * lv * lv
    for _ in range(5):
        for k in range(NL):
            S[tr + CHG, k] = F0
        for i in range(n):
            for k in range(NL):
                x = S[xr + i, k]
                w = S[wr + i, k]
                li = S[lr + i, k]
                sumlx = S[tr + SL, k]
                suml2 = S[tr + SL2, k]
                slx0 = sumlx - w * x * li
                sl20 = suml2 - w * li * li
                new_l = nearest_int(x * sl20 / slx0)
                new_l = fn if fn < new_l else new_l
                slx = slx0 + w * x * new_l
                sl2 = sl20 + w * new_l * new_l
                take = (slx0 > F0) & (sl20 > F0) & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                S[lr + i, k] = wrap_u8(new_l) if take else li
                S[tr + SL, k] = slx if take else sumlx
                S[tr + SL2, k] = sl2 if take else suml2
                S[tr + CHG, k] = F1 if take else S[tr + CHG, k]
        if not _any_changed(S, tr):
            break
    for k in range(NL):
        deg = S[tr + DEG, k] != F0
        suml2 = S[tr + SL2, k]
        scale = S[tr + SL, k] / suml2 if suml2 > F0 else F0
        S[scale_row, k] = F0 if deg else scale
    for i in range(n):
        for k in range(NL):
            if S[tr + DEG, k] != F0:
                S[lr + i, k] = F0


@njit(**JIT)
def make_q3(S, n, nmax, xr, lr, tr, scale_row):
    """make_q3_quants with do_rmse (weights x*x, coordinate descent). Levels l + nmax (0 for all-zero)."""
    fn = np.float32(nmax)
    lo = -fn
    hi = fn - F1
    lane_absmax(S, xr, n, tr + MN, tr + MX)
    for k in range(NL):
        S[tr + DEG, k] = F1 if S[tr + MN, k] < F_EPS else F0
        S[tr + ISC, k] = -fn / S[tr + MX, k]
        S[tr + SL, k] = F0
        S[tr + SL2, k] = F0
    for i in range(n):
        for k in range(NL):
            x = S[xr + i, k]
            lv = clampf(nearest_int(S[tr + ISC, k] * x), lo, hi)
            S[lr + i, k] = lv
            w = x * x
            S[tr + SL, k] = S[tr + SL, k] + w * x * lv
            S[tr + SL2, k] = S[tr + SL2, k] + w * lv * lv
    for _ in range(5):
        for k in range(NL):
            S[tr + CHG, k] = F0
        for i in range(n):
            for k in range(NL):
                x = S[xr + i, k]
                w = x * x
                li = S[lr + i, k]
                sumlx = S[tr + SL, k]
                suml2 = S[tr + SL2, k]
                slx = sumlx - w * x * li
                if slx > F0:  # branches measured faster than selects here (most lanes converge early)
                    sl2 = suml2 - w * li * li
                    new_l = clampf(nearest_int(x * sl2 / slx), lo, hi)
                    if new_l != li:
                        slx = slx + w * x * new_l
                        sl2 = sl2 + w * new_l * new_l
                        if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            S[lr + i, k] = new_l
                            S[tr + SL, k] = slx
                            S[tr + SL2, k] = sl2
                            S[tr + CHG, k] = F1
        if not _any_changed(S, tr):
            break
    for i in range(n):
        for k in range(NL):
            S[lr + i, k] = F0 if S[tr + DEG, k] != F0 else S[lr + i, k] + fn
    for k in range(NL):
        suml2 = S[tr + SL2, k]
        scale = S[tr + SL, k] / suml2 if suml2 > F0 else F0
        S[scale_row, k] = F0 if S[tr + DEG, k] != F0 else scale
