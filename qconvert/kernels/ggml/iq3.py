"""IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375 bpw): 4-weight groups on a 256- / 512-point lattice grid.

Ports of ``quantize_row_iq3_xxs_impl(256, ...)`` (ggml-quants.c:3938) and ``quantize_row_iq3_s_impl(32, ...)``
(:4169) as ``quantize_iq3_xxs`` / ``quantize_iq3_s`` call them, with or without an imatrix
(reference/gguf-lowbit.md §1.4-1.5, §2, §3.4-3.5). Lanes are 32-weight sub-blocks. The shared grid
machinery (tables, signs, the scale search) is in grids.py.
"""

from __future__ import annotations

import functools

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as T

from .grids import GridTables, Search, gguf_py_grid, ksigns, search_subblocks, signed_runs
from .helpers import (
    F32,
    QK_K,
    BlockKernel,
    fp16_bytes,
    lanes,
    lattice_weights,
    macro_max,
    nearest_int,
    read_fp16,
)

# The quantizer-side grids kgrid_256 (ggml-quants.c:3708, IQ3_XXS) and kgrid_512 (:3726, IQ3_S) of
# iq3xs_init_impl: entry k packs the level (0..7) of coordinate i at bits 3i..3i+2. They are a chosen subset
# of the 8^4 points with no generating rule; gguf-py ships the same grids (level i in nibble i), so they are
# read from there. Tests hold them to the reference checksums and to ggml's own dequant tables.
KGRID_256 = gguf_py_grid(gguf.quants.IQ3_XXS, ncoord=4, bits=3, hex_bits=4)
KGRID_512 = gguf_py_grid(gguf.quants.IQ3_S, ncoord=4, bits=3, hex_bits=4)

# ggml-common.h's dequant grids (iq3xxs_grid :1017, iq3s_grid :1052) hold, in byte i of entry k, the
# magnitude of level l_i(k) of the same quantizer-grid entry: 4, 12, .., 52, 62 and 1, 3, .., 15 (reference
# §2.1; gguf-py's grid_map; tests check them on ggml's to_float)
XXS_MAGNITUDE = np.array(gguf.quants.IQ3_XXS.grid_map, dtype=F32)
S_MAGNITUDE = np.array(gguf.quants.IQ3_S.grid_map, dtype=F32)

KMAP_SIZE = 4096  # every 12-bit key: with kMaxQ = 8 all of them are reachable
EPS_XXS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
FUDGE_XXS = F32(1.0125)
FUDGE_S = F32(1.033)
KSIGNS = ksigns()


@functools.cache
def tables(grid_size: int) -> GridTables:
    """The tables iq3xs_init_impl(grid_size) builds: nwant = 2 distinct distances for 256, 3 for 512."""
    kgrid = KGRID_256 if grid_size == 256 else KGRID_512
    return GridTables.build(kgrid, ncoord=4, bits=3, kmap_size=KMAP_SIZE, nwant=2 if grid_size == 256 else 3)


@functools.cache
def search(qtype: T) -> Search:
    """The §2.6 constants: IQ3_XXS 31 trials, flags start true, only off-grid groups refit; IQ3_S 19 trials,
    flags start false and every group is refit when any is off the grid (the skip is commented out, :4283)."""
    if qtype == T.IQ3_XXS:
        return Search("IQ3_XXS", tables(256), group=4, kmaxq=8, c=15, step=0.2, trials=range(-15, 16),
                      flags_start=True, refit="offgrid", parity=True)
    return Search("IQ3_S", tables(512), group=4, kmaxq=8, c=15, step=0.2, trials=range(-9, 10),
                  flags_start=False, refit="all_if_offgrid", parity=False)


