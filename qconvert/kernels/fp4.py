"""FP4 E2M1 elements, shared by every FP4 format we write: GGUF's MXFP4 / NVFP4 blocks
(kernels/ggml/fp4_blocks.py and their numba twins) and the packed compressed-tensors schemes.

A code is 4 bits: sign (bit 3), 2 exponent bits, 1 mantissa bit. Magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6:

    code   0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15
    E2M1   0  0.5    1  1.5    2    3    4    6   -0 -0.5   -1 -1.5   -2   -3   -4   -6

The formats differ in how a value is rounded to a code and how codes are packed; only the element code is
shared. This module has each rounding rule once:

* ``nearest_ggml(x, d)`` -- ggml's ``best_index_mxfp4`` (ggml-quants.c): scan codes 0..15 and keep the
  first minimum of ``|kvalues_fp4[c]*d - x|`` in float32. ``kvalues_fp4`` is E2M1 *doubled* (0, 1, 2, 3, 4,
  6, 8, 12, ...), so ``d`` is half the real scale. First-minimum means: zero (and -0.0, NaN, ±inf) -> code 0,
  never 8; an exact tie between two magnitudes goes to the smaller one (toward zero); beyond 6·scale clamps
  to ±6. ggml decodes code 8 as +0 (``kvalues_fp4[8] == 0``).
* ``nearest_ggml_run`` -- the numba twin of it. It scans only the 8 magnitudes of |x|; this is the same as
  C's 16-code scan because, for x >= 0, each negative code's error ``round(a + x)`` is never below the
  positive one's ``round(|a - x|)`` (rounding is monotone, and ties keep the earlier, positive code), and for
  x < 0 every positive code's ``round(a + |x|)`` is at least code 0's ``|x|``, while code 8+c's error is
  exactly ``round(|a - |x||)``. So the answer is the first minimum m over magnitudes, made negative (m + 8)
  only when x < 0 and m > 0.
* ``encode_rne(v)`` -- round to nearest, ties to even, saturating at ±6; the sign bit is set for v < 0, so
  small negatives give code 8 (-0) while -0.0 itself gives code 0 (torch.sign(-0.0) is 0). This is
  compressed-tensors' ``cast_to_fp4`` + ``pack_fp4_to_uint8``
  (quantization/utils/fp4_utils.py, compressors/nvfp4/helpers.py), i.e. what vLLM checkpoints hold.
  Thresholds on |v|: <= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1, < 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3,
  <= 5 -> 4, else 6. It differs from ggml's rule on the ties 0.75, 1.75 and 3.5 (ggml rounds them down) and
  on the sign of zero.

``decode(codes)`` gives the true E2M1 values (code 8 = -0.0).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_fast._core import F0, JIT

F32 = np.float32

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=F32)
# kvalues_fp4 / kvalues_mxfp4 (ggml-common.h): E2M1 doubled as int8; code 8 is a plain 0
KVALUES_GGML = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=F32)
_K1, _K2, _K3, _K4, _K6, _K8, _K12 = (F32(k) for k in KVALUES_GGML[1:8])  # numba freezes these constants
_C = tuple(np.int32(c) for c in range(9))  # int32 codes keep the vector lanes 32-bit wide

# encode_rne: (upper bound on |v|, bound included) of the buckets of codes 0..6; above the last -> 7
_RNE_BOUNDS = (
    (0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True),
)  # fmt: skip


def decode(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (any integer array) -> float32 E2M1 values."""
    return E2M1[np.asarray(codes) & 0xF]


