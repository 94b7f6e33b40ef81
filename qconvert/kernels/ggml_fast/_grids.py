"""Numba pieces shared by the lattice-grid kernels (IQ2_*, IQ3_*): the tables in flat arrays and
iq2_find_best_neighbour / iq3_find_best_neighbour (ggml-quants.c:3270, :3914; reference/gguf-lowbit.md §2.4).

The tables come from qconvert.kernels.ggml.grids.GridTables (built from the grid's definition); here they
are only laid out for the kernels: ``kmap`` int32 (ggml's: index, or -(list offset) - 1), ``neighbours``
int32 (ggml's flat lists: n, then n indices), ``coords`` float32 [size, ncoord] (the odd coordinates 2l+1)
and ``levels`` float32 [size, ncoord] (l itself).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..ggml.grids import GridTables
from ._core import F0, JIT, f32_bits

FLT_MAX = np.float32(np.finfo(np.float32).max)


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