def _subblocks(qtype: T, x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Search every 32-weight sub-block: (scale [8, nb], grid indices [8 groups, 8, nb], signs [4, 8, nb],
    live [8, nb] = the sub-block was not skipped as zero)."""
    nb = x.size // QK_K
    s = search(qtype)
    weight = lattice_weights(x, qw, 32)
    xval, signs, mx = signed_runs(s, lanes(x, 32), weight)
    live = ~(mx < EPS_XXS) if qtype == T.IQ3_XXS else mx != 0
    scale, idx, signs = search_subblocks(s, xval, signs, weight, live, mx, mx / F32(15))
    return (scale.reshape(8, nb, order="F"), idx.reshape(8, 8, nb, order="F"),
            signs.reshape(4, 8, nb, order="F"), live.reshape(8, nb, order="F"))


def _super_scale(scale: np.ndarray, fudge: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max_scale [nb], stored fp16 bytes [nb, 2], 4-bit sub-scales ls [8, nb]); id is 1/d of the
    unfudged d."""
    max_scale = macro_max(scale)
    d = max_scale / F32(31)
    stored = np.where(max_scale != 0, d * fudge, F32(0))
    inv = F32(1) / d
    ls = np.clip(nearest_int(F32(0.5) * ((inv * scale) - F32(1))), 0, 15)
    return max_scale, fp16_bytes(stored), np.where(max_scale != 0, ls, 0)


def _sign_factors(runs: np.ndarray) -> np.ndarray:
    """Sign bytes [n, 32] (bit j = weight 8r+j of run r) -> ±1 float32 [n, 256]."""
    neg = (runs[:, :, None] >> np.arange(8)) & 1
    return np.where(neg.reshape(runs.shape[0], -1) != 0, F32(-1), F32(1))


class IQ3_XXS(BlockKernel):
    qtype = T.IQ3_XXS

    @classmethod
    def quantize_rows(cls, x, qw):
        scale, idx, signs, _ = _subblocks(T.IQ3_XXS, x, qw)
        max_scale, d, ls = _super_scale(scale, FUDGE_XXS)
        words = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21) | (ls << 28)
        keep = max_scale != 0  # all scales zero: ggml clears every data byte
        qs = np.where(keep, idx, 0).transpose(2, 1, 0).reshape(-1, 64)  # byte 8ib+k
        words = np.ascontiguousarray(np.where(keep, words, 0).T.astype("<u4"))
        return np.concatenate([d, qs.astype(np.uint8), words.view(np.uint8).reshape(-1, 32)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        qs = b[:, 2:66].astype(np.int64)
        words = np.ascontiguousarray(b[:, 66:98]).view("<u4").astype(np.int64)  # [n, 8]
        db = np.repeat((d * (F32(0.5) + (words >> 28).astype(F32))) * F32(0.5), 32, axis=1)
        grid = XXS_MAGNITUDE[tables(256).levels[qs]].reshape(-1, QK_K)  # group g = weights 4g..4g+3
        runs = KSIGNS[(words[:, :, None] >> (7 * np.arange(4))) & 127].reshape(-1, 32).astype(np.int64)
        return (db * grid) * _sign_factors(runs)


class IQ3_S(BlockKernel):
    qtype = T.IQ3_S

    @classmethod
    def quantize_rows(cls, x, qw):
        scale, idx, signs, live = _subblocks(T.IQ3_S, x, qw)
        nb = scale.shape[1]
        _, d, ls = _super_scale(scale, FUDGE_S)
        # qs and signs are written through pointers that skip exactly-zero sub-blocks (reference §3.5): the
        # data of sub-block ib lands in slot p = number of live sub-blocks before it; qh, scales stay at ib.
        # With every scale zero ggml leaves what was written (only d and the scales stay 0).
        slot = np.cumsum(live, axis=0) - live
        qs = np.zeros((nb, 8, 8), dtype=np.int64)
        sg = np.zeros((nb, 8, 4), dtype=np.int64)
        blk, ib = np.nonzero(live.T)
        p = slot[ib, blk]
        qs[blk, p] = (idx[:, ib, blk] & 255).T
        sg[blk, p] = signs[:, ib, blk].T
        qh = ((idx >> 8) << np.arange(8)[:, None, None]).sum(axis=0).T  # [nb, ib]: bit k = group k
        sc = (ls[0::2] | (ls[1::2] << 4)).T
        parts = [qs.reshape(nb, 64), qh, sg.reshape(nb, 32), sc]
        return np.concatenate([d] + [part.astype(np.uint8) for part in parts], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])[:, None]
        qs = b[:, 2:66].astype(np.int64)
        qh = b[:, 66:74].astype(np.int64)
        sc = b[:, 106:110].astype(np.int64)
        ls = (sc[:, np.arange(8) // 2] >> (4 * (np.arange(8) % 2))) & 0xF
        db = np.repeat(d * (1 + 2 * ls).astype(F32), 32, axis=1)
        hi = (qh[:, np.arange(64) // 8] >> (np.arange(64) % 8)) & 1
        grid = S_MAGNITUDE[tables(512).levels[qs | (hi << 8)]].reshape(-1, QK_K)
        return (db * grid) * _sign_factors(b[:, 74:106].astype(np.int64))
