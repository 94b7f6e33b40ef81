"""Numba pieces shared by the lattice-grid kernels (IQ1_*, IQ2_*, IQ3_*): the tables in flat arrays,
iq2_find_best_neighbour / iq3_find_best_neighbour / iq1_find_best_neighbour2 (ggml-quants.c:3270, :3914,
:4444; reference/gguf-lowbit.md §2.4), and the steps of the per-sub-block scale search (§2.5-2.6) that
the IQ2 and IQ3 quantizers run alike.

The tables come from qconvert.kernels.ggml.grids.GridTables (built from the grid's definition); here they
are only laid out for the kernels: ``kmap`` int32 (ggml's: index, or -(list offset) - 1), ``neighbours``
int32 (ggml's flat lists: n, then n indices), ``coords`` float32 [size, ncoord] (the odd coordinates 2l+1)
and ``levels`` float32 [size, ncoord] (l itself).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..ggml.grids import GridTables
from ._core import F0, F1, F2, F256, JIT, f32_bits, odd_level

FLT_MAX = np.float32(np.finfo(np.float32).max)
F_QUARTER = np.float32(0.25)


def flat_tables(t: GridTables) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kmap, neighbours, coords, levels) as the kernels take them."""
    return (np.ascontiguousarray(t.kmap, np.int32), t.neighbours.astype(np.int32),
            np.ascontiguousarray(t.coords, np.float32), t.levels.astype(np.float32))


@njit(inline="always", **JIT)
def best_neighbour(neigh, at, coords, xval, waux, off, scale, ncoord):
    """Grid index of the first minimum of Σ (waux*diff)*diff, diff = scale*g - xval (left to right), over
    the list at ``neigh[at]`` (its count) for the group ``xval[off : off+ncoord]``; -1 when no score is
    below FLT_MAX (ggml's GGML_ASSERT: the caller reports it)."""
    best = FLT_MAX
    gi = -1
    for j in range(at + 1, at + 1 + neigh[at]):
        cand = neigh[j]
        d2 = F0
        for i in range(ncoord):
            diff = scale * coords[cand, i] - xval[off + i]
            d2 = d2 + (waux[off + i] * diff) * diff
        if d2 < best:
            best = d2
            gi = cand
    return gi


# ------------------------------------------------------------------------------ 8-coordinate grids (IQ2/IQ1)

PAD = 16  # lists are padded to a multiple of this many entries: the scan's vector loop has no remainder


