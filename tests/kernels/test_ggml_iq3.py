"""IQ3_XXS and IQ3_S: the NumPy reference (qconvert.kernels.ggml.iq3) and its numba twin against llama.cpp.

* the grid tables rebuilt from their definition equal ggml's (checksums of reference/gguf-lowbit.md §2.3,
  ggml's dequant grids read back through ggml's own to_float, every grid point and every neighbour list
  exercised through ggml_quantize_chunk);
* quantize == ggml_quantize_chunk without an imatrix, with a random and with a sparse one, on adversarial
  blocks; the fast twin == the reference == ggml (ordinary and real SmolLM2 rows: the generic
  test_ggml_reference / test_ggml_fast, which cover every registered type);
* dequantize == ggml's to_float == gguf-py's;
* inputs on which ggml aborts (GGML_ASSERT in the neighbour search) are refused with BadInput.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qconvert import kernels
from qconvert.errors import BadInput
from qconvert.kernels.ggml import grids, iq3
from tests.oracle.llamacpp import ggml_dequantize, ggml_quantize_chunk

ROOT = Path(__file__).resolve().parents[2]
TYPES = [T.IQ3_XXS, T.IQ3_S]
REF = {T.IQ3_XXS: iq3.IQ3_XXS, T.IQ3_S: iq3.IQ3_S}


def _name(t: T) -> str:
    return t.name


def assert_same_bytes(qtype: T, ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    size = GGML_QUANT_SIZES[qtype][1]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero(np.any((ours != ref).reshape(-1, size), axis=1))
    assert bad.size == 0, f"{qtype.name} {what}: {bad.size}/{ref.size // size} blocks differ, first {bad[:8]}"


def check_reference(qtype: T, x: np.ndarray, imatrix: np.ndarray | None, what: str = "") -> np.ndarray:
    ref = ggml_quantize_chunk(qtype, x, imatrix)
    assert_same_bytes(qtype, REF[qtype].quantize(x, imatrix), ref, what)
    return ref


# --------------------------------------------------------------------------------------------- tables

# reference/gguf-lowbit.md §2.1 / §2.3: Σ and sha256[:16] of the quantizer grid (LE uint16); neighbour array
# length, Σ, sha256[:16] (counts included, every off-grid key); Σ of each list's first index; off-grid keys;
# longest list
TABLE_FACTS = {
    256: ((391138, "c9678803c61b2210"), 22825, 2824668, "4b54395c1c3e9766", 565696, 3840, 36),
    512: ((777331, "353274c58dd7d8dc"), 28317, 7317747, "662208b0d2ce2fa3", 1105857, 3584, 38),
}


@pytest.mark.parametrize("grid_size", [256, 512])
def test_tables_match_the_reference_checksums(grid_size: int) -> None:
    t = iq3.tables(grid_size)
    kgrid = iq3.KGRID_256 if grid_size == 256 else iq3.KGRID_512
    (gsum, gsha), length, nsum, sha, firsts, n_off, maxn = TABLE_FACTS[grid_size]
    assert int(kgrid.astype(np.int64).sum()) == gsum and t.size == grid_size
    assert hashlib.sha256(kgrid.astype("<u2").tobytes()).hexdigest()[:16] == gsha
    assert np.array_equal(t.kmap[kgrid], np.arange(grid_size))  # kmap[kgrid[k]] == k
    off = np.flatnonzero(t.kmap < 0)
    assert off.size == n_off == 4096 - grid_size
    assert t.neighbours.size == length and int(t.neighbours.astype(np.int64).sum()) == nsum
    assert hashlib.sha256(t.neighbours.astype("<u2").tobytes()).hexdigest()[:16] == sha
    assert sum(int(t.neighbour_list(u)[0]) for u in off) == firsts
    lists, counts = t.padded
    assert lists.shape[1] == maxn == counts.max()
    assert np.array_equal(t.coords, 2 * t.levels + 1)


def test_neighbour_lists_follow_their_definition() -> None:
    """Spot-check the vectorised builder against a literal reading of iq3xs_init_impl for a few keys."""
    rng = np.random.default_rng(5)
    for grid_size, nwant in ((256, 2), (512, 3)):
        t = iq3.tables(grid_size)
        for u in rng.choice(np.flatnonzero(t.kmap < 0), 40, replace=False):
            p = [2 * ((int(u) >> 3 * i) & 7) + 1 for i in range(4)]
            pairs = sorted((int(sum((int(g) - q) ** 2 for g, q in zip(t.coords[j], p, strict=True))), j)
                           for j in range(grid_size))
            distinct = sorted({d for d, _ in pairs})[:nwant]
            assert t.neighbour_list(int(u)).tolist() == [j for d, j in pairs if d in distinct]


def test_ksigns_equal_gguf_py() -> None:
    assert grids.ksigns().tobytes() == bytes(gguf.quants.IQ2_XXS.ksigns)


def _one_index_blocks(qtype: T) -> np.ndarray:
    """One block per grid point k whose every group holds index k, d = 1, ls = 0, no signs."""
    size = iq3.tables(256 if qtype == T.IQ3_XXS else 512).size
    nbytes = GGML_QUANT_SIZES[qtype][1]
    b = np.zeros((size, nbytes), np.uint8)
    b[:, 0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    b[:, 2:66] = (np.arange(size) & 255)[:, None]
    if qtype == T.IQ3_S:
        b[:, 66:74] = np.where(np.arange(size) >= 256, 255, 0)[:, None]
    return b


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_quantizer_grid_matches_ggml_dequant_grid(qtype: T) -> None:
    """ggml's to_float of index k reproduces magnitude[l_i(k)] of our kgrid for every k and coordinate:
    the literal quantizer grids agree with ggml's dequant tables (ggml-common.h) entry by entry."""
    t = iq3.tables(256 if qtype == T.IQ3_XXS else 512)
    y = ggml_dequantize(qtype, _one_index_blocks(qtype))[:, :4]
    scale = np.float32(0.25) if qtype == T.IQ3_XXS else np.float32(1)  # (0.5+0)*0.5, or 1+2*0
    magnitude = iq3.XXS_MAGNITUDE if qtype == T.IQ3_XXS else iq3.S_MAGNITUDE
    np.testing.assert_array_equal(y, scale * magnitude[t.levels], strict=True)


