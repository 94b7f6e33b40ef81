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
from ._core import F0, JIT

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
