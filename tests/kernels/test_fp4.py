"""qconvert.kernels.fp4, the E2M1 element code shared by GGUF MXFP4/NVFP4 and the packed FP4 schemes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

from qconvert.kernels import fp4

F32 = np.float32


def _values() -> np.ndarray:
    """Every E2M1 value and midpoint times a spread of scales, their float32 neighbours, random values,
    ±0, ±inf and NaN."""
    grid = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 12, 1e3], F32)
    v = np.concatenate([grid * F32(s) for s in (1, 0.5, 2.0**-9, 2.0**-130, 3e-3, 2.0**110)])
    v = np.concatenate([v, np.nextafter(v, F32(0)), np.nextafter(v, F32(np.inf))])
    v = np.concatenate([v, np.random.default_rng(0).standard_normal(4000).astype(F32) * 3])
    v = np.concatenate([v, -v, [np.inf, -np.inf, np.nan, -np.nan]])
    return v.astype(F32)


def test_tables() -> None:
    assert np.array_equal(fp4.KVALUES_GGML, fp4.E2M1 * 2)
    assert np.signbit(fp4.E2M1[8]) and not np.signbit(fp4.KVALUES_GGML[8])  # ggml decodes code 8 as +0
    assert np.array_equal(fp4.decode(np.arange(32)), np.tile(fp4.E2M1, 2))


def test_nearest_ggml_is_the_first_minimum() -> None:
    """The literal search: zero and NaN -> code 0, ties toward zero, saturation at ±6·scale; ±inf -> code 0
    (every error is inf, so the first code stays)."""
    d = F32(0.5)  # half-scale: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
    x = np.array([0.0, -0.0, np.nan, 0.25, -0.25, 0.75, 1.75, 2.5, 3.5, 5.0, -5.0, 5.01, 100, -np.inf], F32)
    want = [0, 0, 0, 0, 0, 1, 3, 4, 5, 6, 14, 7, 7, 0]
    assert fp4.nearest_ggml(x, d).tolist() == want


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 12·2^127 overflows, as in C
def test_fast_search_equals_the_literal_one() -> None:
    """nearest_ggml_run scans 8 magnitudes of |x| where C scans 16 codes: equal for every value and scale,
    including scales so small that many errors round to the same float and so large that 12·d is inf."""
    x = _values()
    codes = np.empty(x.size, np.int32)
    for d in (0.5, 0.25, 1.0, 3.0, 2.0**-128, 2.0**-10, 1e-30, 2.0**126, 2.0**127, 240.0, 0.0):
        fp4.nearest_ggml_run(x, 0, x.size, F32(d), codes, 0)
        want = fp4.nearest_ggml(x, F32(d))
        bad = np.flatnonzero(codes != want)
        assert bad.size == 0, f"d={d}: x={x[bad[:5]]} fast {codes[bad[:5]]} literal {want[bad[:5]]}"


def test_encode_rne_matches_compressed_tensors() -> None:
    """encode_rne == compressed-tensors' cast_to_fp4 + pack_fp4_to_uint8 (finite values, ±0 included: -0.0 is
    code 0, a negative that rounds to zero code 8), and
    decode == its unpack_fp4_from_uint8 for every code."""
    v = _values()
    v = v[np.isfinite(v)]
    v = v[: v.size // 2 * 2]
    t = torch.from_numpy(v.copy()).reshape(1, -1)
    packed = pack_fp4_to_uint8(cast_to_fp4(t.clone())).numpy().reshape(-1)
    codes = fp4.encode_rne(v)
    assert np.array_equal(codes[0::2] | (codes[1::2] << 4), packed)
    all_codes = np.arange(16, dtype=np.uint8)
    pairs = torch.from_numpy(all_codes[0::2] | (all_codes[1::2] << 4)).reshape(1, -1)
    theirs = unpack_fp4_from_uint8(pairs, 1, 16, dtype=torch.float32).numpy().reshape(-1)
    assert np.array_equal(fp4.decode(all_codes).view(np.uint32), theirs.view(np.uint32))


def test_the_two_rules_differ_only_on_ties_and_zero_signs() -> None:
    d = F32(0.5)  # real scale 1
    x = np.array([0.75, 1.75, 3.5, -0.75, -0.1, -0.0, 0.3, 2.4, 5.5], F32)
    assert fp4.nearest_ggml(x, d).tolist() == [1, 3, 5, 9, 0, 0, 1, 4, 7]
    assert fp4.encode_rne(x).tolist() == [2, 4, 6, 10, 8, 0, 1, 4, 7]


# -- compressed-tensors NVFP4 / MXFP4 weights: the reference equals compressed-tensors' own functions ------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _weight(dtype: torch.dtype, group: int) -> torch.Tensor:
    """Log-normal magnitudes (several decades per row), plus groups that are all zero, tiny, exactly at the
    MX round-up threshold (significand 1.75) and just below it, and a group holding an exact -0.0."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 8 * group, generator=g) * torch.exp(torch.randn(48, 8 * group, generator=g)) * 0.02
    w[0, :group] = 0
    w[1, :group] = 2.0**-12 if dtype == torch.float16 else 2.0**-100
    w[2, :group] = torch.linspace(-1, 1, group) * 1.75 * 2.0**-5
    w[3, :group] = torch.linspace(-1, 1, group) * 1.6875 * 2.0**-5
    w[4, 1] = -0.0
    return w.to(dtype)