def _grid_rows(qtype: T, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sub-blocks whose groups sit exactly at odd-coordinate vectors ``points`` [n, 4] (7 per sub-block),
    with a leading group holding a 15 so that trial 0 (id = 15/max = 1) rounds every group to itself.
    Signs are random, with even parity per 8-weight run for IQ3_XXS (no flips)."""
    t = iq3.tables(256 if qtype == T.IQ3_XXS else 512)
    anchor = t.coords[np.flatnonzero(t.levels.max(axis=1) == 7)[0]]
    n_sub = -(-points.shape[0] // 7)
    n_sub += -n_sub % 8
    groups = np.tile(anchor, (n_sub, 8, 1))
    flat = groups[:, 1:].reshape(-1, 4)
    flat[: points.shape[0]] = points
    flat[points.shape[0] :] = points[rng.integers(0, points.shape[0], flat.shape[0] - points.shape[0])]
    groups[:, 1:] = flat.reshape(n_sub, 7, 4)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), (n_sub * 32 // 8, 8))
    if qtype == T.IQ3_XXS:
        signs[:, 7] *= np.prod(signs, axis=1)
    return (groups.reshape(-1, 256) * signs.reshape(-1, 256)).astype(np.float32)


@pytest.mark.parametrize("imatrix", ["none", "random"])
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_every_grid_point_and_neighbour_list_against_ggml(qtype: T, imatrix: str) -> None:
    """Groups at every grid point come out as that index in ggml's bytes (all indices used), and groups at
    every off-grid key go through that key's neighbour list in the first trial; ours equal ggml's bytes."""
    rng = np.random.default_rng(int(qtype))
    t = iq3.tables(256 if qtype == T.IQ3_XXS else 512)
    on = _grid_rows(qtype, t.coords, rng)
    off = 2 * grids.unpack_levels(np.flatnonzero(t.kmap < 0), 4, 3).astype(np.float32) + 1
    offrows = _grid_rows(qtype, off, rng)
    for x, what in ((on, "grid points"), (offrows, "off-grid keys")):
        im = None if imatrix == "none" else (rng.random(x.shape[1]) + 0.1).astype(np.float32)
        ref = check_reference(qtype, x, im, what)
        assert_same_bytes(qtype, kernels.quantize(x, qtype, im), ref, f"fast, {what}")
        if what == "grid points":
            lo = ref[:, 2:].reshape(-1, GGML_QUANT_SIZES[qtype][1] - 2)[:, :64].astype(np.int64)
            if qtype == T.IQ3_S:
                qh = ref.reshape(-1, 110)[:, 66:74].astype(np.int64)
                lo = lo | (((qh[:, np.arange(64) // 8] >> (np.arange(64) % 8)) & 1) << 8)
            assert np.unique(lo).size == t.size


# --------------------------------------------------------------------------------------------- data


def _adversarial(rng: np.random.Generator) -> np.ndarray:
    """One 256-weight super-block per row for each degenerate pattern (none of them makes ggml abort)."""
    g = rng.standard_normal(256)
    one = np.zeros(256)
    one[37] = -0.4
    signed_zeros = np.where(rng.random(256) < 0.5, -0.0, 0.0)
    zero16 = g.copy()
    zero16[48:64] = 0
    zero32 = g.copy()
    zero32[0:32] = 0
    zero32[96:160] = 0  # two exactly-zero sub-blocks: IQ3_S shifts the later sub-blocks' data
    tiny_sub = g.copy()
    tiny_sub[64:96] *= 1e-12  # below IQ3_XXS's 1e-8 zero test, not zero for IQ3_S
    sub_min = g.copy()
    sub_min[160:192] = np.float32(1e-45) * np.sign(g[160:192])  # max/15 underflows to 0 (IQ3_S)
    rows = [
        np.zeros(256),
        signed_zeros,
        np.full(256, 0.125),
        np.full(256, -3.0),
        np.full(256, 1e-30) * np.sign(g),
        np.full(256, 1e-9) * np.sign(g),
        g * 1e-10,
        g * 1e-39,  # subnormal
        g * 1e-40,
        np.full(256, 1e-44) * np.sign(g),  # every scale underflows to 0: IQ3_S keeps its signs with d = 0
        g * 1e9,  # large, still below what makes ggml abort
        np.where(np.arange(256) % 3 == 0, 65504.0, -65520.0),
        np.where(np.arange(256) % 2, 1.0, -1.0),
        one,
        signed_zeros + np.abs(g) * (rng.random(256) < 0.3),
        np.round(g * 4) / 4,  # many exact ties
        np.round(g * 64) / 64,
        np.concatenate([np.zeros(128), g[:128]]),
        g * np.where(np.arange(256) < 32, 1000.0, 1.0),  # one loud sub-block
        np.where(np.arange(256) == 200, 3.0, g * 0.01),  # a single outlier
        -np.abs(g),
        np.abs(g),
        zero16,
        zero32,
        tiny_sub,
        sub_min,
    ]
    return np.stack(rows).astype(np.float32)


def _imatrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "random":
        return rng.random(n).astype(np.float32) + np.float32(0.01)
    # "sparse": columns never activated (0) and a wide dynamic range, as real imatrices have
    return np.where(rng.random(n) < 0.3, 0.0, rng.random(n) ** 4 * 100).astype(np.float32)


# --------------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("imatrix", ["none", "random", "sparse"])
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_adversarial_blocks_match_ggml(qtype: T, imatrix: str) -> None:
    """Reference and fast twin == ggml (ordinary data and real rows: test_ggml_reference / test_ggml_fast)."""
    rng = np.random.default_rng([int(qtype), len(imatrix)])
    x = _adversarial(rng)
    im = _imatrix(imatrix, x.shape[1], rng)
    ref = check_reference(qtype, x, im, "adversarial")
    assert_same_bytes(qtype, kernels.quantize(x, qtype, im, threads=2), ref, "fast, adversarial")


def test_negative_scale_complements_the_signs() -> None:
    """An imatrix can make a sub-block's best scale negative (the flipped weight of an odd-parity run
    dominates): ggml then complements the run signs ("should never happen"). Both types, ours == ggml."""
    x = np.zeros((1, 256), np.float32)
    x[0, :8] = [-0.001, 1, 1, 1, 1, 1, 1, 1]
    im = np.ones(256, np.float32)
    im[0] = 1e6
    ref = check_reference(T.IQ3_XXS, x, im)
    assert ref[0, 66:70].tolist() == [255, 255, 255, 255]  # 28 complemented sign bits and ls = 15
    check_reference(T.IQ3_S, x, im)


def test_iq3_s_zero_subblocks_shift_the_data() -> None:
    """The IQ3_S pointer slip (reference §3.5): after an exactly-zero sub-block, qs and signs land one
    slot earlier, while qh and the scales stay in place."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (1, 256)).astype(np.float32)
    x[0, :32] = 0
    ref = check_reference(T.IQ3_S, x, None)
    shifted = iq3.IQ3_S.quantize(x[:, np.r_[32:256, 0:32]], None)  # the same sub-blocks, zero one last
    assert ref[0, 2:58].tobytes() == shifted[0, 2:58].tobytes()  # slots 0..6 = sub-blocks 1..7
    assert ref[0, 74:102].tobytes() == shifted[0, 74:102].tobytes()
    assert not ref[0, 58:66].any() and not ref[0, 102:106].any()  # trailing slot left zero


