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
