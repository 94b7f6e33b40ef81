"""Numpy reference kernels for FP8 (``float8_e4m3fn`` and ``float8_e5m2``): bit-exact encode/decode and the
scaled quantize/dequantize every FP8 writer uses (checkpoint-formats.md §4.1).

This is the executable spec; ``quantize_fp8_torch`` is the fast twin and must match it bit for bit.

Encoding rules (both formats):
  * round to nearest, ties to even, from the exact input value (float32 and float64 each rounded from
    their own bits, no detour through another float type: double rounding would break ties);
  * subnormals are produced (E4M3 min subnormal 2^-9, E5M2 2^-16); values at or below half of it -> ±0;
  * **saturating**: a finite value whose rounded magnitude exceeds the format's max, and ±inf, encode as
    ±max (E4M3 ±448 = 0x7E/0xFE, E5M2 ±57344 = 0x7B/0xFB). This is the clamp-then-cast every reference
    writer does; E5M2's inf codes (0x7C/0xFC) are never produced;
  * NaN -> 0x7F with the input's sign bit (0xFF for a negative NaN), the code torch 2.13 produces for both
    formats; -0.0 -> 0x80.
Decoding is exact to float32; every NaN code decodes to NaN and E5M2's 0x7C/0xFC to ±inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

E4M3_MAX = 448.0
E5M2_MAX = 57344.0

CHUNK = 1 << 18  # elements per encode pass: temporaries stay cache-sized (measured ~2x faster than 1 << 22)


@dataclass(frozen=True)
class Fp8Format:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_code: int  # largest finite magnitude code; encode saturates to it
    max_value: float
    has_inf: bool  # E5M2 is IEEE-like (exponent 31 = inf/NaN); E4M3fn only reserves S.1111.111 for NaN


E4M3 = Fp8Format("e4m3", exp_bits=4, man_bits=3, bias=7, max_code=0x7E, max_value=E4M3_MAX, has_inf=False)
E5M2 = Fp8Format("e5m2", exp_bits=5, man_bits=2, bias=15, max_code=0x7B, max_value=E5M2_MAX, has_inf=True)
FORMATS = {f.name: f for f in (E4M3, E5M2)}
NAN_CODE = 0x7F

# source float layout: (unsigned view dtype, mantissa bits, exponent bias)
_SOURCE = {
    np.dtype(np.float32): (np.uint32, 23, 127),
    np.dtype(np.float64): (np.uint64, 52, 1023),
}
_SIGNED = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def fp8_format(fmt: str) -> Fp8Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown fp8 format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


# ------------------------------------------------------------------------------------------------------------
# encode: integer rounding on the source float's bits


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind == "f" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # big-endian input: the bit tricks need native words
    if x.dtype == np.float16:
        return x.astype(np.float32)  # exact widening
    if x.dtype not in _SOURCE:
        raise TypeError(f"fp8 encode needs a float16/32/64 array, got {x.dtype}")
    return x


def _rne_shift(v: np.ndarray, s: np.ndarray, one: np.generic) -> np.ndarray:
    """``round(v / 2**s)`` with ties to even, for unsigned ints and per-element shifts ``s >= 1``."""
    half_minus_one = (one << (s - one)) - one
    odd = (v >> s) & one
    return (v + half_minus_one + odd) >> s  # adding the lsb turns an exact tie into a round-up only when odd


def _encode_chunk(x: np.ndarray, f: Fp8Format) -> np.ndarray:
    u, src_man, src_bias = _SOURCE[x.dtype]
    nbits = x.itemsize * 8
    bits = x.view(u)
    sign = (bits >> u(nbits - 8)).astype(np.uint8) & np.uint8(0x80)
    mag = bits & u((1 << (nbits - 1)) - 1)
    efield = (mag >> u(src_man)).view(_SIGNED[x.dtype])
    # significand with the implicit bit; source subnormals keep 0 (they are far below any fp8 subnormal)
    sig = (mag & u((1 << src_man) - 1)) | ((efield != 0).astype(u) << u(src_man))
    # unbiased exponent relative to fp8's min normal exponent (1 - bias): >= 0 means fp8-normal range
    rel = efield - (src_bias + 1 - f.bias)
    # fp8-normal: keep man_bits fraction bits; each step below min normal shifts one more bit out.
    # The shift is capped at src_man + 2, where everything (sig < 2^(src_man+1)) already rounds to 0.
    shift = np.clip(-rel, 0, f.man_bits + 2).view(u) + u(src_man - f.man_bits)
    rounded = _rne_shift(sig, shift, u(1))
    # for normals, sig carries the implicit 1 at bit man_bits, so (rel << man_bits) + rounded is exactly the
    # exponent|mantissa code, and a mantissa carry rolls into the exponent by itself
    code = (np.maximum(rel, 0).view(u) << u(f.man_bits)) + rounded
    code = np.minimum(code, u(f.max_code)).astype(np.uint8)  # saturate finite overflow and inf
    code[np.isnan(x)] = NAN_CODE
    return code | sign


def _encode(x: np.ndarray, f: Fp8Format) -> np.ndarray:
    x = _as_float(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for i in range(0, flat.size, CHUNK):
        out[i : i + CHUNK] = _encode_chunk(flat[i : i + CHUNK], f)
    return out.reshape(x.shape)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """Float array -> ``float8_e4m3fn`` bit patterns (uint8, same shape); RNE, saturating to ±448."""
    return _encode(x, E4M3)


def encode_e5m2(x: np.ndarray) -> np.ndarray:
    """Float array -> ``float8_e5m2`` bit patterns (uint8, same shape); RNE, saturating to ±57344."""
    return _encode(x, E5M2)


# ------------------------------------------------------------------------------------------------------------
# decode: a 256-entry table built from the format definition


@cache
def decode_table(fmt: str) -> np.ndarray:
    """float32 value of every code 0..255 (read-only)."""
    f = fp8_format(fmt)
    codes = np.arange(256)
    efield = (codes >> f.man_bits) & ((1 << f.exp_bits) - 1)
    man = codes & ((1 << f.man_bits) - 1)
    # subnormals share the min normal exponent without the implicit 1
    frac = np.where(efield == 0, man, man + (1 << f.man_bits)).astype(np.float64)
    mag = np.ldexp(frac, np.maximum(efield, 1) - f.bias - f.man_bits)
    top = efield == (1 << f.exp_bits) - 1
    if f.has_inf:
        mag = np.where(top, np.where(man == 0, np.inf, np.nan), mag)
    else:
        mag = np.where(top & (man == (1 << f.man_bits) - 1), np.nan, mag)
    table = np.where(codes >= 128, -mag, mag).astype(np.float32)
    table.flags.writeable = False
    return table


def _decode(b: np.ndarray, fmt: str) -> np.ndarray:
    b = np.asarray(b)
    if b.dtype != np.uint8:
        raise TypeError(f"fp8 decode needs a uint8 array, got {b.dtype}")
    return decode_table(fmt)[b]


def decode_e4m3(b: np.ndarray) -> np.ndarray:
    """``float8_e4m3fn`` bit patterns (uint8) -> float32, exact; 0x7F/0xFF -> NaN."""
    return _decode(b, "e4m3")


def decode_e5m2(b: np.ndarray) -> np.ndarray:
    """``float8_e5m2`` bit patterns (uint8) -> float32, exact; 0x7C/0xFC -> ±inf, 0x7D..0x7F|sign -> NaN."""
    return _decode(b, "e5m2")


# ------------------------------------------------------------------------------------------------------------
# scaled quantize / dequantize (scale convention: dequant = fp8 * scale, scale = amax / max)


def _row_chunks(shape: tuple[int, ...]) -> list[slice]:
    """Slices of the leading axis holding about CHUNK elements each: w / scale is never materialised whole."""
    if not shape:
        return [slice(None)]
    per_row = max(1, int(np.prod(shape[1:])))
    step = max(1, CHUNK // per_row)
    return [slice(i, i + step) for i in range(0, shape[0], step)] or [slice(0, 0)]


def quantize_fp8(w: np.ndarray, scale: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """``encode(clip(w / scale, -max, max))`` in float32 (w and scale broadcast) -> uint8 codes.

    Spec of the torch fast path: ``(w.float() / scale.float()).clamp(-max, max).to(float8)``. Division by a
    zero scale gives ±inf -> ±max and 0/0 gives NaN -> the NaN code, as in torch.
    """
    f = fp8_format(fmt)
    w = np.asarray(w).astype(np.float32, copy=False)
    scale = np.asarray(scale).astype(np.float32, copy=False)
    shape = np.broadcast_shapes(w.shape, scale.shape)
    wb, sb = np.broadcast_to(w, shape), np.broadcast_to(scale, shape)
    out = np.empty(shape, np.uint8)
    for rows in _row_chunks(shape):
        # a zero scale is defined (x/0 -> ±max, 0/0 -> NaN code), as in torch: no warnings
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.clip(wb[rows] / sb[rows], np.float32(-f.max_value), np.float32(f.max_value))
        out[rows] = _encode(y, f)
    return out


def dequantize_fp8(q: np.ndarray, scale: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """``decode(q) * scale`` in float32 (q and scale broadcast)."""
    return _decode(q, fmt) * np.asarray(scale).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------------------
# fast twin


def quantize_fp8_torch(w: torch.Tensor, scale: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """Torch twin of ``quantize_fp8``: uint8 view of ``(w / scale).clamp(-max, max).to(float8)``.

    The explicit clamp makes it saturate on every torch version (older casts overflow to NaN/inf).
    """
    import torch  # lazy: the numpy spec must not need torch

    f = fp8_format(fmt)
    dtype = torch.float8_e4m3fn if f is E4M3 else torch.float8_e5m2
    y = (w.float() / scale.float()).clamp(-f.max_value, f.max_value)
    return y.to(dtype).view(torch.uint8)
