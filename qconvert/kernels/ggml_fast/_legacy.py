"""Lane kernels for the 32-weight legacy types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml-quants.c).

Without an imatrix these are the `_ref` functions (truncating casts, roundf for Q8_0); with one, the
`_impl` functions (make_qx_quants / make_qkx3_quants with weights qw*sqrt(sigma2 + x^2), sigma2 per row).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._core import F0, F1, F_HALF, JIT, NL, fp32_to_fp16, live_lanes, load_lanes, put_u16, roundf
from ._search import NSTATE, make_qkx, make_qx

QB = 32
X = 0
QW = 32
W = 64
L = 96
D, M, SIG = 128, 129, 130
TMP = 132
NROWS = TMP + NSTATE + QB

F_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(**JIT)
def row_sigma2(x):
    """sigma2 = sum(x*x)/n_per_row of every row, summed left to right (quantize_row_q4_0_impl)."""
    nrows, n = x.shape
    out = np.empty(nrows, np.float32)
    fn = np.float32(n)
    for r in range(nrows):
        s = F0
        for j in range(n):
            v = x[r, j]
            s += v * v
        out[r] = s / fn
    return out


@njit(inline="always", **JIT)
def _trunc_i8(v):
    """(int8_t)v for a float v: C truncates toward zero (cvttss2si) and keeps the low byte."""
    return ((np.int32(v) + 128) & 255) - 128


@njit(inline="always", **JIT)
def _put_pair(out, b, qs, j, xi0, xi1, qh):
    """Block b's levels j and j+16 (uint8 values): their low nibbles into qs byte j (j low, j+16 high),
    their 5th bits into bits j and j+16 of qh, which is returned."""
    out[b, qs + j] = np.uint8((xi0 & 0x0F) | ((xi1 & 0x0F) << 4))
    qh |= ((xi0 & 0x10) >> 4) << j
    return qh | (((xi1 & 0x10) >> 4) << (j + 16))


@njit(inline="always", **JIT)
def _put_qh(out, b, off, qh):
    """The 32 fifth bits, little-endian, at out[b, off:off+4] (Q5_0 / Q5_1)."""
    for t in range(4):
        out[b, off + t] = np.uint8((qh >> (8 * t)) & 255)


@njit(**JIT)
def q8_0(blocks, qw, nbr, out, use_qw):
    """quantize_row_q8_0_ref (the imatrix is ignored by ggml)."""
    nb = blocks.shape[0]
    for b in range(nb):
        amax = F0
        for j in range(QB):
            a = np.abs(blocks[b, j])
            amax = amax if amax > a else a
        d = amax / np.float32(127.0)
        idv = F1 / d if d != F0 else F0
        put_u16(out, b, 0, fp32_to_fp16(d))
        for j in range(QB):
            out[b, 2 + j] = np.uint8(np.int32(roundf(blocks[b, j] * idv)) & 255)


@njit(**JIT)
def _sym_ref(blocks, out, nmax, five):
    """quantize_row_q4_0_ref (nmax 8) / quantize_row_q5_0_ref (nmax 16)."""
    nb = blocks.shape[0]
    fn = np.float32(nmax)
    off_bias = fn + F_HALF
    qs = 6 if five else 2
    for b in range(nb):
        amax = F0
        mx = F0
        for j in range(QB):
            v = blocks[b, j]
            if amax < np.abs(v):
                amax = np.abs(v)
                mx = v
        d = mx / -fn
        idv = F1 / d if d != F0 else F0
        put_u16(out, b, 0, fp32_to_fp16(d))
        qh = 0
        for j in range(16):
            x0 = blocks[b, j] * idv
            x1 = blocks[b, 16 + j] * idv
            t0 = _trunc_i8(x0 + off_bias)
            t1 = _trunc_i8(x1 + off_bias)
            xi0 = (2 * nmax - 1 if 2 * nmax - 1 < t0 else t0) & 255
            xi1 = (2 * nmax - 1 if 2 * nmax - 1 < t1 else t1) & 255
            qh = _put_pair(out, b, qs, j, xi0, xi1, qh)
        if five:
            _put_qh(out, b, 2, qh)


@njit(**JIT)
def _asym_ref(blocks, out, five):
    """quantize_row_q4_1_ref / quantize_row_q5_1_ref."""
    nb = blocks.shape[0]
    fn = np.float32(31.0 if five else 15.0)
    qs = 8 if five else 4
    for b in range(nb):
        mn = F_FLT_MAX
        mx = -F_FLT_MAX
        for j in range(QB):
            v = blocks[b, j]
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = (mx - mn) / fn
        idv = F1 / d if d != F0 else F0
        put_u16(out, b, 0, fp32_to_fp16(d))
        put_u16(out, b, 2, fp32_to_fp16(mn))
        qh = 0
        for j in range(16):
            x0 = (blocks[b, j] - mn) * idv
            x1 = (blocks[b, 16 + j] - mn) * idv
            if five:  # (uint8_t)(x0 + 0.5f), no clamp
                xi0 = np.int32(x0 + F_HALF) & 255
                xi1 = np.int32(x1 + F_HALF) & 255
            else:
                t0 = _trunc_i8(x0 + F_HALF)
                t1 = _trunc_i8(x1 + F_HALF)
                xi0 = (15 if 15 < t0 else t0) & 255
                xi1 = (15 if 15 < t1 else t1) & 255
            qh = _put_pair(out, b, qs, j, xi0, xi1, qh)
        if five:
            _put_qh(out, b, 4, qh)


# One kernel per type: their constant arguments let LLVM specialize the element loop (~1.6x for Q4_0).


@njit(**JIT)
def q4_0_ref(blocks, qw, nbr, out, use_qw):
    _sym_ref(blocks, out, 8, False)


@njit(**JIT)
def q5_0_ref(blocks, qw, nbr, out, use_qw):
    _sym_ref(blocks, out, 16, True)


@njit(**JIT)
def q4_1_ref(blocks, qw, nbr, out, use_qw):
    _asym_ref(blocks, out, False)


@njit(**JIT)
def q5_1_ref(blocks, qw, nbr, out, use_qw):
    _asym_ref(blocks, out, True)


@njit(**JIT)
def _lanes_weights(blocks, qw, nbr, sig, b0, S):
    """x, then weight = qw*sqrt(sigma2 + x*x) of each lane's block (sigma2 of the block's row)."""
    nb = blocks.shape[0]
    load_lanes(blocks, b0, S, X)
    for k in range(NL):
        b = b0 + k
        s = sig[b // nbr] if b < nb else F0
        off = (b % nbr) * QB
        for j in range(QB):
            x = S[X + j, k]
            S[W + j, k] = qw[off + j] * np.sqrt(s + x * x)


@njit(**JIT)
def _write_q_l(S, out, b0, qs, qh_off):
    """Pack levels S[L] of each valid lane as qs nibbles (+ the 5th bits in qh when qh_off >= 0)."""
    for k in range(live_lanes(out, b0)):
        b = b0 + k
        qh = 0
        for j in range(16):
            qh = _put_pair(out, b, qs, j, np.int32(S[L + j, k]) & 255, np.int32(S[L + 16 + j, k]) & 255, qh)
        if qh_off >= 0:
            _put_qh(out, b, qh_off, qh)


@njit(**JIT)
def q40_50_impl(blocks, qw, nbr, out, five, sig):
    """quantize_row_q4_0_impl / quantize_row_q5_0_impl: make_qx_quants(32, nmax, rmse 1, weights)."""
    nmax = 16 if five else 8
    S = np.empty((NROWS, NL), np.float32)
    for b0 in range(0, blocks.shape[0], NL):
        _lanes_weights(blocks, qw, nbr, sig, b0, S)
        make_qx(S, QB, nmax, X, W, L, TMP, D)
        for k in range(live_lanes(out, b0)):
            put_u16(out, b0 + k, 0, fp32_to_fp16(S[D, k]))
        if five:
            _write_q_l(S, out, b0, 6, 2)
        else:
            _write_q_l(S, out, b0, 2, -1)


@njit(**JIT)
def q41_51_impl(blocks, qw, nbr, out, five, sig):
    """quantize_row_q4_1_impl / quantize_row_q5_1_impl: make_qkx3_quants(32, nmax, w, -0.9, 0.05, 36)."""
    nmax = np.float32(31.0) if five else np.float32(15.0)
    S = np.empty((NROWS, NL), np.float32)
    for b0 in range(0, blocks.shape[0], NL):
        _lanes_weights(blocks, qw, nbr, sig, b0, S)
        make_qkx(S, QB, nmax, np.float32(-0.9), np.float32(0.05), 36, False, X, W, L, TMP, D, M)
        for k in range(live_lanes(out, b0)):
            b = b0 + k
            put_u16(out, b, 0, fp32_to_fp16(S[D, k]))
            put_u16(out, b, 2, fp32_to_fp16(-S[M, k]))
        if five:
            _write_q_l(S, out, b0, 8, 4)
        else:
            _write_q_l(S, out, b0, 4, -1)



def _twin(ref, impl, five):
    """The twin of one legacy type (ggml_fast's calling convention): the _ref kernel without an imatrix,
    the _impl kernel (which needs sigma2 of each whole row) with one."""

    def twin(blocks, qw, nbr, out, use_qw):
        if use_qw:
            impl(blocks, qw, nbr, out, five, row_sigma2(blocks.reshape(-1, nbr * QB)))
        else:
            ref(blocks, qw, nbr, out, use_qw)

    return twin


q4_0 = _twin(q4_0_ref, q40_50_impl, False)
q5_0 = _twin(q5_0_ref, q40_50_impl, True)
q4_1 = _twin(q4_1_ref, q41_51_impl, False)
q5_1 = _twin(q5_1_ref, q41_51_impl, True)
