"""FP8 reference kernel against torch's float8 casts (the oracle for float32 input), an exhaustive
nearest-value search (the oracle for float64 input, which torch rounds via float32), and its torch twin."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from qconvert.kernels import fp8

RNG = np.random.default_rng(20260417)
FORMATS = {
    "e4m3": (fp8.encode_e4m3, fp8.decode_e4m3, torch.float8_e4m3fn, fp8.E4M3_MAX),
    "e5m2": (fp8.encode_e5m2, fp8.decode_e5m2, torch.float8_e5m2, fp8.E5M2_MAX),
}


def torch_codes(x: np.ndarray, fmt: str) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(FORMATS[fmt][2]).view(torch.uint8).numpy()


def assert_matches_torch(x: np.ndarray, fmt: str) -> None:
    got, want = FORMATS[fmt][0](x), torch_codes(x, fmt)
    bad = np.flatnonzero(got != want)
    first = bad[:5]
    assert bad.size == 0, f"{bad.size} mismatches: x={x.ravel()[first]} got={got[first]} want={want[first]}"


def finite_grid(fmt: str) -> np.ndarray:
    """Non-negative finite fp8 values in increasing order (codes 0..max_code)."""
    return fp8.decode_table(fmt)[: fp8.fp8_format(fmt).max_code + 1].astype(np.float64)


def nearest_even_codes(x: np.ndarray, fmt: str) -> np.ndarray:
    """Independent oracle: search the value grid, ties to the even code, saturate, keep the sign."""
    grid = finite_grid(fmt)
    a = np.abs(x)
    hi = np.clip(np.searchsorted(grid, a), 1, grid.size - 1)
    lo = hi - 1
    dlo, dhi = a - grid[lo], grid[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a >= grid[-1], grid.size - 1, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def midpoints(fmt: str) -> np.ndarray:
    """Exact halfway points between fp8 neighbours (0 and min subnormal too), ±1 float32 ulp, both signs."""
    g = finite_grid(fmt)
    mid = ((g[:-1] + g[1:]) / 2).astype(np.float32)  # exact: a few significant bits only
    near = np.concatenate([mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    return np.concatenate([near, -near])


# ------------------------------------------------------------------------------------------------------------
# encode vs torch


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_encode_every_bf16_value(fmt):
    x = (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= FORMATS[fmt][3])]
    assert x.size > 30000
    assert_matches_torch(x, fmt)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_encode_random_float32(fmt):
    fmax = FORMATS[fmt][3]
    f = fp8.fp8_format(fmt)
    min_normal = 2.0 ** (1 - f.bias)
    bits = RNG.integers(0, 1 << 32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    parts = [
        bits[np.isfinite(bits) & (np.abs(bits) <= fmax)],  # every exponent, incl. float32 subnormals
        (RNG.standard_normal(1_000_000) * fmax / 6).astype(np.float32),
        RNG.uniform(-min_normal, min_normal, 500_000).astype(np.float32),  # fp8 subnormal range
        midpoints(fmt),
    ]
    x = np.clip(np.concatenate(parts), -fmax, fmax)
    assert x.size > 2_000_000
    assert_matches_torch(x, fmt)


def test_ties_to_even_and_subnormal_edges():
    sub = 2.0**-9  # E4M3 min subnormal
    half = np.float32(sub / 2)
    below, above = np.nextafter(half, np.float32(0)), np.nextafter(half, np.float32(1))
    edges = [half, below, above, 1.5 * sub, 2.5 * sub, 2.0**-6 - sub / 2]
    x = np.array([17, 19, 18, 272, 304, *edges], np.float32)
    want = [16, 20, 18, 256, 320, 0, 0, sub, 2 * sub, 2 * sub, 2.0**-6]
    np.testing.assert_array_equal(fp8.decode_e4m3(fp8.encode_e4m3(x)), np.array(want, np.float32))
    np.testing.assert_array_equal(fp8.encode_e4m3(-x), fp8.encode_e4m3(x) | 0x80)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_encode_float64_rounds_from_float64(fmt):
    fmax = FORMATS[fmt][3]
    x = np.concatenate(
        [
            RNG.standard_normal(200_000) * fmax / 4,
            RNG.uniform(-(2.0**-5), 2.0**-5, 100_000),
            midpoints(fmt).astype(np.float64),
            (midpoints(fmt).astype(np.float64) * (1 + 2.0**-40)),  # above a tie by less than a float32 ulp
        ]
    )
    x = np.clip(x, -fmax, fmax)
    np.testing.assert_array_equal(FORMATS[fmt][0](x), nearest_even_codes(x, fmt))


def test_float64_no_double_rounding():
    # via float32, 17 + 2^-30 would become the tie 17 and go to 16; from the float64 value it is nearer 18
    assert fp8.decode_e4m3(fp8.encode_e4m3(np.array([17 + 2.0**-30]))).tolist() == [18.0]
    assert fp8.decode_e4m3(fp8.encode_e4m3(np.array([17 + 2.0**-30], np.float32))).tolist() == [16.0]


def test_encode_keeps_shape_and_accepts_float16_and_big_endian():
    x = (RNG.standard_normal((3, 5, 7)) * 50).astype(np.float32)
    want = torch_codes(x, "e4m3")
    assert fp8.encode_e4m3(x).shape == (3, 5, 7)
    np.testing.assert_array_equal(fp8.encode_e4m3(x), want)
    np.testing.assert_array_equal(fp8.encode_e4m3(x.astype(">f4")), want)
    np.testing.assert_array_equal(fp8.encode_e4m3(x[:, ::2].T), torch_codes(x[:, ::2].T, "e4m3"))
    h = x.astype(np.float16)
    np.testing.assert_array_equal(fp8.encode_e4m3(h), torch_codes(h.astype(np.float32), "e4m3"))
    assert fp8.encode_e4m3(np.float32(3.0)).shape == ()
    with pytest.raises(TypeError):
        fp8.encode_e4m3(np.arange(4))
    with pytest.raises(ValueError):
        fp8.quantize_fp8(x, np.float32(1), fmt="e3m4")


# ------------------------------------------------------------------------------------------------------------
# saturation, NaN, signed zero


def test_e4m3_saturation_nan_and_zero():
    big = np.array([449, 463.99, 464, 479, 480, 1e6, 3e38, np.inf], np.float32)
    for dtype in (np.float32, np.float64):
        b = big.astype(dtype)
        assert fp8.encode_e4m3(b).tolist() == [0x7E] * big.size
        assert fp8.encode_e4m3(-b).tolist() == [0xFE] * big.size
    assert fp8.encode_e4m3(np.array([1e300, -np.inf])).tolist() == [0x7E, 0xFE]
    nan = np.array([np.nan, -np.nan], np.float32)
    assert fp8.encode_e4m3(nan).tolist() == torch_codes(nan, "e4m3").tolist() == [0x7F, 0xFF]
    assert fp8.encode_e4m3(np.array([0.0, -0.0], np.float32)).tolist() == [0x00, 0x80]
    # torch 2.13 saturates E4M3 casts too (checkpoint-formats.md §4.1): same codes
    np.testing.assert_array_equal(fp8.encode_e4m3(big), torch_codes(big, "e4m3"))


def test_e5m2_saturates_where_torch_overflows_to_inf():
    big = np.array([57345, 61439, 61440, 1e6, np.inf], np.float32)
    assert fp8.encode_e5m2(big).tolist() == [0x7B] * big.size
    assert fp8.encode_e5m2(-big).tolist() == [0xFB] * big.size
    assert torch_codes(big, "e5m2").tolist() == [0x7B, 0x7B, 0x7C, 0x7C, 0x7C]  # why we clamp first
    nan = np.array([np.nan, -np.nan, 0.0, -0.0], np.float32)
    assert fp8.encode_e5m2(nan).tolist() == torch_codes(nan, "e5m2").tolist() == [0x7F, 0xFF, 0x00, 0x80]


# ------------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_decode_all_codes(fmt):
    codes = np.arange(256, dtype=np.uint8)
    got = FORMATS[fmt][1](codes)
    want = torch.from_numpy(codes).view(FORMATS[fmt][2]).float().numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # NaN == NaN here; ±0 and ±inf by value
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_decode_encode_roundtrip_all_codes(fmt):
    enc, dec, _, _ = FORMATS[fmt]
    codes = np.arange(256, dtype=np.uint8)
    v = dec(codes)
    finite = np.isfinite(v)
    np.testing.assert_array_equal(enc(v[finite]), codes[finite])
    assert v[codes == fp8.fp8_format(fmt).max_code].item() == FORMATS[fmt][3]


# ------------------------------------------------------------------------------------------------------------
# scaled quantize / dequantize and the torch twin


def blocky_weights(n: int, k: int) -> np.ndarray:
    w = RNG.standard_normal((n, k)).astype(np.float32) * 0.02
    w *= np.exp(RNG.standard_normal((n, 1))).astype(np.float32)  # rows of different magnitude
    w[RNG.integers(0, n, 20), RNG.integers(0, k, 20)] *= 40  # outliers
    w[0, :5] = [0.0, -0.0, 1e-30, -1e-30, 0.0]
    return w


def scales(w: np.ndarray, kind: str, fmax: float) -> np.ndarray:
    n, k = w.shape
    if kind == "tensor":
        return np.array(np.abs(w).max() / fmax, np.float32)
    if kind == "row":
        return (np.abs(w).max(axis=1, keepdims=True) / fmax).astype(np.float32)
    tiles = np.abs(w).reshape(n // 128, 128, k // 128, 128).max(axis=(1, 3)) / fmax
    # the [N/128, K/128] tiles expanded to [N, K]
    return np.repeat(np.repeat(tiles.astype(np.float32), 128, axis=0), 128, axis=1)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
def test_quantize_roundtrip_error_bound(fmt, kind):
    f = fp8.fp8_format(fmt)
    w = blocky_weights(256, 1280)  # > CHUNK elements: exercises the row chunking
    s = scales(w, kind, f.max_value)
    q = fp8.quantize_fp8(w, s, fmt)
    assert q.dtype == np.uint8 and q.shape == w.shape
    d = fp8.dequantize_fp8(q, s, fmt)
    assert d.dtype == np.float32 and d.shape == w.shape
    sb = np.broadcast_to(s, w.shape).astype(np.float64)
    y = np.abs(w / sb)
    # half an fp8 ulp of y (normal: 2^-(m+1) relative; subnormal: half the min subnormal), plus float32 slack
    half_ulp = np.maximum(y * 2.0 ** -(f.man_bits + 1), 2.0 ** (-f.bias - f.man_bits))
    bound = sb * half_ulp * (1 + 2.0**-20) + np.abs(w) * 2.0**-22
    assert np.all(np.abs(d.astype(np.float64) - w) <= bound)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind", ["tensor", "row", "block", "block4d"])
def test_torch_twin_bit_exact(fmt, kind):
    w = blocky_weights(384, 512)
    fmax = FORMATS[fmt][3]
    if kind == "block4d":  # DeepSeek-style [N/128, K/128] tiles broadcast over a 4-D view of w
        tiles = scales(w, "block", fmax)[::128, ::128]
        w, s = w.reshape(3, 128, 4, 128), tiles.reshape(3, 1, 4, 1)
    else:
        s = scales(w, kind, fmax)
    s = s * np.float32(0.5)  # push some values beyond the max: the clamp path must agree too
    want = fp8.quantize_fp8(w, s, fmt)
    got = fp8.quantize_fp8_torch(torch.from_numpy(w), torch.from_numpy(np.asarray(s)), fmt=fmt)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), want)
    assert (want & 0x7F == fp8.fp8_format(fmt).max_code).any()


def test_torch_twin_default_is_e4m3_and_handles_bf16_and_zero_scale():
    w = torch.from_numpy(blocky_weights(128, 256)).to(torch.bfloat16)
    s = (w.float().abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
    s[3] = 0  # x/0 -> ±inf -> ±448, 0/0 -> NaN (x86's default NaN has the sign bit set: 0xFF)
    w[3, 0] = 0
    want = fp8.quantize_fp8(w.float().numpy(), s.float().numpy())
    np.testing.assert_array_equal(fp8.quantize_fp8_torch(w, s).numpy(), want)
    assert want[3, 0] & 0x7F == 0x7F and set(want[3, 1:].tolist()) <= {0x7E, 0xFE}


def test_module_does_not_import_torch():
    code = "import sys, qconvert.kernels.fp8; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
