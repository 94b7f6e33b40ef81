"""The 2-bit lattice types IQ2_XXS, IQ2_XS and IQ2_S (256-weight super-blocks, 8-weight grid groups).

Ports of ``quantize_row_iq2_xxs_impl`` (ggml-quants.c:3294), ``quantize_row_iq2_xs_impl`` (:3472) and
``quantize_row_iq2_s_impl`` (:5113), the functions ``ggml_quantize_chunk`` runs. They share one scale
search (shared/reference/gguf-lowbit.md §2.6): for each sub-block, trial scales round |x| to levels
{0, 1, 2} (odd values 1, 3, 5), groups that land off the grid are replaced by their best listed
neighbour (grids.py), and the trial with the best ``sumqx²/sumq2`` wins; then a refit with the chosen
scale. Sub-blocks are the lanes (helpers.py layout ``[element, lane]``).

imatrix: IQ2_XXS and IQ2_XS cannot run without one (ggml asserts and aborts the process; here
``quantize`` raises ValueError). IQ2_S without one weights each value by ``0.25·σ² + x²``.
Inputs on which ggml aborts (a neighbour search with no finite candidate, a NaN scale: non-finite or
~1e19+ weights) raise ValueError instead of returning bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as T

from .grids import GridTables, Search, gguf_py_grid, ksigns, search_failed, search_subblocks, signed_runs
from .helpers import (
    F32,
    QK_K,
    BlockKernel,
    block_sigma2,
    fp16_bytes,
    impl_weights,
    lanes,
    le_bytes,
    macro_max,
    make_qp_quants,
    nearest_int,
    read_fp16,
)

KMAXQ = 3  # levels 0..2, odd working values 1, 3, 5
KMAP_SIZE = 43692  # iq2xs_init_impl's kmap (> 0xAAAA, the largest key with every level <= 2)
# ggml-common.h's dequant grids (iq2xxs_grid :560, iq2xs_grid :627, iq2s_grid :758): byte i of entry k is
# the magnitude of level l_i(k) of the same quantizer-grid entry (reference §2.1; gguf-py's grid_map)
MAGNITUDE = np.array(gguf.quants.IQ2_XXS.grid_map, dtype=F32)  # 8, 25, 43
KSIGNS = ksigns()


@dataclass(frozen=True)
class Params:
    """What differs between the three quantizers (reference §2.6 table)."""

    sub: int  # weights per sub-block (one 4-bit scale)
    sigma_twice: bool  # sigma2 = 2·Σx²/256 (IQ2_S) or Σx²/256
    parity: bool  # 7 stored sign bits, the 8th implied by even parity (XXS, XS)
    eps: float  # zero test on max(xval)
    fudge: float  # multiplies only the stored fp16 d
    grid: type  # the gguf-py class whose grid_hex holds the quantizer grid
    nwant: int  # distinct neighbour distances per off-grid key (iq2xs_init_impl :3110)


PARAMS = {
    T.IQ2_XXS: Params(32, False, True, 1e-15, 1.0, gguf.quants.IQ2_XXS, 2),
    T.IQ2_XS: Params(16, False, True, 1e-15, 1.0, gguf.quants.IQ2_XS, 2),
    T.IQ2_S: Params(16, True, False, 1e-8, 0.9875, gguf.quants.IQ2_S, 1),
}


def kgrid(qtype: T) -> np.ndarray:
    """The quantizer grid kgrid_2bit_256 / _512 / _1024 (ggml-quants.c:2859, :2877, :3041): entry k packs
    the level (0..2) of coordinate i at bits 2i..2i+1. A chosen subset of 3^8 points without a generating
    rule; gguf-py ships the same entries (its grid_hex is their little-endian bytes), so they are read
    from there. Tests hold them to the reference checksums and to ggml's quantizer and dequantizer."""
    return gguf_py_grid(PARAMS[qtype].grid, ncoord=8, bits=2, hex_bits=2)


@functools.cache
def tables(qtype: T) -> GridTables:
    """The tables iq2xs_init_impl builds, for the keys the quantizers can look up (levels <= 2)."""
    p = PARAMS[qtype]
    return GridTables.build(kgrid(qtype), ncoord=8, bits=2, kmap_size=KMAP_SIZE, nwant=p.nwant, kmax=KMAXQ)