def nearest_ggml(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """best_index_mxfp4(x, d) elementwise (x and d broadcast): int32 codes 0..15, C's first minimum."""
    x = np.asarray(x, dtype=F32)
    d = np.asarray(d, dtype=F32)
    best = np.abs(KVALUES_GGML[0] * d - x)
    idx = np.zeros(np.broadcast(x, d).shape, dtype=np.int32)
    for c in range(1, 16):
        err = np.abs(KVALUES_GGML[c] * d - x)
        better = err < best  # strict: the first minimum wins, NaN never wins
        idx = np.where(better, c, idx)
        best = np.where(better, err, best)
    return idx


@njit(inline="always", **JIT)
def _keep_first_min(v, a, c, best, code):
    err = np.abs(a - v)
    better = err < best  # strict, and false for NaN: the first minimum stays (compiles to vminps + blend)
    return (err if better else best), (c if better else code)


@njit(inline="always", **JIT)
def nearest_ggml_run(x, base, n, d, codes, cbase):
    """best_index_mxfp4(x[base + j], d) for j < n into codes[cbase + j] (int32): the 8-magnitude scan of the
    module docstring, unrolled so that LLVM vectorises over j (a literal n in the caller becomes a constant
    trip count once this is inlined). The magnitudes ``KVALUES_GGML[c]*d`` are the C products."""
    a1, a2, a3, a4 = _K1 * d, _K2 * d, _K3 * d, _K4 * d
    a6, a8, a12 = _K6 * d, _K8 * d, _K12 * d
    for j in range(n):
        xv = x[base + j]
        v = np.abs(xv)
        best, code = v, _C[0]  # code 0: |0*d - x| = |x|
        best, code = _keep_first_min(v, a1, _C[1], best, code)
        best, code = _keep_first_min(v, a2, _C[2], best, code)
        best, code = _keep_first_min(v, a3, _C[3], best, code)
        best, code = _keep_first_min(v, a4, _C[4], best, code)
        best, code = _keep_first_min(v, a6, _C[5], best, code)
        best, code = _keep_first_min(v, a8, _C[6], best, code)
        best, code = _keep_first_min(v, a12, _C[7], best, code)
        codes[cbase + j] = code + (_C[8] if (xv < F0) & (code > _C[0]) else _C[0])


def encode_rne(v: np.ndarray) -> np.ndarray:
    """Already-scaled values -> uint8 E2M1 codes, round to nearest even, saturating (compressed-tensors'
    rule; finite inputs, ±inf saturate)."""
    v = np.asarray(v, dtype=F32)
    a = np.abs(v)
    mag = np.full(v.shape, 7, dtype=np.uint8)
    for code in range(6, -1, -1):  # from the top bucket down: the lowest matching bucket is written last
        bound, inclusive = _RNE_BOUNDS[code]
        below = (a <= F32(bound)) if inclusive else (a < F32(bound))
        mag = np.where(below, np.uint8(code), mag)
    return mag | ((v < 0).astype(np.uint8) << 3)


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors NVFP4 / MXFP4 weights (packed-formats-2026.md §1, §2): the numpy spec of what
# llm-compressor's QuantizationModifier + compressed-tensors' compressors write. compressed-tensors computes
# the scales in the weight's own dtype, so every step below says which rounding it does; ``dtype`` is that
# dtype's torch name ("bfloat16", "float16", "float32").

NVFP4_GROUP = 16
MXFP4_GROUP = 32
FP4_MAX = F32(6.0)
E4M3_MAX = F32(448.0)
NVFP4_EPS = F32(0.125)  # compressed-tensors' _get_dtype_eps(float8_e4m3fn): a zero local scale becomes this
_MX_OFFSET = 2  # floor(log2(6)): the E2M1 exponent offset of an E8M0 scale (mxfp_utils._MX_ELEM_OFFSET)
_MIN_NORMAL = {"bfloat16": F32(2.0**-126), "float16": F32(2.0**-14), "float32": F32(2.0**-126)}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to nearest-even in ``dtype`` and widened back to float32 (what a torch op on
    a tensor of that dtype stores: torch computes bf16/f16 arithmetic in float32 and rounds once)."""
    x = np.asarray(x, dtype=F32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(F32)
    if dtype != "bfloat16":
        raise ValueError(f"no rounding rule for {dtype!r}")
    bits = x.view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    return ((bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)).view(F32)  # finite inputs only


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (K even) -> bytes [N, K/2]: element 2j in the low nibble, 2j+1 in the high one
    (compressed-tensors' pack_fp4_to_uint8)."""
    codes = np.asarray(codes, dtype=np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of pack_nibbles: bytes [N, K/2] -> codes [N, K]."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & np.uint8(0xF)
    out[:, 1::2] = packed >> np.uint8(4)
    return out


def _groups(w: np.ndarray, group: int) -> np.ndarray:
    w = np.asarray(w, dtype=F32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input columns do not divide into groups of {group}")
    return w.reshape(n, k // group, group)


def nvfp4_global_scale(amax: float, dtype: str) -> F32:
    """``weight_global_scale`` of a tensor (or of a fused group: the max |w| over all its members):
    compressed-tensors' generate_gparam ``448 * 6 / amax`` on a tensor of the weight dtype. Python's
    ``float / tensor`` is torch's ``reciprocal(t) * float`` (Tensor.__rtruediv__), so there are two
    roundings to the weight dtype, not one. amax is clamped below by the dtype's tiny; NaN/inf -> 1.0."""
    a = max(F32(amax), _MIN_NORMAL[dtype])
    with np.errstate(over="ignore", divide="ignore"):
        r = round_to(np.array([F32(1.0) / a], dtype=F32), dtype)
        g = round_to(r * F32(E4M3_MAX * FP4_MAX), dtype)[0]
    return F32(g) if np.isfinite(g) else F32(1.0)


def nvfp4_quantize(w: np.ndarray, global_scale: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4 weight [N, K] (values of `dtype`) -> (E2M1 codes uint8 [N, K], E4M3 local scales as uint8
    bits [N, K/16]).

        local  = e4m3(clamp(global_scale * dtype(amax_16 / 6), ±448)); 0 -> 0.125
        codes  = E2M1_rne(clamp(w / (local / global_scale), ±6))            (float32 divisions)
        dequant = E2M1[code] * local / global_scale
    """
    from qconvert.kernels.fp8 import decode_e4m3, encode_e4m3

    g = _groups(w, NVFP4_GROUP)
    gs = F32(global_scale)
    local = round_to(np.abs(g).max(axis=-1) / FP4_MAX, dtype)
    scale_bits = encode_e4m3(np.clip(gs * local, -E4M3_MAX, E4M3_MAX))
    scale = decode_e4m3(scale_bits)
    zero = scale == 0
    if zero.any():
        scale_bits[zero] = encode_e4m3(NVFP4_EPS)
        scale = decode_e4m3(scale_bits)
    eff = scale / gs
    codes = encode_rne(np.clip(g / eff[..., None], -FP4_MAX, FP4_MAX))
    return codes.reshape(np.shape(w)), scale_bits


def nvfp4_dequantize(codes: np.ndarray, scales: np.ndarray, global_scale: float) -> np.ndarray:
    """float32 [N, K] as compressed-tensors decompresses it (before the cast to the model dtype); `scales`
    are the E4M3 local scales' values (float32 [N, K/16], e.g. decode_e4m3 of the stored bits)."""
    eff = np.asarray(scales, dtype=F32) / F32(global_scale)
    vals = _groups(decode(codes), NVFP4_GROUP)
    return (vals * eff[..., None]).reshape(np.shape(codes))


def mx_scale_exponents(amax: np.ndarray, dtype: str) -> np.ndarray:
    """E8M0 bytes of MX groups from their max |w| (values of `dtype`): compressed-tensors'
    round_to_power_2 (add half of the lowest E2M1-significant mantissa bit, keep sign and exponent: amax
    goes up to the next power of two iff its significand is >= 1.75, in every dtype; below the dtype's
    min normal the same bit trick gives the min normal from 0.75 of it, else 0), then
    ``clamp(127 + log2(p2) - 2, 0, 255)``. A power of two that underflows the weight dtype becomes 1.0
    (compressed-tensors' eps for an integer scale dtype), exponent 127."""
    a = np.asarray(amax, dtype=F32)
    tiny = _MIN_NORMAL[dtype]
    mant, exp = np.frexp(a)  # a = mant * 2^exp, mant in [0.5, 1)
    p2_exp = np.where(mant >= F32(0.875), exp, exp - 1)  # significand 2*mant >= 1.75 -> round up
    sub = a < tiny
    sub_up = a >= F32(0.75) * tiny
    p2_exp = np.where(sub, np.where(sub_up, np.frexp(tiny)[1] - 1, -1000), p2_exp)
    e = np.clip(127 + p2_exp - _MX_OFFSET, 0, 255).astype(np.int32)
    scale = round_to(np.ldexp(F32(1.0), e - 127).astype(F32), dtype)
    e = np.where(scale == 0, 127, e)  # underflow -> eps 1.0 -> stored 127
    return e.astype(np.uint8)


def mx_scale_values(exponents: np.ndarray) -> np.ndarray:
    """E8M0 bytes -> float32 2^(e-127) (compressed-tensors' decompress_mx_scale)."""
    return np.ldexp(F32(1.0), np.asarray(exponents, dtype=np.int32) - 127).astype(F32)


def mxfp4_quantize(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 weight [N, K] (values of `dtype`) -> (E2M1 codes uint8 [N, K], E8M0 scale bytes [N, K/32]).
    ``codes = E2M1_rne(clamp(dtype(w / 2^(e-127)), ±6))``; the division by a power of two is exact unless
    the quotient leaves the dtype's normal range, hence the rounding."""
    g = _groups(w, MXFP4_GROUP)
    e = mx_scale_exponents(np.abs(g).max(axis=-1), dtype)
    scale = round_to(mx_scale_values(e), dtype)
    with np.errstate(over="ignore"):
        x = round_to(g / scale[..., None], dtype)
    codes = encode_rne(np.clip(x, -FP4_MAX, FP4_MAX))
    return codes.reshape(np.shape(w)), e


def mxfp4_dequantize(codes: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    vals = _groups(decode(codes), MXFP4_GROUP)
    return (vals * mx_scale_values(exponents)[..., None]).reshape(np.shape(codes))


# -- fast twins (numba) of the element step: bit-identical to the reference above (tests/kernels/test_fp4.py)

_B025, _B075, _B125, _B175, _B25, _B35, _B5 = (F32(b) for b, _ in _RNE_BOUNDS)
_SIX = F32(6.0)


@njit(**JIT)
def _scaled_codes(w, eff, round_bf16, out):  # pragma: no cover - compiled
    """out[r, j] = encode_rne(clip(w[r, j] / eff[r], ±6)) (w [R, g] float32, eff [R] float32), the quotient
    first rounded to bfloat16 when round_bf16 (MXFP4's division in the weight dtype)."""
    rows, g = w.shape
    for r in range(rows):
        e = eff[r]
        for j in range(g):
            x = w[r, j] / e
            if round_bf16:
                b = np.float32(x).view(np.uint32)
                lsb = np.uint32(np.uint32(b >> np.uint32(16)) & np.uint32(1))
                b = np.uint32(np.uint32(np.uint32(b + np.uint32(0x7FFF)) + lsb) & np.uint32(0xFFFF0000))
                x = b.view(np.float32)
            x = min(max(x, -_SIX), _SIX)
            a = abs(x)
            m = np.uint8((a > _B025) + (a >= _B075) + (a > _B125) + (a >= _B175) + (a > _B25) + (a >= _B35)
                         + (a > _B5))
            out[r, j] = m | (np.uint8(8) if x < F0 else np.uint8(0))


def _fast_codes(g: np.ndarray, eff: np.ndarray, round_bf16: bool) -> np.ndarray:
    rows = g.reshape(-1, g.shape[-1])
    out = np.empty(rows.shape, dtype=np.uint8)
    _scaled_codes(np.ascontiguousarray(rows, dtype=F32), np.ascontiguousarray(eff.reshape(-1), dtype=F32),
                  round_bf16, out)
    return out.reshape(g.shape)


def nvfp4_quantize_fast(w: np.ndarray, global_scale: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """nvfp4_quantize with the element codes in numba (the scales are the reference's own code)."""
    from qconvert.kernels.fp8 import decode_e4m3, encode_e4m3

    g = _groups(w, NVFP4_GROUP)
    gs = F32(global_scale)
    local = round_to(np.abs(g).max(axis=-1) / FP4_MAX, dtype)
    scale_bits = encode_e4m3(np.clip(gs * local, -E4M3_MAX, E4M3_MAX))
    scale_bits[decode_e4m3(scale_bits) == 0] = encode_e4m3(NVFP4_EPS)
    eff = decode_e4m3(scale_bits) / gs
    return _fast_codes(g, eff, False).reshape(np.shape(w)), scale_bits


def mxfp4_quantize_fast(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """mxfp4_quantize with the element codes in numba (float16 weights take the reference: numba has no
    float16 rounding here)."""
    if dtype == "float16":
        return mxfp4_quantize(w, dtype)
    g = _groups(w, MXFP4_GROUP)
    e = mx_scale_exponents(np.abs(g).max(axis=-1), dtype)
    scale = round_to(mx_scale_values(e), dtype)
    return _fast_codes(g, scale, dtype == "bfloat16").reshape(np.shape(w)), e