def soa_tables(t: GridTables) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 3-level, 8-coordinate grids' tables laid out for the list scans: (kmap int32 [kmap_size] as
    ggml's, start int32 [kmap_size], count int32 [kmap_size], lev float32 [8, slots], idx int32 [slots]).

    The list of off-grid key u holds count[u] entries in the slots from start[u] on, padded to a multiple
    of PAD with copies of its first entry (a copy scores like the entry and ranks after it, so a scan may
    run over the padding): idx[slot] is the grid index of the entry (ggml's order) and lev[i, slot] its
    level (0., 1., 2.) of coordinate i, so a scan reads each coordinate contiguously."""
    lists, counts = t.padded
    kmap = np.ascontiguousarray(t.kmap, np.int32)
    npad = -(-counts // PAD) * PAD
    start = np.zeros(kmap.shape, np.int64)
    start[1:] = np.cumsum(npad)[:-1]
    slots = int(npad.sum())
    owner = np.repeat(np.arange(kmap.size), npad)  # the key of each slot
    j = np.arange(slots) - start[owner]
    idx = lists[owner, np.where(j < counts[owner], j, 0)].astype(np.int32)
    lev = np.ascontiguousarray(t.levels[idx].T, dtype=np.float32)
    return kmap, start.astype(np.int32), counts.astype(np.int32), lev, idx


@njit(inline="always", **JIT)
def rank(score, j):
    """The key whose minimum over a list is C's neighbour winner: (bit pattern of the score << 32) | j.

    C keeps the first score with ``d2 < best``, from best = FLT_MAX. The scores are never negative nor -0
    (each term is a non-negative weight times a square, summed from +0), so as uint32 their patterns
    order them as floats, with +inf and NaN (also -NaN, above 0x80000000) above FLT_MAX; ties go to the
    smaller j. One unsigned min reduction, which vectorizes; ``winner`` decodes it."""
    return (np.uint64(np.uint32(f32_bits(score))) << np.uint64(32)) | np.uint64(j)


@njit(inline="always", **JIT)
def winner(best):
    """Position of the winner from the minimum of ``rank`` keys, or -1 if its score is not below FLT_MAX."""
    if (best >> np.uint64(32)) >= np.uint64(0x7F7FFFFF):
        return np.int64(-1)
    return np.int64(best & np.uint64(0xFFFFFFFF))


@njit(inline="always", **JIT)
def key8(L, off):
    """Packed key of the 8 levels (0..2) L[off .. off+7]: level i at bits 2i."""
    u = np.int32(0)
    for i in range(8):
        u |= np.int32(L[off + i]) << (2 * i)
    return u


@njit(inline="always", **JIT)
def load_group(g, x, w, off):
    """Copy a group's x[off:off+8] and weights w[off:off+8] into the 16 values ``scan`` reads."""
    for i in range(8):
        g[i] = x[off + i]
        g[8 + i] = w[off + i]


@njit(inline="always", **JIT)
def scan(start, count, tab, idx, g, scale, shift):
    """The neighbour search over the list of one off-grid key of an 8-coordinate grid: the grid index of
    the first minimum below FLT_MAX of Σ_i (w_i*diff)*diff, diff = scale*q_i - x_i, summed left to right
    as C does, or -1. q_i = tab[i, slot]: the odd coordinates 2l+1 (IQ2, shift None), or shift + l for
    the levels l (IQ1: shift = the group's xx[0], so q = xx[l] exactly for both level tables).
    g holds the group's x (0..7) and w (8..15). The whole padded list is scored in one vector loop."""
    un = np.uint64(count)
    npad = (un + np.uint64(PAD - 1)) // np.uint64(PAD) * np.uint64(PAD)
    s0 = np.uint64(start)
    best = np.uint64(0xFFFFFFFFFFFFFFFF)
    for j in range(npad):
        k = s0 + np.uint64(j)
        s = F0
        for i in range(8):
            q = tab[i, k]
            if shift is not None:
                q = shift + q
            d = scale * q - g[i]
            s = s + (g[8 + i] * d) * d
        best = min(best, rank(s, j))
    f = winner(best)
    if f < 0:
        return -1
    return idx[s0 + np.uint64(f)]


# ------------------------------------------------------------------- the IQ2 / IQ3 sub-block search (§2.6)

NT = 32  # trial lanes: 13 trials (IQ2_XXS), 19 (IQ2_XS, IQ2_S, IQ3_S) or 31 (IQ3_XXS)


@njit(inline="always", **JIT)
def search_scratch():
    """The buffers the steps below share, for sub-blocks of up to 32 weights in up to 8 groups of 4 sign
    runs: weight, waux, xval, wx, L float32 [32]; lev float32 [32, NT] (element, trial); ong bool [8, NT]
    (group on the grid at trial t); flags bool [8]; bsig int32 [4]; idt, tsc, sqx, sq2 float32 [NT]."""
    f32 = np.float32
    return (np.empty(32, f32), np.empty(32, f32), np.empty(32, f32), np.empty(32, f32), np.empty(32, f32),
            np.empty((32, NT), f32), np.empty((8, NT), np.bool_), np.empty(8, np.bool_),
            np.empty(4, np.int32), np.empty(NT, f32), np.empty(NT, f32), np.empty(NT, f32), np.empty(NT, f32))



@njit(inline="always", **JIT)
def square_sum(x, n):
    """Σ x_i*x_i over x[0:n], left to right."""
    s = F0
    for i in range(n):
        s = s + x[i] * x[i]
    return s


@njit(inline="always", **JIT)
def _sub_weights(x, qw, qoff, base, n, use_qw, sigma2, quarter, weight, waux):
    """The weights of the sub-block x[base:base+n]: qw*sqrtf(sigma2 + x*x) with an imatrix, else
    0.25f*sigma2 + x*x (quarter: IQ2) or x*x (IQ3); waux = sqrtf(weight)."""
    for i in range(n):
        xi = x[base + i]
        if use_qw:
            weight[i] = qw[qoff + base + i] * np.sqrt(sigma2 + xi * xi)
        elif quarter:
            weight[i] = F_QUARTER * sigma2 + xi * xi
        else:
            weight[i] = xi * xi
        waux[i] = np.sqrt(weight[i])


@njit(inline="always", **JIT)
def _run_signs(x, base, nrun, weight, parity, xval, bsig):
    """xval = |x| of the sub-block's 8-weight runs and their sign bytes bsig (bit i: x_i < 0, as C's
    ``x >= 0`` test decides). parity: a run with an odd number of negatives gives up the sign of its
    first weight with the smallest (w*x)*x (xval negated there, the bit toggled), and 7 bits are kept."""
    for r in range(nrun):
        s = 0
        nflip = 0
        for i in range(8):
            xi = x[base + 8 * r + i]
            if xi >= F0:
                xval[8 * r + i] = xi
            else:
                xval[8 * r + i] = -xi
                nflip += 1
                s |= 1 << i
        if parity and nflip % 2 == 1:
            imin = 0
            xi = x[base + 8 * r]
            vmin = (weight[8 * r] * xi) * xi
            for i in range(1, 8):
                xi = x[base + 8 * r + i]
                v = (weight[8 * r + i] * xi) * xi
                if v < vmin:
                    vmin = v
                    imin = i
            xval[8 * r + imin] = -xval[8 * r + imin]
            s ^= 1 << imin
        bsig[r] = s & 127 if parity else s


@njit(inline="always", **JIT)
def _first_max(v, n):
    """``max = v[0]; max = MAX(max, v[i])`` with ggml's macro."""
    mx = v[0]
    for i in range(1, n):
        mx = mx if mx > v[i] else v[i]
    return mx


@njit(inline="always", **JIT)
def superblock(blocks, out, b, nbr, twice):
    """Block b's x, its output bytes (cleared, as ggml's memset), the offset of its imatrix columns and
    sigma2 = Σx²/256, or (2*Σx²)/256 when twice."""
    x = blocks[b]
    o = out[b]
    o[:] = 0
    sumx2 = square_sum(x, 256)
    return x, o, (b % nbr) * 256, (F2 * sumx2) / F256 if twice else sumx2 / F256


@njit(inline="always", **JIT)
def sub_start(x, qw, qoff, base, n, use_qw, sigma2, quarter, parity, weight, waux, xval, bsig):
    """The sub-block x[base:base+n] made ready for the scale search: its weights and sqrt-weights, its
    sign runs and xval (see the two steps above); returns max(xval) (C's zero test is the caller's)."""
    _sub_weights(x, qw, qoff, base, n, use_qw, sigma2, quarter, weight, waux)
    _run_signs(x, base, n // 8, weight, parity, xval, bsig)
    return _first_max(xval, n)


@njit(inline="always", **JIT)
def start_trials(idt, tsc, sqx, sq2, nt, c, lo, step, den):
    """Trial t's id = (c + (lo + t)*step)/den and scale 1/id; zeroed sums."""
    for t in range(nt):
        tt = np.uint64(t)
        idt[tt] = (c + np.float32(lo + t) * step) / den
        tsc[tt] = F1 / idt[tt]
        sqx[tt] = F0
        sq2[tt] = F0


@njit(inline="always", **JIT)
def round_trials(lev, idt, xval, n, nt, top):
    """lev[i, t] = the level of xval_i at trial t's id, clamped to [0, top]."""
    for i in range(n):
        xv = xval[i]
        ui = np.uint64(i)
        for t in range(nt):
            tt = np.uint64(t)
            lev[ui, tt] = odd_level(idt[tt] * xv, top)


@njit(inline="always", **JIT)
def trial_sums(lev, weight, wx, sqx, sq2, n, nt):
    """sumqx += (w*xval)*q and sumq2 += (w*q)*q with q = 2l+1, for every trial, left to right."""
    for i in range(n):
        w = weight[i]
        wxi = wx[i]
        ui = np.uint64(i)
        for t in range(nt):
            tt = np.uint64(t)
            q = F2 * lev[ui, tt] + F1
            sqx[tt] = sqx[tt] + wxi * q
            sq2[tt] = sq2[tt] + (w * q) * q


@njit(inline="always", **JIT)
def accept_trials(sqx, sq2, ntr, lev, ong, n, ngroup, scale, L, flags):
    """C's sequential accept chain ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2)`` over the trials, from
    best = 0: the accepted trial's levels go to L and its on-grid flags to flags. Returns the scale."""
    best = F0
    for t in range(ntr):
        if sq2[t] > F0 and sqx[t] * sqx[t] > best * sq2[t]:
            scale = sqx[t] / sq2[t]
            best = scale * sqx[t]
            for i in range(n):
                L[i] = lev[i, t]
            for k in range(ngroup):
                flags[k] = ong[k, t]
    return scale


@njit(inline="always", **JIT)
def count_off(flags, ngroup):
    """How many groups of the accepted trial are off the grid."""
    n_off = 0
    for k in range(ngroup):
        if not flags[k]:
            n_off += 1
    return n_off


@njit(inline="always", **JIT)
def refit_scale(weight, xval, L, n, scale):
    """sumqx / sumq2 of the final levels (q = 2L+1, left to right), or the scale kept when sumq2 <= 0."""
    sumqx = F0
    sumq2 = F0
    for i in range(n):
        w = weight[i]
        q = F2 * L[i] + F1
        sumqx = sumqx + (w * xval[i]) * q
        sumq2 = sumq2 + (w * q) * q
    return sumqx / sumq2 if sumq2 > F0 else scale


@njit(inline="always", **JIT)
def positive_scale(scale, bsig, nrun, mask):
    """A negative scale (possible with an imatrix) is negated and the signs are complemented, as ggml does."""
    if scale < F0:
        scale = -scale
        for r in range(nrun):
            bsig[r] = ~bsig[r] & mask
    return scale
