"""MXFP4 (32-weight blocks, E8M0 exponent) and NVFP4 (64-weight blocks of four 16-weight sub-blocks with
UE4M3 scales): ports of ``quantize_row_mxfp4_ref`` / ``quantize_row_nvfp4_ref`` (ggml-quants.c;
shared/reference/gguf-lowbit.md §5). Elements are E2M1 codes chosen by ggml's first-minimum search
(kernels/fp4.py). ggml ignores the imatrix for both.

Scale rules, all float32 as in C:
* MXFP4: ``amax`` is the strict running max of |x| (NaN never enters), ``e = (uint8)(floorf(log2f(amax)) - 2
  + 127)`` when amax > 0, else 0, and the codes use ``d = 2^(e-128)`` (``GGML_E8M0_TO_FP32_HALF``; subnormal
  for e < 2). The uint8 conversion goes through int on x86-64, so it wraps modulo 256: amax < 2^-125 gives
  e = 255, 254, ... and amax = inf gives e = 0 (``(int)inf`` is INT_MIN).
  ``floorf(log2f(x))`` is exact without calling log2f: it is the binary exponent n of x, plus one for the
  few values just below 2^(n+1) whose log2f rounds up to n+1 (7404 normal floats). ``LOG2F_UP`` holds, per
  exponent, the first float32 bit pattern for which that happens; it is derived at import from the C
  library's double ``log2`` rounded to float32, which equals glibc's ``log2f`` floor for every float
  (gguf-lowbit.md §5.1; tests check the table against log2f itself).
* NVFP4: per sub-block ``ue = ggml_fp32_to_ue4m3(amax / 6.0f)`` and the codes use
  ``d = ggml_ue4m3_to_fp32(ue)``, half the UE4M3 value. The encoder rounds the 4th mantissa bit half *up*
  (not to even), sends values below 2^-6 to the subnormal path ``(int)(v*512 + 0.5f)`` clamped to 7, clamps
  at 448 (0x7E) and gives 0 for v <= 0 and NaN. The decoder maps both 0x00 and 0x7F to 0 and ignores bit 7
  otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T

from .. import fp4
from .helpers import F32, BlockKernel, lanes, running_max

_MIN_EXP = -149  # exponent of the smallest subnormal


def _float_bits(n: int) -> int:
    """Bit pattern of 2^n as float32 (n = -149 .. 128; 2^128 is inf's pattern)."""
    return (n + 127) << 23 if n >= -126 else 1 << (n - _MIN_EXP)


def _log2f_round_up_bits() -> np.ndarray:
    """LOG2F_UP[n + 149] = the smallest bit pattern b in [2^n, 2^(n+1)) whose float32 log2 is n + 1
    (2^(n+1)'s own pattern when there is none). The predicate is monotone in b: bisect."""
    out = np.empty(128 - _MIN_EXP, dtype=np.uint32)
    for n in range(_MIN_EXP, 128):
        lo, hi = _float_bits(n), _float_bits(n + 1)
        while lo < hi:
            mid = (lo + hi) // 2
            x = float(np.uint32(mid).view(F32))
            if np.float32(math.log2(x)) >= n + 1:
                hi = mid
            else:
                lo = mid + 1
        out[n - _MIN_EXP] = lo
    return out


LOG2F_UP = _log2f_round_up_bits()
# GGML_E8M0_TO_FP32_HALF(e) = 2^(e-128) for every byte (bit patterns 0x00200000 << e for e < 2)
E8M0_HALF = np.ldexp(np.ones(256, dtype=F32), np.arange(256) - 128).astype(F32)


def floor_log2f(x: np.ndarray) -> np.ndarray:
    """``floorf(log2f(x))`` as int32 for finite x > 0."""
    b = np.asarray(x, dtype=F32).view(np.uint32)
    sub = b < np.uint32(1 << 23)
    n_sub = np.frexp(b.astype(np.float64))[1] - 1 + _MIN_EXP  # exact: b < 2^23
    n = np.where(sub, n_sub, (b >> np.uint32(23)).astype(np.int32) - 127).astype(np.int32)
    return n + (b >= LOG2F_UP[n - _MIN_EXP]).astype(np.int32)


def mxfp4_exponent(amax: np.ndarray) -> np.ndarray:
    """``amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0`` as int32 0..255 (x86-64 conversion)."""
    amax = np.asarray(amax, dtype=F32)
    finite = np.isfinite(amax) & (amax > 0)
    e = np.where(finite, floor_log2f(np.where(finite, amax, F32(1))) + 125, 0) & 0xFF
    return e.astype(np.int32)  # inf: (int)inf = INT_MIN, whose low byte is 0


def _ue4m3_value(code: int) -> float:
    """ggml_ue4m3_to_fp32: half the unsigned E4M3 value of a byte (bit 7 ignored; 0x00 and 0x7F are 0)."""
    if code in (0, 0x7F):
        return 0.0
    exp, man = (code >> 3) & 0xF, code & 7
    raw = math.ldexp(man, -9) if exp == 0 else math.ldexp(1 + man / 8, exp - 7)
    return raw * 0.5


UE4M3_HALF = np.array([_ue4m3_value(c) for c in range(256)], dtype=F32)


def ue4m3_encode(v: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3 (ggml-impl.h) elementwise on float32: int32 codes 0..0x7E."""
    v = np.asarray(v, dtype=F32)
    pos = v > 0  # False for NaN
    v = np.where(pos, np.minimum(v, F32(448)), F32(1))  # NaN-free stand-in where the result is 0 anyway
    bits = v.view(np.uint32)
    exp = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127 + 7
    man = ((bits >> np.uint32(20)) & np.uint32(7)).astype(np.int32)
    man_sub = np.minimum((v * F32(512) + F32(0.5)).astype(np.int32), 7)  # (int) truncates
    man = man + ((bits >> np.uint32(19)) & np.uint32(1)).astype(np.int32)  # round half up
    carry = man > 7
    exp = np.where(carry, exp + 1, exp)
    normal = np.where(exp >= 15, 0x7E, (exp << 3) | np.where(carry, 0, man))
    code = np.where(exp - carry <= 0, np.where(man_sub < 1, 0, man_sub), normal)
    return np.where(pos, code, 0).astype(np.int32)


def _pack(codes: np.ndarray, half: int) -> np.ndarray:
    """Codes [nb, groups, 2*half] -> bytes [nb, groups*half]: element j low nibble, j + half high nibble."""
    return (codes[..., :half] | (codes[..., half:] << 4)).reshape(codes.shape[0], -1).astype(np.uint8)


def _unpack(qs: np.ndarray, half: int) -> np.ndarray:
    """Inverse of _pack: bytes [nb, groups*half] -> codes [nb, groups*2*half]."""
    q = qs.reshape(qs.shape[0], -1, half)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(qs.shape[0], -1)


class MXFP4(BlockKernel):
    qtype = T.MXFP4

    @classmethod
    def quantize_rows(cls, x, qw):
        xs = lanes(x, 32)
        e = mxfp4_exponent(running_max(np.abs(xs)))  # `if (amax < fabsf(v))`: NaN never enters
        codes = fp4.nearest_ggml(xs, E8M0_HALF[e]).T  # [nb, 32]
        return np.concatenate([e.astype(np.uint8)[:, None], _pack(codes[:, None, :], 16)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = E8M0_HALF[b[:, 0]][:, None]
        return fp4.KVALUES_GGML[_unpack(b[:, 1:], 16)] * d


class NVFP4(BlockKernel):
    qtype = T.NVFP4

    @classmethod
    def quantize_rows(cls, x, qw):
        xs = lanes(x, 16)  # one lane per sub-block
        ue = ue4m3_encode(running_max(np.abs(xs)) / F32(6.0))
        codes = fp4.nearest_ggml(xs, UE4M3_HALF[ue]).T.reshape(-1, 4, 16)
        return np.concatenate([ue.astype(np.uint8).reshape(-1, 4), _pack(codes, 8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, b):
        d = np.repeat(UE4M3_HALF[b[:, :4]], 16, axis=1)
        return fp4.KVALUES_GGML[_unpack(b[:, 4:], 8)] * d


def from_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' / OpenAI's MXFP4 layout -> ggml MXFP4 blocks, moving bits (GptOssModel.repack_mxfp4):
    ``blocks`` uint8 [..., G, 16] hold element 2i in the low nibble of byte i and 2i+1 in the high one,
    ``scales`` uint8 [..., G] the E8M0 exponents; both decode 2^(e-127) x E2M1 as ggml does, so the exponent
    byte is kept and only the nibbles move (ggml: element j low, j+16 high). Returns uint8 [..., G, 17]."""
    codes = np.empty((*blocks.shape[:-1], 32), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0xF
    codes[..., 1::2] = blocks >> 4
    out = np.empty((*blocks.shape[:-1], 17), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out
