"""TQ1_0, TQ2_0, Q1_0, Q2_0, MXFP4, NVFP4: the NumPy reference (qconvert.kernels.ggml.lowbit / fp4_blocks) and
its numba twin (ggml_fast._lowbit / _fp4), as registered in qconvert.kernels.registry, against llama.cpp
(test_ggml_reference / test_ggml_fast run their generic checks on them too, including the FMA scan).

* quantize == ggml_quantize_chunk on adversarial blocks (zeros, ±0, constants, tiny/subnormal/huge values,
  ±inf and NaN anywhere in a block, ties), on rows built at each type's rounding boundaries (E2M1 ties, every
  E8M0 exponent and log2f round-up threshold, every UE4M3 code and its rounding edges, ternary ±0.5 ties)
  and on real SmolLM2 rows; without an imatrix, with a random and with a sparse one (ggml ignores it for
  all six types, which the oracle confirms);
* the fast twin == the reference on all of it, independent of the thread count;
* dequantize == ggml's to_float bit for bit (NaN payloads included) and == gguf-py's where it has the type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from safetensors import safe_open

from qconvert.kernels import block_type, quantize
from qconvert.kernels.ggml import fp4_blocks
from qconvert.kernels.ggml_fast import _fp4
from tests.oracle.llamacpp import ggml_dequantize, ggml_quantize_chunk

TYPES = [T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0, T.MXFP4, T.NVFP4]
REF = {t: block_type(t).reference for t in TYPES}
GGUF_PY_DEQUANT = [T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4]  # gguf-py 0.19.0: NotImplementedError for the rest
N = 512  # columns of the synthetic rows: 2 blocks of 256, 8 of 64 ...
F32 = np.float32


def _name(t: T) -> str:
    return t.name


def fast_quantize(qtype: T, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Through the registry's entry point, which runs the fast twin (on 2 threads: row chunks)."""
    assert block_type(qtype).fast is not None
    return quantize(x, qtype, imatrix, threads=2)


