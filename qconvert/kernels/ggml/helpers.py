"""Shared pieces of ggml's reference quantizers (ggml/src/ggml-quants.c), as NumPy over many groups at once.

Layout: a group of n elements that is quantized together (a block or sub-block) is one *column* of a 2-D
float32 array shaped ``[n, lanes]``: element axis first, so each step of a left-to-right loop reads one
contiguous row and works on every lane at once.

Bit-exactness rules (reference/gguf.md §2.4) that every function here follows:
* float32 everywhere; integer levels are converted to float32 before they meet a float.
* every sum is a strict left-to-right loop (``seqsum``), never ``np.sum`` (pairwise).
* the operand order of each C expression is kept: ``w*x*l`` is ``(w*x)*l``.
* ties: argmax/argmin keep the first element, "better" tests are strict.
* C integer stores wrap (``uint8_t`` / ``int8_t``) and are reproduced with masks.
Where the C code stops iterating early (``if (!n_changed) break``), running the remaining sweeps is
harmless: a sweep that changes nothing leaves the state as it was, so the next one changes nothing either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ...errors import BadInput

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
CHUNK_WEIGHTS = 1 << 17  # weights per quantize_rows call: large enough to amortise the per-element loops

# kvalues_iq4nl (ggml-common.h): the non-linear 4-bit grid of IQ4_NL / IQ4_XS
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32
)


# ---------------------------------------------------------------------------------------------- scalars


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (round half to even).

    Ported bit for bit so that NaN/inf/huge inputs give the same garbage C gives."""
    v = (np.asarray(f, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (v & 0x007FFFFF) - 0x00400000


def fp16_bits(f: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (ggml-impl.h): IEEE round-to-nearest-even, any NaN becomes sign|0x7E00."""
    f = np.asarray(f, dtype=F32)
    w = f.view(np.uint32)
    base = (np.abs(f) * F32(2.0**112)) * F32(2.0**-110)
    shl1_w = w + w  # uint32 arithmetic wraps, as in C
    sign = w & np.uint32(0x80000000)
    bias = np.maximum(shl1_w & np.uint32(0xFF000000), np.uint32(0x71000000))
    base = ((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(F32) + base
    bits = base.view(np.uint32)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    out = (sign >> np.uint32(16)) | np.where(shl1_w > np.uint32(0xFF000000), np.uint32(0x7E00), nonsign)
    return out.astype(np.uint16)


def fp16_to_f32(h: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32: exact widening, as NumPy's except for signaling NaNs: ggml's conversion ends in a
    float multiply, which sets the quiet bit (0x7D00 -> 0x7FE00000, NumPy keeps 0x7FA00000)."""
    f = np.asarray(h, dtype=np.uint16).view(np.float16).astype(F32)
    quiet = f.view(np.uint32) | np.uint32(0x00400000)
    return np.where(np.isnan(f), quiet.view(F32), f)


def fp16_round(f: np.ndarray) -> np.ndarray:
    """The float32 value ggml reads back after storing ``f`` as fp16."""
    return fp16_to_f32(fp16_bits(f))


def wrap_u8(v: np.ndarray) -> np.ndarray:
    """C store into uint8_t (modulo 256), kept as int32 for further arithmetic."""
    return np.asarray(v).astype(np.int32) & 0xFF


def wrap_i8(v: np.ndarray) -> np.ndarray:
    """C store into int8_t (two's complement wrap), kept as int32."""
    return ((np.asarray(v).astype(np.int32) + 128) & 0xFF) - 128


def le_bytes(v: np.ndarray, dtype: str) -> np.ndarray:
    """[lanes] values -> [lanes, itemsize] little-endian bytes."""
    a = np.ascontiguousarray(np.asarray(v).astype(dtype))
    return a.view(np.uint8).reshape(a.shape[0], -1)


def fp16_bytes(f: np.ndarray) -> np.ndarray:
    """[lanes] float32 -> [lanes, 2] bytes of the fp16 ggml stores."""
    return le_bytes(fp16_bits(f), "<u2")


def read_fp16(b: np.ndarray) -> np.ndarray:
    """[lanes, 2] bytes -> [lanes] float32."""
    return fp16_to_f32(np.ascontiguousarray(b).view("<u2")[:, 0])


# ---------------------------------------------------------------------------------------------- reductions


def seqsum(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for i: s += a[i]`` over axis 0, strictly left to right."""
    s = np.zeros(a.shape[1:], dtype=F32)
    for row in a:
        s += row
    return s


def seqsum_from_first(a: np.ndarray) -> np.ndarray:
    """``float s = a[0]; for i >= 1: s += a[i]`` (differs from seqsum only for a leading -0.0)."""
    s = a[0].astype(F32, copy=True)
    for row in a[1:]:
        s += row
    return s


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``if (fabsf(x) > amax) {amax = fabsf(x); max = x;}`` from 0: (amax, signed max), first occurrence."""
    amax = np.zeros(x.shape[1:], dtype=F32)
    smax = np.zeros(x.shape[1:], dtype=F32)
    for row in x:
        ax = np.abs(row)
        upd = ax > amax
        amax = np.where(upd, ax, amax)
        smax = np.where(upd, row, smax)
    return amax, smax


def running_max(x: np.ndarray) -> np.ndarray:
    """``float m = 0; if (x > m) m = x;`` over axis 0."""
    m = np.zeros(x.shape[1:], dtype=F32)
    for row in x:
        m = np.where(row > m, row, m)
    return m


def macro_max(x: np.ndarray, from_first: bool = False) -> np.ndarray:
    """``float m = 0; m = MAX(m, x)`` with ggml's macro ``(a) > (b) ? (a) : (b)`` over axis 0; with
    ``from_first``, ``m = x[0]`` and the rest (they differ for negative values and NaN)."""
    m = x[0].astype(F32, copy=True) if from_first else np.zeros(x.shape[1:], dtype=F32)
    for row in x[1:] if from_first else x:
        m = np.where(m > row, m, row)
    return m


def lanes(x: np.ndarray, n: int) -> np.ndarray:
    """[..., k*n] row-major -> [n, lanes] (one group of n consecutive elements per lane)."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, n).T)


def unlanes(L: np.ndarray, nblocks: int) -> np.ndarray:
    """[n, lanes] -> [nblocks, lanes*n/nblocks]: inverse of ``lanes`` for level arrays."""
    return np.ascontiguousarray(L.T).reshape(nblocks, -1)


# ---------------------------------------------------------------------------------------------- searches


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric levels in [-nmax, nmax-1].

    Returns (scale [lanes], L = level + nmax, int32 [n, lanes]); all-zero lanes give scale 0, L 0."""
    amax, smax = first_absmax(x)
    w = x * x if qw is None else qw
    wx = w * x

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)

    def sums(lv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = lv.astype(F32)
        return seqsum(wx * lf), seqsum((w * lf) * lf)

    L = levels(F32(-nmax) / smax)
    sumlx, suml2 = sums(L)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv = levels(-(F32(nmax) + F32(0.1) * F32(step)) / smax)
        sumlx, suml2 = sums(lv)
        accept = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        L = np.where(accept, lv, L)
        scale = np.where(accept, new_scale, scale)
        best = np.where(accept, new_scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): x²-weighted levels refined by coordinate descent.

    Returns (scale, L = level + nmax)."""
    amax, smax = first_absmax(x)
    w = x * x
    wx = w * x
    L = np.clip(nearest_int((F32(-nmax) / smax) * x), -nmax, nmax - 1)
    lf = L.astype(F32)
    sumlx = seqsum(wx * lf)
    suml2 = seqsum((w * lf) * lf)
    sumlx, suml2 = refine_levels(x, w, L, sumlx, suml2, lambda v: np.clip(v, -nmax, nmax - 1), lambda v: v,
                                 new_sl2_positive=True)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def refine_levels(
    x: np.ndarray,
    w: np.ndarray,
    L: np.ndarray,
    sumlx: np.ndarray,
    suml2: np.ndarray,
    clamp: Callable[[np.ndarray], np.ndarray],
    store: Callable[[np.ndarray], np.ndarray],
    new_sl2_positive: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate descent that ends make_q3_quants and make_qp_quants: up to five sweeps; in each,
    element i moves to ``clamp(nearest_int(x*sl2/slx))`` (sums without i) when that raises
    sumlx²/suml2. L (int32 [n, lanes], as C stores it: ``store``) is updated in place; returns the final
    (sumlx, suml2). C tests ``slx > 0`` and, make_q3_quants, the new ``sl2 > 0`` (new_sl2_positive), or,
    make_qp_quants, the old one."""
    wx = w * x
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = L[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = clamp(nearest_int((x[i] * sl2) / slx))
            nl = new_l.astype(F32)
            slx_new = slx + wx[i] * nl
            sl2_new = sl2 + (w[i] * nl) * nl
            accept = (
                (slx > 0)
                & ((sl2_new if new_sl2_positive else sl2) > 0)
                & (new_l != L[i])
                & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
            )
            L[i] = np.where(accept, store(new_l), L[i])
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
            changed = changed or bool(accept.any())
        if not changed:
            break
    return sumlx, suml2


def make_qkx_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    strict_degenerate: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (``strict_degenerate=False``: all-equal test ``max == min``) and make_qkx3_quants
    with explicit weights (``max <= min``): asymmetric levels in [0, nmax] with a min.

    Returns (scale, the_min = -min, L int32 [n, lanes]). The accepted candidate's min replaces ``min``
    for all later steps, as in C."""
    mn = x[0].copy()
    mx = x[0].copy()
    for row in x[1:]:
        mn = np.where(row < mn, row, mn)
        mx = np.where(row > mx, row, mx)
    sum_w = seqsum_from_first(w)
    sum_x = seqsum_from_first(w * x)
    mn = np.where(mn > 0, F32(0), mn)
    degenerate = (mx <= mn) if strict_degenerate else (mx == mn)
    min0 = mn

    def err(scale: np.ndarray, lf: np.ndarray, m: np.ndarray) -> np.ndarray:
        diff = (scale * lf + m) - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
    best = err(scale, L.astype(F32), mn)
    for step in range(nstep + 1):
        iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / (mx - mn)
        la = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
        laf = la.astype(F32)
        wl = w * laf
        sum_l = seqsum(wl)
        sum_l2 = seqsum(wl * laf)
        sum_xl = seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, laf, this_min)
        accept = (D > 0) & (cur < best)
        L = np.where(accept, la, L)
        best = np.where(accept, cur, best)
        scale = np.where(accept, this_scale, scale)
        mn = np.where(accept, this_min, mn)
    scale = np.where(degenerate, F32(0), scale)
    mn = np.where(degenerate, min0, mn)
    return scale, -mn, np.where(degenerate, 0, L)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights): quantizes non-negative values (sub-block scales or
    mins) to [0, nmax]. Returns (scale, L) with L as the uint8 C stores (wrapped)."""
    mx = macro_max(x)
    wx = qw * x

    def mse(scale: np.ndarray, lv: np.ndarray) -> np.ndarray:
        diff = x - scale * lv.astype(F32)
        return seqsum((qw * diff) * diff)

    iscale = F32(nmax) / mx
    best_mse = mse(F32(1) / iscale, wrap_u8(nearest_int(iscale * x)))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
        cur = mse(F32(1) / iscale_is, np.minimum(nmax, nearest_int(iscale_is * x)))
        accept = cur < best_mse
        best_mse = np.where(accept, cur, best_mse)
        iscale = np.where(accept, iscale_is, iscale)
    lv = np.minimum(nmax, nearest_int(iscale * x))
    lf = lv.astype(F32)
    sumlx = seqsum(wx * lf)
    suml2 = seqsum((qw * lf) * lf)
    L = wrap_u8(lv)
    sumlx, suml2 = refine_levels(x, qw, L, sumlx, suml2, lambda v: np.minimum(nmax, v), wrap_u8,
                                 new_sl2_positive=False)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = mx < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def best_index_iq4nl(al: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, x): nearest grid index, exact ties go to the upper index."""
    kv = KVALUES_IQ4NL
    mu = np.clip(np.searchsorted(kv, al, side="right"), 1, 15)  # first value > al, as the binary search
    idx = np.where((al - kv[mu - 1]) < (kv[mu] - al), mu - 1, mu)
    idx = np.where(al >= kv[15], 15, idx)
    return np.where(al <= kv[0], 0, idx).astype(np.int32)


# ---------------------------------------------------------------------------------------------- class base


class BlockKernel:
    """One GGUF block type: ``quantize(x [nrows, n_per_row], imatrix)`` -> bytes, ``dequantize`` back.

    Subclasses set ``qtype`` and implement ``quantize_rows`` (whole rows: some paths need per-row sums)
    and ``dequantize_blocks`` ([nblocks, type_size] uint8 -> [nblocks, block_size] float32). The float
    types F32/F16/BF16 set ``quantized = False`` (ggml_is_quantized). They are registered once, in
    qconvert.kernels.registry."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    quantized: ClassVar[bool] = True
    # ggml_quantize_requires_imatrix (ggml.c:8059): ggml aborts without one; quantize raises BadInput
    requires_imatrix: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "qtype" in cls.__dict__:
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]

    @classmethod
    def quantize(cls, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        if imatrix is None and cls.requires_imatrix:
            raise missing_imatrix(cls.qtype.name)
        rows = as_rows(x, cls.block_size, cls.qtype)
        nrows, n_per_row = rows.shape
        qw = as_imatrix(imatrix, n_per_row)
        out = np.empty((nrows, n_per_row // cls.block_size * cls.type_size), dtype=np.uint8)
        step = max(1, CHUNK_WEIGHTS // n_per_row)  # rows are independent: chunking bounds the scratch memory
        with np.errstate(all="ignore"):  # masked lanes divide by zero, like the C code does
            for r in range(0, nrows, step):
                out[r : r + step] = cls.quantize_rows(rows[r : r + step], qw).reshape(-1, out.shape[1])
        return out

    @classmethod
    def dequantize(cls, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.uint8)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.shape[-1] % cls.type_size:
            raise ValueError(
                f"{cls.qtype.name}: row of {q.shape[-1]} bytes is not a multiple of {cls.type_size}"
            )
        blocks = np.ascontiguousarray(q).reshape(-1, cls.type_size)
        with np.errstate(all="ignore"):
            y = cls.dequantize_blocks(blocks)
        return y.astype(F32, copy=False).reshape(*q.shape[:-1], -1)

    @classmethod
    def quantize_rows(cls, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def missing_imatrix(what: str) -> BadInput:
    """A type ggml quantizes only with an imatrix (IQ2_XXS, IQ2_XS, IQ1_S), asked for without one."""
    return BadInput(f"{what} needs an importance matrix (llama.cpp aborts without one): "
                    "make one with `qconvert imatrix`")


def as_rows(x: np.ndarray, block: int, qtype: GGMLQuantizationType) -> np.ndarray:
    """Validate/convert the input to C-contiguous float32 [nrows, n_per_row]."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{qtype.name}: expected a 2-D [nrows, n_per_row] array, got shape {x.shape}")
    if x.shape[1] % block:
        raise ValueError(f"{qtype.name}: row length {x.shape[1]} is not a multiple of the block size {block}")
    return np.ascontiguousarray(x, dtype=F32)


def as_imatrix(imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    qw = np.ascontiguousarray(imatrix, dtype=F32).reshape(-1)
    if qw.shape[0] != n_per_row:
        raise ValueError(f"imatrix has {qw.shape[0]} values, expected one per column ({n_per_row})")
    return qw


def row_sigma2(x: np.ndarray) -> np.ndarray:
    """``sum_x2 = Σ_row x*x`` (left to right over the whole row) ``/ n_per_row``: [nrows]."""
    return seqsum(np.ascontiguousarray((x * x).T)) / F32(x.shape[1])


def block_sumx2(x: np.ndarray) -> np.ndarray:
    """Σ x*x over each QK_K super-block, left to right: x [nrows, n] -> [nrows*n/256]."""
    return seqsum(lanes(x * x, QK_K))


def block_sigma2(x: np.ndarray, twice: bool = False) -> np.ndarray:
    """sigma2 of each QK_K super-block as the K-quant and lattice ``_impl`` functions compute it:
    ``sum_x2/QK_K``, or ``2*sum_x2/QK_K`` (twice) [nrows*n/256]."""
    sumx2 = block_sumx2(x)
    return (F32(2) * sumx2) / F32(QK_K) if twice else sumx2 / F32(QK_K)


def impl_weights(x: np.ndarray, qw: np.ndarray, n: int, sigma2: np.ndarray) -> np.ndarray:
    """The ``_impl`` functions' weights ``qw[j] * sqrtf(sigma2 + x*x)`` in lanes of n; sigma2 holds one
    value per equal span of x (a row, a super-block or a block), in order."""
    xs = lanes(x, n)
    sig = np.repeat(sigma2, xs.shape[1] // sigma2.size)
    return lanes(np.broadcast_to(qw, x.shape), n) * np.sqrt(sig + xs * xs)


def lattice_weights(x: np.ndarray, qw: np.ndarray | None, n: int) -> np.ndarray:
    """The weights of the IQ3_* and IQ1_* quantizers in lanes of n: ``x*x`` without an imatrix, else
    ``qw * sqrtf(sigma2 + x*x)`` with sigma2 = 2*sum_x2/QK_K of the super-block."""
    if qw is None:
        xs = lanes(x, n)
        return xs * xs
    return impl_weights(x, qw, n, block_sigma2(x, twice=True))
