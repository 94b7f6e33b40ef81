"""Lattice-grid machinery shared by the IQ2_*, IQ3_* and IQ1_* quantizers (reference/gguf-lowbit.md §2).

* ``GridTables.build`` rebuilds what ggml's ``iq2xs_init_impl`` / ``iq3xs_init_impl``
  (ggml-quants.c:2853, :3703) compute at start-up from a grid's packed level vectors: the odd working
  coordinates, ``kmap`` and the neighbour lists, from their definition (nothing precomputed is committed).
* ``signs_parity`` / ``signs_free``: the sign handling of 8-weight runs (§2.5).
* ``best_neighbour``: ``iq2_find_best_neighbour`` / ``iq3_find_best_neighbour`` (§2.4), over lanes.
* ``scale_search``: the candidate loop and refit common to IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (§2.6).

Layout as in helpers.py: a sub-block of B weights is one column of a ``[B, lanes]`` float32 array; its
groups (one grid index each) are the row ranges ``[G*k, G*(k+1))``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ...errors import BadInput
from .helpers import F32, macro_max, nearest_int

FLT_MAX = F32(np.finfo(np.float32).max)
NO_LIST = np.iinfo(np.int32).min  # kmap entry of an off-grid key without a list (unreachable)


@dataclass(frozen=True)
class GridTables:
    """One grid and the look-up tables ggml derives from it.

    levels     int32 [size, ncoord]  level l_i of coordinate i of grid point k (0 .. 2**bits - 1)
    coords     float32 [size, ncoord] the odd working coordinate 2*l + 1 (what the searches multiply)
    kmap       int32 [kmap_size]     grid index of a packed key, else -(offset of its list in neighbours) - 1
                                     (NO_LIST: a key no quantizer can look up, see build's kmax)
    neighbours uint16 [...]          for every off-grid key in increasing order: n, then n grid indices
    """

    ncoord: int
    bits: int
    levels: np.ndarray
    coords: np.ndarray
    kmap: np.ndarray
    neighbours: np.ndarray

    @classmethod
    def build(cls, kgrid: np.ndarray, ncoord: int, bits: int, kmap_size: int, nwant: int,
              kmax: int | None = None) -> GridTables:
        """The tables of ``kgrid`` (packed level vectors, coordinate i at bits ``bits*i``).

        For each key u that is not a grid point (every u < kmap_size, reachable or not, as ggml does), the
        list holds the grid points whose squared distance to u's odd coordinates is among the ``nwant``
        smallest distinct distances, ordered by distance and then by index (ggml's qsort comparator).

        ``kmax``: build lists only for the keys whose levels are all < kmax, the only ones a quantizer that
        clamps its levels to [0, kmax-1] looks up (the 2-bit grids: 3^8 of 43692 keys); the others get
        kmap = NO_LIST. The lists keep ggml's order, so the array is ggml's with those keys' lists cut out."""
        kgrid = np.asarray(kgrid, dtype=np.int64)
        size = kgrid.shape[0]
        levels = unpack_levels(kgrid, ncoord, bits)
        if not np.array_equal(pack_levels(levels, bits), kgrid):
            raise ValueError("grid entries use bits above ncoord*bits")
        kmap = np.full(kmap_size, -1, dtype=np.int64)
        kmap[kgrid] = np.arange(size)
        odd = 2 * levels + 1
        off_grid = np.flatnonzero(kmap < 0)
        if kmax is not None:
            reachable = (unpack_levels(off_grid, ncoord, bits) < kmax).all(axis=1)
            kmap[off_grid[~reachable]] = NO_LIST
            off_grid = off_grid[reachable]
        counts: list[np.ndarray] = []
        lists: list[np.ndarray] = []
        chunk = max(64, (1 << 21) // (size * ncoord))  # bounded scratch: [chunk, size, ncoord] int64
        for start in range(0, off_grid.size, chunk):
            keys = off_grid[start : start + chunk]
            p = 2 * unpack_levels(keys, ncoord, bits) + 1
            diff = odd[None, :, :] - p[:, None, :]
            d2 = np.einsum("kgi,kgi->kg", diff, diff)
            # sort by (distance, index) in one pass: both are small non-negative integers
            order = np.sort(d2 * size + np.arange(size), axis=1)
            dist, idx = order // size, order % size
            rank = np.cumsum(np.diff(dist, axis=1, prepend=dist[:, :1]) > 0, axis=1)
            n = (rank < nwant).sum(axis=1)
            counts.append(n)
            lists.append(idx[np.arange(size)[None, :] < n[:, None]])
        n_all = np.concatenate(counts)
        ends = np.cumsum(n_all + 1)
        offsets = ends - n_all - 1
        neighbours = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint16)
        neighbours[offsets] = n_all
        is_entry = np.ones(neighbours.size, dtype=bool)
        is_entry[offsets] = False
        neighbours[is_entry] = np.concatenate(lists)
        kmap[off_grid] = -offsets - 1
        return cls(ncoord, bits, levels.astype(np.int32), odd.astype(F32), kmap.astype(np.int32), neighbours)

    @property
    def size(self) -> int:
        return self.levels.shape[0]

    def key(self, L: np.ndarray) -> np.ndarray:
        """Levels [ncoord, lanes] -> packed key [lanes]."""
        u = np.zeros(L.shape[1:], dtype=np.int64)
        for i in range(self.ncoord):
            u |= L[i].astype(np.int64) << (self.bits * i)
        return u

    def neighbour_list(self, key: int) -> np.ndarray:
        """The grid indices listed for an off-grid key, in ggml's order."""
        at = -int(self.kmap[key]) - 1
        if at < 0:
            raise ValueError(f"key {key} is a grid point")
        if self.kmap[key] == NO_LIST:
            raise ValueError(f"key {key} has no list (unreachable)")
        return self.neighbours[at + 1 : at + 1 + int(self.neighbours[at])].astype(np.int32)

    @functools.cached_property
    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(lists int32 [kmap_size, max n] padded with 0, counts int32 [kmap_size]; 0 for grid points)."""
        counts = np.zeros(self.kmap.shape[0], dtype=np.int32)
        off = (self.kmap < 0) & (self.kmap != NO_LIST)
        at = -self.kmap[off] - 1
        counts[off] = self.neighbours[at]
        lists = np.zeros((self.kmap.shape[0], int(counts.max(initial=1))), dtype=np.int32)
        for j in range(lists.shape[1]):
            has = counts > j
            lists[has, j] = self.neighbours[-self.kmap[has].astype(np.int64) + j]  # at + 1 + j
        return lists, counts


def unpack_levels(keys: np.ndarray, ncoord: int, bits: int) -> np.ndarray:
    """Packed keys [n] -> levels [n, ncoord]."""
    shifts = bits * np.arange(ncoord, dtype=np.int64)
    return (np.asarray(keys, dtype=np.int64)[:, None] >> shifts) & ((1 << bits) - 1)


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels [n, ncoord] -> packed keys [n]."""
    shifts = bits * np.arange(levels.shape[1], dtype=np.int64)
    return (np.asarray(levels, dtype=np.int64) << shifts).sum(axis=1)


def gguf_py_grid(cls: type, ncoord: int, bits: int, hex_bits: int) -> np.ndarray:
    """A quantizer grid (ggml's kgrid_* packing: coordinate i at bits ``bits*i``) from the same grid as
    gguf-py's dequantizer ships it: ``cls.grid_hex``, little-endian uint16 entries with coordinate i's
    level at bits ``hex_bits*i``."""
    raw = cls.grid_hex.decode() if isinstance(cls.grid_hex, bytes) else cls.grid_hex
    entries = np.frombuffer(bytes.fromhex(raw), dtype="<u2")
    return pack_levels(unpack_levels(entries, ncoord, hex_bits), bits).astype(np.uint16)


def ksigns() -> np.ndarray:
    """ksigns_iq2xs (ggml-common.h:513): 7 stored sign bits plus the even-parity eighth, uint8 [128]."""
    s = np.arange(128)
    parity = np.bitwise_count(s.astype(np.uint8)) & 1
    return (s | (parity << 7)).astype(np.uint8)


# --------------------------------------------------------------------------------------------- signs


def signs_free(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [8r, lanes] -> (xval = |x|, sign bytes int32 [r, lanes]; bit j = weight 8k+j is negative).

    ``x >= 0`` decides, as in C: -0.0 counts as positive (and NaN as negative)."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    runs = neg.reshape(-1, 8, *x.shape[1:]).astype(np.int32)
    shift = np.arange(8).reshape(1, 8, *([1] * (x.ndim - 1)))
    return xval, (runs << shift).sum(axis=1)


def signs_parity(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Even-parity sign runs (IQ2_XXS, IQ2_XS, IQ3_XXS): x, weight [8r, lanes] -> (xval, signs [r, lanes]),
    7 bits per run.

    A run with an odd number of negatives gives up the sign of its first weight with the smallest
    ``(w*x)*x``: that bit is toggled and its xval negated (it stays negative for the rest of the search)."""
    xval, bits = signs_free(x)
    xval = xval.copy()
    wxx = (weight * x) * x
    for r in range(bits.shape[0]):
        run = slice(8 * r, 8 * r + 8)
        odd = (np.bitwise_count(bits[r].astype(np.uint8)) & 1).astype(bool)
        imin = np.zeros(bits.shape[1:], dtype=np.int64)
        vmin = wxx[8 * r].copy()
        for i in range(1, 8):
            better = wxx[8 * r + i] < vmin
            vmin = np.where(better, wxx[8 * r + i], vmin)
            imin = np.where(better, i, imin)
        lane = np.arange(imin.size)
        flip = np.zeros((8, imin.size), dtype=bool)
        flip[imin, lane] = odd
        xval[run] = np.where(flip, -xval[run], xval[run])
        bits[r] ^= np.where(odd, 1 << imin, 0).astype(np.int32)
    return xval, bits & 127


# --------------------------------------------------------------------------------------------- search


def round_levels(id_: np.ndarray, xval: np.ndarray, kmaxq: int) -> np.ndarray:
    """``MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval - 1))))``, int32 like xval's shape."""
    return np.clip(nearest_int(F32(0.5) * ((id_ * xval) - F32(1))), 0, kmaxq - 1)