def assert_same_bytes(qtype: T, ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    size = GGML_QUANT_SIZES[qtype][1]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero(np.any((ours != ref).reshape(-1, size), axis=1))
    assert bad.size == 0, f"{qtype.name} {what}: {bad.size}/{ref.size // size} blocks differ, first {bad[:8]}"


def check(qtype: T, x: np.ndarray, imatrix: np.ndarray | None, what: str) -> np.ndarray:
    """Reference and fast twin against ggml_quantize_chunk; returns ggml's bytes."""
    ref = ggml_quantize_chunk(qtype, x, imatrix)
    with np.errstate(all="ignore"):
        assert_same_bytes(qtype, REF[qtype].quantize(x, imatrix), ref, f"reference, {what}")
        assert_same_bytes(qtype, fast_quantize(qtype, x, imatrix), ref, f"fast, {what}")
    return ref


def assert_same_floats(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Bit-identical float32 (assert_array_equal would let NaN payloads differ)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == F32
    bad = np.flatnonzero(ours.view(np.uint32).ravel() != theirs.view(np.uint32).ravel())
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[:8]}"


# --------------------------------------------------------------------------------------------- data


def _random_rows(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([
        rng.normal(0, 0.02, (6, N)),
        rng.standard_t(2, (6, N)) * 0.01,  # heavy tails
        rng.laplace(0, 1, (4, N)) * 5,
        rng.uniform(-1, 1, (4, N)),
    ]).astype(F32)


def _adversarial_rows(rng: np.random.Generator) -> np.ndarray:
    """Degenerate blocks at every block size (each row is constant in its pattern across blocks or mixes
    them within one block of 256)."""
    g = rng.standard_normal(N).astype(F32)
    consts = (0.0, -0.0, 1.0, -0.125, 1e-30, -1e-39, 1e-45, 1e30, 3e38, -3.4028235e38)
    full = [np.full(N, v, F32) for v in consts]
    signed_zeros = np.where(rng.random(N) < 0.5, -0.0, 0.0).astype(F32)
    one = np.zeros(N, F32)
    one[[5, 300]] = [-2.0, 0.75]
    rows = full + [
        signed_zeros,
        one,
        g * F32(1e-39),  # subnormal blocks: 1/amax overflows to inf
        g * F32(2e-38),
        g * F32(1e30),
        g * F32(1e37),  # Σ|x| overflows (Q1_0)
        np.round(g * 4) / 4,  # ties on a coarse grid
        np.round(g * 2) / 2,
        rng.integers(-3, 4, N).astype(F32),
        np.abs(g),
        -np.abs(g),
        np.where(np.arange(N) % 2, 1.0, -1.0).astype(F32),
        g * np.where(np.arange(N) < 16, 1000.0, 1.0).astype(F32),  # one loud sub-block
    ]
    specials = []
    for fill in (np.nan, -np.nan, np.inf, -np.inf):
        for where in (0, 15, 31, 63, 127, 255):  # first / last element of blocks of 16 .. 256
            r = g * F32(0.02)
            r[where::256] = fill
            specials.append(r)
    mixed = g.copy()
    mixed[::7] = np.nan
    mixed[3::11] = np.inf
    mixed[5::13] = -np.inf
    specials += [mixed, np.full(N, np.nan, F32), np.full(N, np.inf, F32), np.full(N, -np.inf, F32)]
    return np.stack(rows + specials).astype(F32)


def _pad(blocks: list[np.ndarray], width: int) -> np.ndarray:
    """Concatenate blocks of `width` elements into rows of N."""
    flat = np.concatenate([np.asarray(b, F32).reshape(-1, width) for b in blocks])
    per_row = N // width
    pad = (-flat.shape[0]) % per_row
    return np.concatenate([flat, np.zeros((pad, width), F32)]).reshape(-1, N)


def _e2m1_ties(width: int) -> list[np.ndarray]:
    """Blocks whose amax pins the half-scale d (MXFP4: amax 6 -> e 127, d 0.5; NVFP4: amax 6 -> ue 0x38,
    d 0.5; the other amax give other scales) filled with every E2M1 midpoint ·d, its float32 neighbours and
    their negatives: the first-minimum rule decides all of them."""
    out = []
    for amax in (6.0, 7.5, 5.0, 4.0, 0.75, 1e-3):
        grid = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1, 1.5, 2, 3, 4, 6, 7, 100]
        mids = np.array(grid, F32) * F32(amax / 6)
        vals = np.concatenate([mids, np.nextafter(mids, F32(0)), np.nextafter(mids, F32(np.inf))])
        vals = np.concatenate([vals, -vals, [0.0, -0.0]])
        for i in range(0, vals.size, width - 1):
            chunk = vals[i : i + width - 1]
            blk = np.zeros(width, F32)
            blk[0] = amax if i % 2 == 0 else -amax
            blk[1 : 1 + chunk.size] = chunk
            out.append(blk)
    return out


def _mxfp4_boundaries() -> np.ndarray:
    """amax = 2^n, the float below it, and each exponent's log2f round-up threshold and the float below it,
    for every exponent n from subnormal to FLT_MAX, with ±amax·(random fractions) as the other elements."""
    rng = np.random.default_rng(5)
    pows = np.array([fp4_blocks._float_bits(n) for n in range(-149, 128)], np.uint32)
    thr = fp4_blocks.LOG2F_UP
    amaxes = np.unique(np.concatenate([pows, pows - 1, thr, thr - 1, [0x7F7FFFFF]])).astype(np.uint32)
    amaxes = amaxes[(amaxes > 0) & (amaxes < 0x7F800000)].view(F32)
    blocks = rng.uniform(-1, 1, (amaxes.size, 32)).astype(F32) * amaxes[:, None]
    blocks[np.arange(amaxes.size), rng.integers(0, 32, amaxes.size)] = amaxes
    return _pad(list(blocks) + _e2m1_ties(32), 32)


def _nvfp4_boundaries() -> np.ndarray:
    """Sub-block amax/6 on every UE4M3 code, on the midpoints between codes and one float32 step around them,
    including the subnormal range, the 448 clamp and float32 subnormals."""
    codes = fp4_blocks.UE4M3_HALF[1:0x7F] * F32(2)  # the UE4M3 values of codes 1 .. 0x7E
    mids = (codes[:-1] + codes[1:]) / F32(2)
    edges = [2.0**-10, 2.0**-11, 0.5 * 2.0**-9, 448.0, 464.0, 480.0, 1e4]
    v = np.concatenate([codes, mids, edges]).astype(F32)
    v = np.concatenate([v, np.nextafter(v, F32(0)), np.nextafter(v, F32(np.inf))])
    amax = np.concatenate([v * F32(6), np.nextafter(v * F32(6), F32(0)), [1e-40, 1e-44, 3e38]]).astype(F32)
    rng = np.random.default_rng(6)
    subs = rng.uniform(-1, 1, (amax.size, 16)).astype(F32) * amax[:, None]
    subs[:, 3] = amax
    return _pad(list(subs) + _e2m1_ties(16), 16)


def _rounding_boundaries(width: int) -> np.ndarray:
    """TQ*/Q2_0/Q1_0: x·(1/amax) at ±0.5 exactly and one float32 step around it, for several amax; huge
    multiples of the scale before a NaN."""
    out = []
    for amax in (1.0, 3.0, 0.1, 7e-3, 1e-38):
        half = F32(amax) * F32(0.5)
        vals = np.array([half, np.nextafter(half, F32(0)), np.nextafter(half, F32(1)), amax, 0.0, -0.0], F32)
        blk = np.resize(np.concatenate([vals, -vals]), width).astype(F32)
        blk[0] = amax
        out.append(blk)
    # ggml's MAX macro forgets everything before a NaN: the scale then comes from the elements after it, and
    # x/amax of the earlier ones reaches lroundf's int/long overflow (|v| >= 2^31, >= 2^63)
    for big in (3.0, 5e9, 3e12, 1e25):
        blk = np.full(width, 1e-3, F32)
        blk[: width // 2] = [big, -big, 0.4, 2.5e-3] * (width // 8)
        blk[width // 2] = np.nan
        out.append(blk)
    return _pad(out, width)


BOUNDARIES = {
    T.TQ1_0: lambda: _rounding_boundaries(256),
    T.TQ2_0: lambda: _rounding_boundaries(256),
    T.Q2_0: lambda: _rounding_boundaries(64),
    T.Q1_0: lambda: _rounding_boundaries(128),
    T.MXFP4: _mxfp4_boundaries,
    T.NVFP4: _nvfp4_boundaries,
}
DATA = {"random": _random_rows, "adversarial": _adversarial_rows}


def _imatrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "random":
        return (rng.random(n) + 0.01).astype(F32)
    return np.where(rng.random(n) < 0.3, 0.0, rng.random(n) ** 4 * 100).astype(F32)  # sparse


# --------------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("imatrix", ["none", "random", "sparse"])
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_quantize_matches_ggml(qtype: T, data: str, imatrix: str) -> None:
    rng = np.random.default_rng([int(qtype), len(data), len(imatrix)])
    x = DATA[data](rng)
    check(qtype, x, _imatrix(imatrix, N, rng), data)


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_rounding_boundaries_match_ggml(qtype: T) -> None:
    x = BOUNDARIES[qtype]()
    check(qtype, x, None, "boundaries")


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_ggml_ignores_the_imatrix(qtype: T) -> None:
    """The reason one code path serves both cases: ggml's bytes do not change with an imatrix."""
    rng = np.random.default_rng(int(qtype))
    x = _random_rows(rng)
    im = _imatrix("sparse", N, rng)
    assert np.array_equal(ggml_quantize_chunk(qtype, x, im), ggml_quantize_chunk(qtype, x))


@pytest.fixture(scope="module")
def real_rows(smollm2_dir: Path) -> dict[str, np.ndarray]:
    """Real SmolLM2 weights as rows of 1536 (a multiple of every block size): layer 0 and 29 down_proj,
    layer 0 gate_proj reshaped, and the first 512 embedding rows; a zero block and zero sub-block inserted."""
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:

        def read(name: str) -> np.ndarray:
            return f.get_tensor(name).float().numpy().astype(F32).reshape(-1, 1536)

        rows = {
            "down_proj.0": read("model.layers.0.mlp.down_proj.weight"),
            "down_proj.29": read("model.layers.29.mlp.down_proj.weight"),
            "gate_proj.0": read("model.layers.0.mlp.gate_proj.weight"),
            "embed_tokens": f.get_slice("model.embed_tokens.weight")[:512].float().numpy().reshape(-1, 1536),
        }
    rows["down_proj.0"][7, :256] = 0
    rows["down_proj.0"][9, 64:80] = 0
    return {k: np.ascontiguousarray(v, dtype=F32) for k, v in rows.items()}


@pytest.mark.parametrize("tensor", ["down_proj.0", "down_proj.29", "gate_proj.0", "embed_tokens"])
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_real_rows_match_ggml(real_rows, qtype: T, tensor: str) -> None:
    x = real_rows[tensor]
    check(qtype, x, None, tensor)


def test_real_rows_with_imatrix(real_rows) -> None:
    x = real_rows["down_proj.0"][:64]
    im = _imatrix("sparse", x.shape[1], np.random.default_rng(1))
    for qtype in TYPES:
        check(qtype, x, im, "down_proj.0 + imatrix")


def test_all_zero_blocks() -> None:
    """What ggml writes for zeros, spelled out: d = +0 (TQ*, Q1_0, Q2_0), e = 0 (MXFP4), ue = 0 (NVFP4); the
    codes of zero (TQ trit 1; Q2_0 code 1; Q1_0 bit 1 for ±0; FP4 code 0)."""
    x = np.zeros((1, 256), F32)
    x[0, ::2] = -0.0
    tq1 = check(T.TQ1_0, x, None, "zeros")[0]
    assert tq1[-2:].tobytes() == b"\0\0"
    assert set(tq1[:48].tolist()) == {(121 * 256 + 242) // 243}  # 11111 in base 3
    assert set(tq1[48:52].tolist()) == {(120 * 256 + 242) // 243}  # 1111 base 3, shifted by one trit
    assert set(check(T.TQ2_0, x, None, "zeros")[0, :64].tolist()) == {0x55}
    assert set(check(T.Q2_0, x, None, "zeros").reshape(-1, 18)[:, 2:].ravel().tolist()) == {0x55}
    assert set(check(T.Q1_0, x, None, "zeros").reshape(-1, 18)[:, 2:].ravel().tolist()) == {0xFF}
    assert not check(T.MXFP4, x, None, "zeros").any()
    assert not check(T.NVFP4, x, None, "zeros").any()


def test_never_emitted_codes() -> None:
    """Q2_0 and TQ2_0 never write code 3 (+2d), even on outliers (gguf-lowbit.md §9.14)."""
    x = _random_rows(np.random.default_rng(3))
    for qtype in (T.Q2_0, T.TQ2_0):
        q = REF[qtype].quantize(x)
        data = q.reshape(-1, 18)[:, 2:] if qtype == T.Q2_0 else q.reshape(-1, 66)[:, :64]
        fields = (data[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        assert fields.max() == 2


# --------------------------------------------------------------------------------------------- fast twin


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_fast_twin_matches_reference_on_wide_rows(qtype: T) -> None:
    """Rows of 4096 and many blocks, with an imatrix that both must ignore."""
    rng = np.random.default_rng(7)
    x = (rng.standard_t(4, (64, 4096)) * 0.03).astype(F32)
    x[3, 100:200] = 0
    x[5, 1000] = np.nan
    im = _imatrix("random", 4096, rng)
    assert_same_bytes(qtype, fast_quantize(qtype, x, im), REF[qtype].quantize(x), "wide rows")


# --------------------------------------------------------------------------------------------- dequantize


def _sample_bytes(qtype: T) -> np.ndarray:
    """ggml's bytes of ordinary and adversarial data, plus fully random bytes (every scale/code pattern)."""
    rng = np.random.default_rng(int(qtype) + 100)
    with np.errstate(all="ignore"):
        real = np.concatenate([ggml_quantize_chunk(qtype, _random_rows(rng)),
                               ggml_quantize_chunk(qtype, _adversarial_rows(rng))])
    noise = rng.integers(0, 256, (64, real.shape[1]), dtype=np.uint8)
    return np.concatenate([real, noise])


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_dequantize_matches_ggml_to_float(qtype: T) -> None:
    q = _sample_bytes(qtype)
    assert_same_floats(REF[qtype].dequantize(q), ggml_dequantize(qtype, q), qtype.name)


@pytest.mark.parametrize("qtype", GGUF_PY_DEQUANT, ids=_name)
def test_dequantize_matches_gguf_py(qtype: T) -> None:
    q = _sample_bytes(qtype)
    ours = REF[qtype].dequantize(q)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(q, qtype).reshape(ours.shape).astype(F32)
    assert_same_floats(ours, theirs, qtype.name)


@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in GGUF_PY_DEQUANT], ids=_name)
def test_gguf_py_lacks_the_others(qtype: T) -> None:
    """Keeps GGUF_PY_DEQUANT honest: once gguf-py can dequantize Q1_0/Q2_0, compare with it too."""
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0, T.MXFP4], ids=_name)
def test_gguf_py_quantizer_agrees_on_finite_data(qtype: T) -> None:
    """gguf-py's quantizers for these are byte-identical to ggml on finite input (gguf-lowbit.md §7)."""
    x = _random_rows(np.random.default_rng(9))
    ours = REF[qtype].quantize(x)
    assert_same_bytes(qtype, gguf.quants.quantize(x, qtype).reshape(ours.shape), ours, "gguf-py")


# --------------------------------------------------------------------------------------------- scale codes


def _libm_log2f():
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.log2f.argtypes = [ctypes.c_float]
    libm.log2f.restype = ctypes.c_float
    return libm.log2f


def test_log2f_round_up_table_matches_libm() -> None:
    """LOG2F_UP (derived from double log2) against the C library's log2f itself: at every threshold and the
    float below it, plus every power of two; and the count of normal floats whose floorf(log2f) is one
    above their exponent is the 7404 of gguf-lowbit.md §5.1."""
    log2f = _libm_log2f()
    thr = fp4_blocks.LOG2F_UP
    for n in range(-149, 128):
        lo, hi = fp4_blocks._float_bits(n), fp4_blocks._float_bits(n + 1)
        t = int(thr[n + 149])
        assert lo < t <= hi
        below = float(np.uint32(t - 1).view(F32))
        assert np.floor(log2f(below)) == n, n
        assert np.floor(log2f(float(np.uint32(lo).view(F32)))) == n
        if t < hi:
            assert np.floor(log2f(float(np.uint32(t).view(F32)))) == n + 1, n
    normal = np.arange(-126, 128)
    ends = np.array([fp4_blocks._float_bits(n + 1) for n in normal], np.int64)
    assert int((ends - thr[normal + 149].astype(np.int64)).sum()) == 7404


def test_floor_log2f_matches_libm_on_samples() -> None:
    log2f = _libm_log2f()
    rng = np.random.default_rng(0)
    near = (fp4_blocks.LOG2F_UP[:, None].astype(np.int64) + np.arange(-3, 3)).ravel()
    bits = np.concatenate([rng.integers(1, 0x7F800000, 20000), near])
    bits = bits[(bits > 0) & (bits < 0x7F800000)].astype(np.uint32)
    x = bits.view(F32)
    want = np.array([np.floor(log2f(float(v))) for v in x])
    assert np.array_equal(fp4_blocks.floor_log2f(x), want)


def test_e8m0_and_ue4m3_tables_match_gguf_py() -> None:
    codes = np.arange(256, dtype=np.uint8)
    assert_same_floats(fp4_blocks.E8M0_HALF, gguf.quants.MXFP4.e8m0_to_fp32_half(codes).astype(F32), "E8M0")
    theirs = gguf.quants.NVFP4.ue4m3_to_fp32(codes).astype(F32)
    assert_same_floats(fp4_blocks.UE4M3_HALF, theirs, "UE4M3")


def test_ue4m3_encode_matches_gguf_py_helper() -> None:
    """gguf-py carries ggml's encoder as fp32_to_ue4m3; it has to agree on every code's neighbourhood."""
    v = fp4_blocks.UE4M3_HALF * F32(2)
    v = np.concatenate([v, (v[1:] + v[:-1]) / 2, [1e-40, 0.0, -1.0, 500.0, np.inf]]).astype(F32)
    v = np.concatenate([v, np.nextafter(v, F32(0)), np.nextafter(v, F32(np.inf))])
    v = v[np.isfinite(v) | (v > 0)]
    theirs = np.asarray(gguf.quants.NVFP4.fp32_to_ue4m3(v.copy())).astype(np.int32)
    assert np.array_equal(fp4_blocks.ue4m3_encode(v), theirs)
    assert np.array_equal([_fp4.ue4m3_encode(F32(a)) for a in v], theirs)