@functools.cache
def search(qtype: T) -> Search:
    """§2.6 constants: IQ2_XXS 13 trials around eff_max and a refit of every group; IQ2_XS / IQ2_S 19
    trials around max and a refit of the off-grid groups only."""
    if qtype == T.IQ2_XXS:
        return Search("IQ2_XXS", tables(qtype), group=8, kmaxq=KMAXQ, c=5, step=0.1, trials=range(-6, 7),
                      flags_start=True, refit="all", parity=True)
    return Search(qtype.name, tables(qtype), group=8, kmaxq=KMAXQ, c=5, step=0.1, trials=range(-9, 10),
                  flags_start=True, refit="offgrid", parity=PARAMS[qtype].parity)


def weights(x: np.ndarray, qw: np.ndarray | None, sub: int, sigma_twice: bool) -> np.ndarray:
    """Per-weight importance in lanes of ``sub``: ``qw·sqrtf(σ² + x²)``, or IQ2_S's ``0.25f·σ² + x²``."""
    sigma2 = block_sigma2(x, sigma_twice)
    if qw is not None:
        return impl_weights(x, qw, sub, sigma2)
    xs = lanes(x, sub)
    return F32(0.25) * np.repeat(sigma2, QK_K // sub) + xs * xs


def subblocks(qtype: T, x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search every sub-block: (scale [lanes] >= 0, grid indices [groups, lanes], signs [groups, lanes]);
    zero sub-blocks (skipped by C) have scale 0, index 0 and no signs."""
    p = PARAMS[qtype]
    weight = weights(x, qw, p.sub, p.sigma_twice)
    xval, signs, mx = signed_runs(search(qtype), lanes(x, p.sub), weight)
    live = ~(mx < F32(p.eps))
    if qtype == T.IQ2_XXS:
        # the start scale: make_qp_quants(32, 4, xval, L, weight), on xval that may hold a flipped -|x| (§3.1)
        start, _ = make_qp_quants(xval, KMAXQ + 1, weight)
        den = start * F32(KMAXQ)  # eff_max
        live &= ~(den <= 0)
    else:
        den, start = mx, mx / F32(2 * KMAXQ - 1)
    scale, idx, signs = search_subblocks(search(qtype), xval, signs, weight, live, den, start)
    if np.isnan(scale).any():  # GGML_ASSERT(scale >= 0)
        raise search_failed(qtype.name)
    return scale, idx, signs


def superblock_scales(scales: np.ndarray, nb: int, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fp16 bits source d·fudge [nb], 4-bit codes [nsub per block, nb], zero blocks [nb])."""
    per = np.ascontiguousarray(scales.reshape(nb, -1).T)
    max_scale = macro_max(per)
    d = max_scale / F32(31)
    inv = F32(1) / d
    ls = np.clip(nearest_int(F32(0.5) * ((inv * per) - F32(1))), 0, 15)
    zero = max_scale == 0
    stored = d if fudge == 1.0 else d * F32(fudge)
    return np.where(zero, F32(0), stored), np.where(zero, 0, ls), zero


# ---------------------------------------------------------------------------------------------- classes


class _IQ2(BlockKernel):
    @classmethod
    def prepare(cls, x: np.ndarray, qw: np.ndarray | None):
        """(nb, stored d [nb], 4-bit scales [sub-blocks per block, nb], zero blocks [nb], grid indices and
        signs [groups, lanes])."""
        p = PARAMS[cls.qtype]
        scale, idx, signs = subblocks(cls.qtype, x, qw)
        nb = x.size // QK_K
        d, ls, zero = superblock_scales(scale, nb, p.fudge)
        return nb, d, ls, zero, idx, signs


def _per_block(v: np.ndarray, nb: int) -> np.ndarray:
    """[k, lanes] (lanes = nb·m sub-blocks) -> [nb, m·k]: sub-block-major within each block."""
    return np.ascontiguousarray(v.T).reshape(nb, -1)


class IQ2_XXS(_IQ2):
    qtype = T.IQ2_XXS
    requires_imatrix = True

    @classmethod
    def quantize_rows(cls, x, qw):
        nb, d, ls, zero, idx, signs = cls.prepare(x, qw)
        grid_bytes = _per_block(idx, nb).reshape(nb, 8, 4)  # [block, record, group]
        sign7 = _per_block(signs, nb).reshape(nb, 8, 4).astype(np.uint32)
        aux = np.bitwise_or.reduce(sign7 << (7 * np.arange(4, dtype=np.uint32)), axis=2)
        aux |= np.ascontiguousarray(ls.T).astype(np.uint32) << np.uint32(28)
        rec = np.concatenate([grid_bytes.astype(np.uint8), aux.astype("<u4")[..., None].view(np.uint8)],
                             axis=2).reshape(nb, 64)
        rec[zero] = 0
        return np.concatenate([fp16_bytes(d), rec], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])
        rec = b[:, 2:].reshape(-1, 8, 8)
        aux = np.ascontiguousarray(rec[:, :, 4:]).view("<u4")[..., 0]  # [n, 8]
        db = (d[:, None] * (F32(0.5) + (aux >> 28).astype(F32))) * F32(0.25)
        mags = MAGNITUDE[tables(cls.qtype).levels[rec[:, :, :4]]]  # [n, 8, 4, 8]
        sg = KSIGNS[(aux[:, :, None] >> (7 * np.arange(4))) & 127]  # [n, 8, 4]
        return _signed(db[:, :, None, None] * mags, sg).reshape(-1, QK_K)


class IQ2_XS(_IQ2):
    qtype = T.IQ2_XS
    requires_imatrix = True

    @classmethod
    def quantize_rows(cls, x, qw):
        nb, d, ls, zero, idx, signs = cls.prepare(x, qw)
        q = _per_block(idx | (signs << 9), nb)  # [nb, 32]
        q[zero] = 0
        return np.concatenate([fp16_bytes(d), le_bytes(q.reshape(-1), "<u2").reshape(nb, 64),
                               _nibbles(ls)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])
        q = np.ascontiguousarray(b[:, 2:66]).view("<u2").astype(np.int64)  # [n, 32]
        db = _sub_scales(d, b[:, 66:74])  # [n, 16]
        mags = MAGNITUDE[tables(cls.qtype).levels[q & 511]]  # [n, 32, 8]
        y = np.repeat(db, 2, axis=1)[:, :, None] * mags
        return _signed(y, KSIGNS[q >> 9]).reshape(-1, QK_K)


class IQ2_S(_IQ2):
    qtype = T.IQ2_S

    @classmethod
    def quantize_rows(cls, x, qw):
        nb, d, ls, zero, idx, signs = cls.prepare(x, qw)
        idx = _per_block(idx, nb)  # [nb, 32]
        qh = np.bitwise_or.reduce((idx >> 8).reshape(nb, 8, 4) << (2 * np.arange(4)), axis=2)
        sg = _per_block(signs, nb)
        # all scales zero: unlike XXS/XS, C keeps the indices and signs it wrote (only d and scales are 0)
        return np.concatenate([fp16_bytes(d), (idx & 255).astype(np.uint8), sg.astype(np.uint8),
                               qh.astype(np.uint8), _nibbles(ls)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = read_fp16(b[:, 0:2])
        qh = b[:, 66:74].astype(np.int64)
        hi = (np.repeat(qh, 4, axis=1) >> (2 * np.tile(np.arange(4), 8))) & 3  # bits 8-9 of group g
        idx = b[:, 2:34].astype(np.int64) | (hi << 8)
        db = _sub_scales(d, b[:, 74:82])
        mags = MAGNITUDE[tables(cls.qtype).levels[idx]]  # [n, 32, 8]
        y = np.repeat(db, 2, axis=1)[:, :, None] * mags
        return _signed(y, b[:, 34:66]).reshape(-1, QK_K)


def _nibbles(ls: np.ndarray) -> np.ndarray:
    """4-bit codes [16, nb] -> [nb, 8] bytes, even sub-block in the low nibble."""
    return (ls[0::2] | (ls[1::2] << 4)).T.astype(np.uint8)


def _sub_scales(d: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``d * (0.5f + ls) * 0.25f`` for the 16 nibble-packed sub-block scales: [n, 16]."""
    ls = np.stack([scales & 0xF, scales >> 4], axis=2).reshape(-1, 16).astype(F32)
    return (d[:, None] * (F32(0.5) + ls)) * F32(0.25)


def _signed(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """y [..., 8] times ±1 by the bits of the sign bytes [...] (bit j set: weight j negative)."""
    neg = ((signs[..., None].astype(np.int32) >> np.arange(8)) & 1).astype(bool)
    return y * np.where(neg, F32(-1), F32(1))