@pytest.mark.oracle  # the oracle runs in a subprocess, out of the conftest's sight
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_weights_ggml_aborts_on_are_refused(qtype: T) -> None:
    """|x| ~ 1e30 makes every neighbour score inf and ggml GGML_ASSERTs (the process dies): we raise."""
    x = np.full((1, 256), 1e30, np.float32) * np.sign(np.random.default_rng(0).standard_normal(256))
    x = x.astype(np.float32)
    for quantize in (REF[qtype].quantize, lambda x, im: kernels.quantize(x, qtype, im)):
        with pytest.raises(BadInput, match="llama.cpp aborts on them"):
            quantize(x, None)
    code = ("import sys, numpy as np; from tests.oracle.llamacpp import ggml_quantize_chunk as q; "
            f"q({int(qtype)}, np.frombuffer(sys.stdin.buffer.read(), np.float32).reshape(1, -1))")
    run = subprocess.run([sys.executable, "-c", code], input=x.tobytes(), cwd=ROOT, capture_output=True)
    assert run.returncode != 0 and b"GGML_ASSERT" in run.stderr


# --------------------------------------------------------------------------------------------- dequantize


def _sample_bytes(qtype: T) -> np.ndarray:
    """Oracle bytes of ordinary data and of zero sub-blocks, plus random bytes (every bit pattern)."""
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate([rng.normal(0, 0.02, (8, 256)), _adversarial(rng)[[0, 17, 23]]]).astype(np.float32)
    real = ggml_quantize_chunk(qtype, x)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    return np.concatenate([real, noise])


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_dequantize_matches_ggml_and_gguf_py(qtype: T) -> None:
    q = _sample_bytes(qtype)
    ours = REF[qtype].dequantize(q)
    np.testing.assert_array_equal(ours, ggml_dequantize(qtype, q), strict=True)
    with np.errstate(all="ignore"):  # random scales include inf/NaN
        theirs = gguf.quants.dequantize(q, qtype).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs, strict=True)