def best_neighbour(
    tables: GridTables, key: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray, what: str
) -> np.ndarray:
    """Grid index nearest to a group among the neighbours of its off-grid ``key`` [lanes]: the first minimum
    of ``Σ (waux*diff)*diff`` with diff = scale*g - xval, summed left to right (xval, waux [ncoord, lanes]).

    A lane where no score is below FLT_MAX (inf/NaN weights) makes ggml abort (GGML_ASSERT): BadInput."""
    lists, counts = tables.padded
    n = counts[key]
    best = np.full(key.shape, FLT_MAX, dtype=F32)
    index = np.full(key.shape, -1, dtype=np.int32)
    for j in range(int(n.max(initial=0))):
        cand = lists[key, j]
        g = tables.coords[cand]  # [lanes, ncoord]
        d2 = np.zeros(key.shape, dtype=F32)
        for i in range(tables.ncoord):
            diff = scale * g[:, i] - xval[i]
            d2 = d2 + (waux[i] * diff) * diff
        better = (j < n) & (d2 < best)
        best = np.where(better, d2, best)
        index = np.where(better, cand, index)
    if np.any(index < 0):
        raise search_failed(what)
    return index


def search_failed(what: str) -> BadInput:
    """No neighbour scored below FLT_MAX, or a NaN sub-block scale (IQ2_*, IQ1_*: GGML_ASSERT(scale >= 0)):
    huge (|x| beyond ~1e12, x³ overflows) or NaN weights, on which ggml's GGML_ASSERT kills the process."""
    return BadInput(f"{what}: weights too large (or NaN) for the grid search (llama.cpp aborts on them)")