def _ct_minmax(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's memoryless_minmax observer on a weight: min/max per (row, group)."""
    g = w.reshape(1, w.shape[0], -1, group)
    return g.amin(dim=(0, -1)), g.amax(dim=(0, -1))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nvfp4_reference_equals_compressed_tensors(dtype: str) -> None:
    """global scale (generate_gparam), local E4M3 scales (calculate_qparams) and packed codes (quantize +
    pack_fp4_to_uint8) of the NVFP4A16 preset, bit for bit, in every weight dtype; and the dequantized
    weight equals compressed-tensors' decompressor's."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    w = _weight(DTYPES[dtype], 16)
    lo, hi = _ct_minmax(w, 16)
    absmax = torch.max(-lo.min(), hi.max())
    gs = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    scale, _ = calculate_qparams(lo, hi, scheme.weights, global_scale=gs)
    scale = scale.to(torch.float8_e4m3fn).to(w.dtype)  # llm-compressor keeps weight_scale in the weight dtype
    q = quantize(x=w, scale=scale, global_scale=gs, zero_point=None, args=scheme.weights)
    packed = pack_fp4_to_uint8(q)

    wn = w.float().numpy()
    ours_gs = fp4.nvfp4_global_scale(float(np.abs(wn).max()), dtype)
    codes, scale_bits = fp4.nvfp4_quantize(wn, ours_gs, dtype)
    assert ours_gs == gs.item()
    assert np.array_equal(scale_bits, scale.to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    assert np.array_equal(fp4.pack_nibbles(codes), packed.numpy())
    assert np.array_equal(fp4.unpack_nibbles(fp4.pack_nibbles(codes)), codes)

    state = {"weight_packed": packed, "weight_scale": scale.to(torch.float8_e4m3fn),
             "weight_global_scale": gs}
    theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"].float().numpy()
    ours = fp4.nvfp4_dequantize(codes, scale.float().numpy(), ours_gs)
    assert np.array_equal(fp4.round_to(ours, "bfloat16"), theirs)  # it decompresses to bf16


def test_nvfp4_global_scale_rounds_twice() -> None:
    """``448*6 / amax`` on a bf16 tensor is reciprocal-then-multiply (Tensor.__rtruediv__), two bf16
    roundings: a single rounding of 2688/amax differs for ~27% of bf16 values (e.g. amax 0.00811768)."""
    from compressed_tensors.quantization.utils import generate_gparam

    a = torch.tensor([0.00811768], dtype=torch.bfloat16)
    single = fp4.round_to(np.float32(2688) / a.float().numpy(), "bfloat16")[0]
    ct = generate_gparam(-a, a).item()
    assert fp4.nvfp4_global_scale(a.item(), "bfloat16") == ct == 329728.0 != single


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mxfp4_reference_equals_compressed_tensors(dtype: str) -> None:
    """E8M0 exponents (calculate_qparams' generate_mx_scales + compress_mx_scale) and packed codes of the
    MXFP4A16 preset, bit for bit, in every weight dtype; dequantized = the decompressor's."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    w = _weight(DTYPES[dtype], 32)
    lo, hi = _ct_minmax(w, 32)
    scale, _ = calculate_qparams(lo, hi, scheme.weights)
    packed = pack_fp4_to_uint8(quantize(x=w, scale=scale, zero_point=None, args=scheme.weights))
    exponents = compress_mx_scale(scale, torch.uint8)

    codes, ours_e = fp4.mxfp4_quantize(w.float().numpy(), dtype)
    assert np.array_equal(ours_e, exponents.numpy())
    assert np.array_equal(fp4.pack_nibbles(codes), packed.numpy())
    # the round-up rule: significand 1.75 goes to the next power of two, 1.6875 does not
    assert int(ours_e[2, 0]) == 127 - 4 - 2 and int(ours_e[3, 0]) == 127 - 5 - 2

    state = {"weight_packed": packed, "weight_scale": exponents}
    theirs = MXFP4PackedCompressor.decompress(state, scheme)["weight"].float().numpy()
    assert np.array_equal(fp4.round_to(fp4.mxfp4_dequantize(codes, ours_e), "bfloat16"), theirs)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fast_fp4_twins_equal_the_reference(dtype: str) -> None:
    """nvfp4_quantize_fast / mxfp4_quantize_fast (numba element codes, what rtn runs) == the numpy spec,
    on the edge-case weight above and on values that saturate (a small shared global scale)."""
    w = _weight(DTYPES[dtype], 32).float().numpy()
    for gs in (fp4.nvfp4_global_scale(float(np.abs(w).max()), dtype), np.float32(3.0)):
        for a, b in zip(fp4.nvfp4_quantize(w, gs, dtype), fp4.nvfp4_quantize_fast(w, gs, dtype), strict=True):
            assert np.array_equal(a, b)
    for a, b in zip(fp4.mxfp4_quantize(w, dtype), fp4.mxfp4_quantize_fast(w, dtype), strict=True):
        assert np.array_equal(a, b)