@dataclass(frozen=True)
class Search:
    """Per-type constants of the common scale search (reference/gguf-lowbit.md §2.6 table)."""

    name: str
    tables: GridTables
    group: int  # weights per grid index: 8 (IQ2) or 4 (IQ3)
    kmaxq: int  # levels 0 .. kmaxq-1
    c: float  # trial id = (c + is*step) / den
    step: float
    trials: range
    flags_start: bool  # the on-grid flags before any candidate was accepted
    refit: str  # "offgrid": only off-grid groups; "all_if_offgrid": all, if any is off-grid; "all": always
    parity: bool  # 7 stored sign bits per run, the 8th implied by even parity (signs_parity)


def _project(s: Search, id_: np.ndarray, scale: np.ndarray, xval: np.ndarray, waux: np.ndarray,
             k: int, live: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round group k at ``id`` and move it onto the grid: (levels [G, lanes], on-grid flag [lanes]).
    Lanes outside ``live`` are rounded but never searched (ggml skips those sub-blocks)."""
    rows = slice(s.group * k, s.group * (k + 1))
    L = round_levels(id_, xval[rows], s.kmaxq)
    key = s.tables.key(L)
    on = s.tables.kmap[key] >= 0
    off = np.flatnonzero(~on if live is None else ~on & live)
    if off.size:
        idx = best_neighbour(s.tables, key[off], xval[rows][:, off], waux[rows][:, off], scale[off], s.name)
        L[:, off] = s.tables.levels[idx].T
    return L, on


def _sums(xval: np.ndarray, weight: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = Σ (w*xval)*q, sumq2 = Σ (w*q)*q with q = 2L+1, left to right."""
    sumqx = np.zeros(xval.shape[1:], dtype=F32)
    sumq2 = np.zeros(xval.shape[1:], dtype=F32)
    for i in range(xval.shape[0]):
        q = (2 * L[i] + 1).astype(F32)
        sumqx = sumqx + (weight[i] * xval[i]) * q
        sumq2 = sumq2 + (weight[i] * q) * q
    return sumqx, sumq2


def scale_search(
    s: Search, xval: np.ndarray, weight: np.ndarray, den: np.ndarray, start: np.ndarray,
    live: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate loop and the refit of one sub-block per lane (xval, weight [B, lanes]).

    Trial ``is`` uses ``id = (c + is*step)/den``; ``start`` is the scale kept when no trial is accepted.
    Returns (scale [lanes], levels int32 [B, lanes]). Zero sub-blocks are the caller's business; lanes
    outside ``live`` (if given) are not neighbour-searched, so their weights cannot make the search fail."""
    waux = np.sqrt(weight)
    ngroups = xval.shape[0] // s.group
    lanes = xval.shape[1:]
    best = np.zeros(lanes, dtype=F32)
    scale = start.astype(F32, copy=True)
    L = np.zeros(xval.shape, dtype=np.int64)
    flags = np.full((ngroups, *lanes), s.flags_start)
    for trial in s.trials:
        id_ = (F32(s.c) + F32(trial) * F32(s.step)) / den
        this_scale = F32(1) / id_
        parts = [_project(s, id_, this_scale, xval, waux, k, live) for k in range(ngroups)]
        Laux = np.concatenate([p[0] for p in parts])
        sumqx, sumq2 = _sums(xval, weight, Laux)
        accept = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = sumqx / sumq2
        scale = np.where(accept, new_scale, scale)
        best = np.where(accept, new_scale * sumqx, best)
        L = np.where(accept, Laux, L)
        flags = np.where(accept, np.stack([p[1] for p in parts]), flags)
    off = ~flags
    refit = scale > 0
    if live is not None:
        refit &= live
    if s.refit != "all":
        refit &= off.any(axis=0)
    if refit.any():
        id_ = F32(1) / scale
        newL = L.copy()
        for k in range(ngroups):
            rows = slice(s.group * k, s.group * (k + 1))
            redo = refit if s.refit != "offgrid" else refit & off[k]
            Lk, _ = _project(s, id_, scale, xval, waux, k, redo)  # only the groups C recomputes are searched
            newL[rows] = np.where(redo, Lk, L[rows])
        L = newL
        sumqx, sumq2 = _sums(xval, weight, L)
        scale = np.where(refit & (sumq2 > 0), sumqx / sumq2, scale)
    return scale, L.astype(np.int32)


def signed_runs(s: Search, xs: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sub-block's sign handling (signs_parity or signs_free) and C's ``max = xval[0]; MAX(max,
    xval[i])``, the operand of its zero test: (xval, signs, max [lanes])."""
    xval, signs = signs_parity(xs, weight) if s.parity else signs_free(xs)
    return xval, signs, macro_max(xval, from_first=True)


def search_subblocks(s: Search, xval: np.ndarray, signs: np.ndarray, weight: np.ndarray, live: np.ndarray,
                     den: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scale_search on the ``live`` sub-blocks (those C does not skip), then what C does with its result: a
    negative scale ("should never happen", but can with an imatrix) is negated and the signs complemented.
    Returns (scale [lanes] >= 0 or NaN, grid indices [groups, lanes], signs); skipped sub-blocks have
    scale 0, index 0 and no signs."""
    den = np.where(live, den, F32(1))  # skipped sub-blocks: searched on harmless values, then dropped
    scale, L = scale_search(s, xval, weight, den, start, live)
    flip = live & (scale < 0)
    scale = np.where(flip, -scale, scale)
    signs = np.where(flip, ~signs & (127 if s.parity else 255), signs)
    idx = np.where(live, grid_index(s.tables, np.where(live, L, 0), s.group), 0)
    return np.where(live, scale, F32(0)), idx, np.where(live, signs, 0)


def grid_index(tables: GridTables, L: np.ndarray, group: int) -> np.ndarray:
    """Final levels [B, lanes] -> grid index of every group [B/group, lanes] (ggml aborts if one is off
    the grid: it never is, the search and refit only produce grid points)."""
    groups = range(L.shape[0] // group)
    idx = np.stack([tables.kmap[tables.key(L[group * k : group * (k + 1)])] for k in groups])
    if np.any(idx < 0):
        raise AssertionError("a group ended off the grid")
    return idx
