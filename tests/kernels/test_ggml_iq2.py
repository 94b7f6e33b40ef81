"""IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M: the NumPy reference (qconvert.kernels.ggml.iq2 / iq1) and its
numba twin (ggml_fast._iq2 / _iq1, through qconvert.kernels.quantize) against llama.cpp.

* the grid tables rebuilt from their definition equal ggml's (checksums of reference/gguf-lowbit.md
  §2.1 / §2.3, ggml's dequant grids read back through its own to_float, every grid point and every
  reachable neighbour list exercised through ggml_quantize_chunk);
* quantize == ggml_quantize_chunk without an imatrix (where ggml accepts none), with a random and with a
  sparse one, on adversarial blocks and real SmolLM2 rows;
* dequantize == ggml's to_float == gguf-py's;
* inputs on which ggml aborts (missing imatrix, a neighbour search or a scale that overflows, some NaN/inf
  weights) are refused with BadInput, by both.
The generic test_ggml_reference / test_ggml_fast run on these types too (random distributions, SmolLM2
rows, fast == reference, thread-count independence, no FMA).
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
from safetensors import safe_open

from qconvert.errors import BadInput
from qconvert.kernels import quantize
from qconvert.kernels.ggml import grids, iq1, iq2
from tests.oracle.llamacpp import ggml_dequantize, ggml_quantize_chunk

ROOT = Path(__file__).resolve().parents[2]
IQ2_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]
TYPES = IQ2_TYPES + [T.IQ1_S, T.IQ1_M]
REF = {cls.qtype: cls for cls in (iq2.IQ2_XXS, iq2.IQ2_XS, iq2.IQ2_S, iq1.IQ1_S, iq1.IQ1_M)}
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}  # ggml_quantize_requires_imatrix (ggml.c:8059)


def _name(t: T) -> str:
    return t.name


def tables(qtype: T) -> grids.GridTables:
    return iq1.tables() if qtype in (T.IQ1_S, T.IQ1_M) else iq2.tables(qtype)


def assert_same_bytes(qtype: T, ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    size = GGML_QUANT_SIZES[qtype][1]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.flatnonzero(np.any((ours != ref).reshape(-1, size), axis=1))
    assert bad.size == 0, f"{qtype.name} {what}: {bad.size}/{ref.size // size} blocks differ, first {bad[:8]}"


def check_reference(qtype: T, x: np.ndarray, imatrix: np.ndarray | None, what: str = "") -> np.ndarray:
    """The reference and the fast twin both give ggml_quantize_chunk's bytes."""
    ref = ggml_quantize_chunk(qtype, x, imatrix)
    with np.errstate(all="ignore"):
        assert_same_bytes(qtype, REF[qtype].quantize(x, imatrix), ref, what)
        assert_same_bytes(qtype, quantize(x, qtype, imatrix, threads=2), ref, f"fast, {what}")
    return ref


def grid_indices(qtype: T, q: np.ndarray) -> np.ndarray:
    """Every group's grid index in quantized bytes [nrows, row_bytes] -> int64 [ngroups]."""
    b = q.reshape(-1, GGML_QUANT_SIZES[qtype][1]).astype(np.int64)
    if qtype == T.IQ2_XXS:
        return b[:, 2:].reshape(-1, 8, 8)[:, :, :4].reshape(-1)
    if qtype == T.IQ2_XS:
        return np.ascontiguousarray(b[:, 2:66].astype(np.uint8)).view("<u2").reshape(-1) & 511
    if qtype == T.IQ2_S:
        hi = (np.repeat(b[:, 66:74], 4, axis=1) >> (2 * np.tile(np.arange(4), 8))) & 3
        return (b[:, 2:34] | (hi << 8)).reshape(-1)
    if qtype == T.IQ1_S:
        qh = np.ascontiguousarray(b[:, 34:50].astype(np.uint8)).view("<u2").astype(np.int64)
        hi = (np.repeat(qh, 4, axis=1) >> (3 * np.tile(np.arange(4), 8))) & 7
        return (b[:, 2:34] | (hi << 8)).reshape(-1)
    hi = (np.repeat(b[:, 32:48], 2, axis=1) >> (4 * np.tile(np.arange(2), 16))) & 7
    return (b[:, 0:32] | (hi << 8)).reshape(-1)


# --------------------------------------------------------------------------------------------- tables

# reference/gguf-lowbit.md §2.1 / §2.3: Σ and sha256[:16] of the quantizer grid (LE uint16); for the
# reachable off-grid keys (every level <= 2): how many, the neighbour array's length, Σ and sha256[:16]
# (counts included), Σ of each list's first index, shortest and longest list
TABLE_FACTS = {
    T.IQ2_XXS: ((3697703, "915952ebc4af8ddb"), 6305, 119462, 16143603, "74a188b8f41773b0", 789004, 2, 150),
    T.IQ2_XS: ((8004683, "f66435966ca8d64e"), 6049, 187770, 49551845, "ad5729a5fd181723", 1525704, 2, 292),
    T.IQ2_S: ((16519059, "e6e75e121b65e8af"), 5537, 50253, 25947868, "61aecb7dfb3f7529", 2525787, 1, 70),
    T.IQ1_S: ((44428132, "e9ffebfc997ad602"), 4513, 332234, 336402403, "51b9520579f6ff55", 3559657, 12, 205),
}


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S], ids=_name)
def test_tables_match_the_reference_checksums(qtype: T) -> None:
    t = tables(qtype)
    kgrid = iq1.kgrid() if qtype == T.IQ1_S else iq2.kgrid(qtype)
    (gsum, gsha), n_off, length, nsum, sha, firsts, minn, maxn = TABLE_FACTS[qtype]
    assert int(kgrid.astype(np.int64).sum()) == gsum
    assert hashlib.sha256(kgrid.astype("<u2").tobytes()).hexdigest()[:16] == gsha
    assert np.array_equal(t.kmap[kgrid], np.arange(t.size))  # kmap[kgrid[k]] == k
    assert t.kmap.shape == (43692,) and np.array_equal(t.coords, 2 * t.levels + 1)
    reachable = np.flatnonzero((grids.unpack_levels(np.arange(43692), 8, 2) <= 2).all(axis=1))
    assert reachable.size == 3**8
    assert np.all(t.kmap[np.setdiff1d(np.arange(43692), reachable)] == grids.NO_LIST)
    off = reachable[t.kmap[reachable] < 0]
    assert off.size == n_off
    assert t.neighbours.size == length and int(t.neighbours.astype(np.int64).sum()) == nsum
    assert hashlib.sha256(t.neighbours.astype("<u2").tobytes()).hexdigest()[:16] == sha
    assert sum(int(t.neighbour_list(u)[0]) for u in off) == firsts
    lists, counts = t.padded
    assert counts[off].min() == minn and lists.shape[1] == maxn == counts.max()


def test_neighbour_lists_follow_their_definition() -> None:
    """Spot-check the vectorised builder against a literal reading of iq2xs_init_impl for a few keys."""
    rng = np.random.default_rng(5)
    for qtype, nwant in ((T.IQ2_XXS, 2), (T.IQ2_XS, 2), (T.IQ2_S, 1), (T.IQ1_S, 3)):
        t = tables(qtype)
        off = np.flatnonzero((t.kmap < 0) & (t.kmap != grids.NO_LIST))
        for u in rng.choice(off, 12, replace=False):
            p = [2 * ((int(u) >> 2 * i) & 3) + 1 for i in range(8)]
            pairs = sorted((int(sum((int(g) - q) ** 2 for g, q in zip(t.coords[j], p, strict=True))), j)
                           for j in range(t.size))
            distinct = sorted({d for d, _ in pairs})[:nwant]
            assert t.neighbour_list(int(u)).tolist() == [j for d, j in pairs if d in distinct]


def test_iq1_m_shares_the_iq1_s_grid() -> None:
    assert iq1.tables() is iq1.tables() and iq1.kgrid().size == 2048


def _one_index_blocks(qtype: T) -> np.ndarray:
    """One block per grid point k whose every group holds index k, d = 1, the smallest sub-scale, no signs."""
    size = tables(qtype).size
    nbytes = GGML_QUANT_SIZES[qtype][1]
    k = np.arange(size)
    b = np.zeros((size, nbytes), np.uint8)
    one = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if qtype == T.IQ2_XXS:
        b[:, 0:2] = one
        b[:, 2:].reshape(size, 8, 8)[:, :, :4] = k[:, None, None]
    elif qtype == T.IQ2_XS:
        b[:, 0:2] = one
        b[:, 2:66] = np.repeat(k.astype("<u2")[:, None], 32, axis=1).view(np.uint8)
    elif qtype == T.IQ2_S:
        b[:, 0:2] = one
        b[:, 2:34] = (k & 255)[:, None]
        b[:, 66:74] = ((k >> 8) * 0x55)[:, None]  # bits 8-9 of all four groups of each qh byte
    elif qtype == T.IQ1_S:
        b[:, 0:2] = one
        b[:, 2:34] = (k & 255)[:, None]
        b[:, 34:50] = np.repeat(((k >> 8) * 0x249).astype("<u2")[:, None], 8, axis=1).view(np.uint8)
    else:  # IQ1_M: the fp16 1.0 (0x3C00) in the top nibbles of the scale words
        b[:, 0:32] = (k & 255)[:, None]
        b[:, 32:48] = ((k >> 8) * 0x11)[:, None]
        b[:, 48:56] = np.array([0x0000, 0x0000, 0xC000, 0x3000], "<u2").view(np.uint8)
    return b


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_quantizer_grid_matches_ggml_dequant_grid(qtype: T) -> None:
    """ggml's to_float of index k reproduces magnitude[l_i(k)] of our kgrid for every k and coordinate:
    the quantizer grids read from gguf-py agree with ggml's dequant tables (ggml-common.h) entry by entry."""
    t = tables(qtype)
    y = ggml_dequantize(qtype, _one_index_blocks(qtype))[:, :8]
    if qtype in IQ2_TYPES:
        expected = np.float32(0.125) * iq2.MAGNITUDE[t.levels]  # d*(0.5+0)*0.25
    else:
        expected = iq1.MAGNITUDE[t.levels] + iq1.DELTA  # d*(2*0+1)*(grid + 0.125)
    np.testing.assert_array_equal(y, expected.astype(np.float32), strict=True)


def _iq2_grid_rows(qtype: T, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sub-blocks whose groups sit exactly at odd-coordinate vectors ``points`` [n, 8], after a leading
    group of mostly 5s: IQ2_XS/IQ2_S's trial 0 (id = 5/max = 1) then rounds every group to itself, and so
    does IQ2_XXS's first trial (id = 4.4/eff_max, eff_max ~ 3·5/4) when the imatrix favours the leading
    group. Random signs, with even parity per group for the parity types (no flips)."""
    p = iq2.PARAMS[qtype]
    t = tables(qtype)
    anchor = t.coords[np.argmax((t.levels == 2).sum(axis=1))]
    per = p.sub // 8 - 1
    n_sub = -(-points.shape[0] // per)
    n_sub += -n_sub % (256 // p.sub)
    groups = np.tile(anchor, (n_sub, per + 1, 1))
    flat = groups[:, 1:].reshape(-1, 8)
    flat[: points.shape[0]] = points
    flat[points.shape[0] :] = points[rng.integers(0, points.shape[0], flat.shape[0] - points.shape[0])]
    groups[:, 1:] = flat.reshape(n_sub, per, 8)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), (n_sub * (per + 1), 8))
    if p.parity:
        signs[:, 7] *= np.prod(signs, axis=1)
    return (groups.reshape(-1, 8) * signs).reshape(-1, 256).astype(np.float32)


def _iq1_grid_rows(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Groups at level vectors ``points`` [n, 8] (0, 1, 2 = -1, 0, +1), times a random scale per sub-block:
    the exact three-way split reproduces them, so each group is looked up at its own key."""
    n = -(-points.shape[0] // 32) * 32
    flat = np.concatenate([points, points[rng.integers(0, points.shape[0], n - points.shape[0])]])
    x = (flat.astype(np.float32) - 1).reshape(-1, 256)
    return (x * rng.uniform(0.5, 2, (x.shape[0], 1))).astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_every_grid_point_and_neighbour_list_against_ggml(qtype: T) -> None:
    """Groups at every grid point come out as that index in ggml's bytes (all indices used), and groups at
    every reachable off-grid key go through that key's neighbour list; ours equal ggml's bytes."""
    rng = np.random.default_rng(int(qtype))
    t = tables(qtype)
    keys = np.flatnonzero(t.kmap != grids.NO_LIST)
    off = keys[t.kmap[keys] < 0]
    if qtype in IQ2_TYPES:
        on_rows = _iq2_grid_rows(qtype, t.coords, rng)
        off_rows = _iq2_grid_rows(qtype, 2 * grids.unpack_levels(off, 8, 2).astype(np.float32) + 1, rng)
    else:
        on_rows = _iq1_grid_rows(t.levels, rng)
        off_rows = _iq1_grid_rows(grids.unpack_levels(off, 8, 2), rng)
    for x, what in ((on_rows, "grid points"), (off_rows, "off-grid keys")):
        im = (rng.random(x.shape[1]) + 0.1).astype(np.float32)
        if qtype in IQ2_TYPES:
            im[np.arange(256) % iq2.PARAMS[qtype].sub < 8] *= 100  # the leading groups dominate XXS's start
        ref = check_reference(qtype, x, im, what)
        if what == "grid points":
            assert np.unique(grid_indices(qtype, ref)).size == t.size
        if qtype not in NEEDS_IMATRIX:
            check_reference(qtype, x, None, what + ", no imatrix")


# --------------------------------------------------------------------------------------------- data


def adversarial(rng: np.random.Generator) -> np.ndarray:
    """One 256-weight super-block per row for each degenerate pattern (none of them makes ggml abort)."""
    g = rng.standard_normal(256)
    one = np.zeros(256)
    one[37] = -0.4
    signed_zeros = np.where(rng.random(256) < 0.5, -0.0, 0.0)
    holes = g.copy()
    holes[16:32] = 0  # an exactly-zero 16-weight sub-block (IQ2_XS/IQ2_S, IQ1_M)
    holes[64:96] = 0  # and a 32-weight one (IQ2_XXS, IQ1_S)
    tiny_sub = g.copy()
    tiny_sub[128:160] *= 1e-9  # below IQ2_S's / IQ1_M's zero test, not below the others'
    odd = np.abs(g) * 0.01
    odd[0:8] = [-3.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]  # odd parity: the flip lands on a small one
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
        np.full(256, 1e-44) * np.sign(g),
        g * 1e9,  # large, still below what makes ggml abort
        np.where(np.arange(256) % 3 == 0, 65504.0, -65520.0),
        np.where(np.arange(256) % 2, 1.0, -1.0),
        one,
        signed_zeros + np.abs(g) * (rng.random(256) < 0.3),
        np.round(g * 4) / 4,  # many exact ties (IQ1's sort must be stable)
        np.round(g * 64) / 64,
        np.concatenate([np.zeros(128), g[:128]]),
        g * np.where(np.arange(256) < 32, 1000.0, 1.0),  # one loud sub-block
        np.where(np.arange(256) == 200, 3.0, g * 0.01),  # a single outlier
        -np.abs(g),
        np.abs(g),
        holes,
        tiny_sub,
        odd,
        rng.integers(-2, 3, 256).astype(np.float64),
    ]
    return np.stack(rows).astype(np.float32)


def make_imatrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "random":
        return rng.random(n).astype(np.float32) + np.float32(0.01)
    # "sparse": columns never activated (0) and a wide dynamic range, as real imatrices have
    return np.where(rng.random(n) < 0.3, 0.0, rng.random(n) ** 4 * 100).astype(np.float32)


def imatrix_kinds(qtype: T) -> list[str]:
    return ["random", "sparse"] if qtype in NEEDS_IMATRIX else ["none", "random", "sparse"]


CASES = [(t, k) for t in TYPES for k in imatrix_kinds(t)]


def _case_id(case: tuple[T, str]) -> str:
    return f"{case[0].name}-{case[1]}"


# --------------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_adversarial_blocks_match_ggml(case: tuple[T, str]) -> None:
    qtype, kind = case
    rng = np.random.default_rng([int(qtype), len(kind)])
    x = adversarial(rng)
    check_reference(qtype, x, make_imatrix(kind, x.shape[1], rng), "adversarial")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_random_rows_match_ggml(case: tuple[T, str]) -> None:
    qtype, kind = case
    rng = np.random.default_rng([int(qtype), len(kind), 1])
    x = np.concatenate([rng.normal(0, 0.02, (4, 512)), rng.standard_t(2, (4, 512)) * 0.01]).astype(np.float32)
    check_reference(qtype, x, make_imatrix(kind, x.shape[1], rng), "random")


@pytest.fixture(scope="module")
def real_rows(smollm2_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """16 rows of a real SmolLM2 down_proj (1536 = 6 super-blocks), zero blocks in two, and a realistic
    imatrix: mean squared MLP activations of 64 tokens' embeddings through layer 0."""

    def read(f, name: str, rows: slice | None = None) -> np.ndarray:
        t = f.get_slice(name)
        return (t[rows] if rows is not None else t[:]).float().numpy()

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        h = read(f, "model.embed_tokens.weight", slice(1000, 1064))
        norm = read(f, "model.layers.0.input_layernorm.weight")
        h = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + 1e-5) * norm
        gate = h @ read(f, "model.layers.0.mlp.gate_proj.weight").T
        act = gate / (1 + np.exp(-gate)) * (h @ read(f, "model.layers.0.mlp.up_proj.weight").T)
        down = read(f, "model.layers.0.mlp.down_proj.weight", slice(0, 16)).astype(np.float32)
    down[3, 256:288] = 0
    down[5, :256] = 0
    return np.ascontiguousarray(down), np.mean(act * act, axis=0).astype(np.float32)


@pytest.mark.parametrize("imatrix", ["none", "real"])
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_real_rows_match_ggml(real_rows, qtype: T, imatrix: str) -> None:
    x, im = real_rows
    if imatrix == "none" and qtype in NEEDS_IMATRIX:
        with pytest.raises(BadInput, match="needs an importance matrix"):
            REF[qtype].quantize(x, None)
        return
    check_reference(qtype, x, im if imatrix == "real" else None, "SmolLM2 down_proj")


def test_imatrix_changes_the_bytes() -> None:
    """Guards the tests themselves: the imatrix path is really exercised."""
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (2, 256)).astype(np.float32)
    im = make_imatrix("sparse", 256, rng)
    for qtype in (T.IQ2_S, T.IQ1_M):
        assert not np.array_equal(REF[qtype].quantize(x), REF[qtype].quantize(x, im))
    ones = np.ones(256, np.float32)
    for qtype in NEEDS_IMATRIX:
        assert not np.array_equal(REF[qtype].quantize(x, im), REF[qtype].quantize(x, ones))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ2_XS], ids=_name)
def test_negative_scale_complements_the_signs(qtype: T) -> None:
    """An imatrix can make a sub-block's best scale negative: with parity signs the flipped -|x| can
    dominate sumqx; ggml then negates the scale and complements the sign bits ("should never happen")."""
    x = np.zeros((1, 256), np.float32)
    x[0, :8] = [-0.001, 1, 1, 1, 1, 1, 1, 1]
    im = np.ones(256, np.float32)
    im[0] = 1e6
    ref = check_reference(qtype, x, im)
    if qtype == T.IQ2_XXS:
        assert ref[0, 6:10].tolist() == [255, 255, 255, 255]  # 28 complemented sign bits and ls = 15


@pytest.mark.parametrize("qtype", sorted(NEEDS_IMATRIX, key=int), ids=_name)
def test_types_that_need_an_imatrix_refuse_none(qtype: T) -> None:
    with pytest.raises(BadInput, match=f"{qtype.name} needs an importance matrix"):
        REF[qtype].quantize(np.ones((1, 256), np.float32), None)


_G = np.random.default_rng(0).standard_normal(256)
ABORTS = [  # (type, imatrix, row): ggml's GGML_ASSERT kills the process (every neighbour score overflows)
    (T.IQ2_XS, "ones", np.full(256, 1e30) * np.sign(np.arange(256) % 5 - 2.5)),
    (T.IQ2_XS, "ones", np.where(np.arange(256) == 40, np.nan, _G)),
    (T.IQ1_M, "none", np.full(256, 1e30)),
]


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_nan_and_inf_weights(qtype: T) -> None:
    """A NaN or an inf among ordinary weights: where ggml survives (a zero sub-block, or a search that
    still finds a finite score) the bytes match; where it aborts, both refuse (checked in subprocesses
    while porting: IQ2_XS and IQ2_S abort on both, IQ1_M on the inf without an imatrix)."""
    aborts = {(T.IQ2_XS, "ones"), (T.IQ2_S, "none"), (T.IQ2_S, "ones")}
    for bad in (np.nan, np.inf):
        x = np.where(np.arange(256) == 40, bad, _G).astype(np.float32)[None]
        for kind in ("none", "ones"):
            im = None if kind == "none" else np.ones(256, np.float32)
            if im is None and qtype in NEEDS_IMATRIX:
                continue
            if (qtype, kind) in aborts or (qtype, kind, bad) == (T.IQ1_M, "none", np.inf):
                for ours in (REF[qtype].quantize, lambda x, im: quantize(x, qtype, im)):
                    with pytest.raises(BadInput, match="llama.cpp aborts on them"), np.errstate(all="ignore"):
                        ours(x, im)
            else:
                check_reference(qtype, x, im, f"{bad} weight")


@pytest.mark.oracle  # the oracle runs in a subprocess, out of the conftest's sight
@pytest.mark.parametrize("case", ABORTS, ids=lambda c: c[0].name)
def test_weights_ggml_aborts_on_are_refused(case) -> None:
    """We raise BadInput exactly where ggml aborts; the oracle runs in a subprocess (it dies). IQ1_M's
    subprocess rebuilds ggml's IQ1 tables (~15 s)."""
    qtype, kind, row = case
    x = row.astype(np.float32)[None]
    im = np.ones(256, np.float32) if kind == "ones" else None
    for ours in (REF[qtype].quantize, lambda x, im: quantize(x, qtype, im)):
        with pytest.raises(BadInput, match="llama.cpp aborts on them"), np.errstate(all="ignore"):
            ours(x, im)
    code = ("import sys, numpy as np; from tests.oracle.llamacpp import ggml_quantize_chunk as q; "
            "a = np.frombuffer(sys.stdin.buffer.read(), np.float32).reshape(-1, 256); "
            f"q({int(qtype)}, a[:1], a[1] if len(a) > 1 else None)")
    data = x.tobytes() + (b"" if im is None else im.tobytes())
    run = subprocess.run([sys.executable, "-c", code], input=data, cwd=ROOT, capture_output=True)
    assert run.returncode != 0 and b"GGML_ASSERT" in run.stderr


# --------------------------------------------------------------------------------------------- dequantize


def _sample_bytes(qtype: T) -> np.ndarray:
    """Oracle bytes of ordinary data and of zero (sub-)blocks, plus random bytes (every bit pattern)."""
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate([rng.normal(0, 0.02, (8, 256)), adversarial(rng)[[0, 17, 22]]]).astype(np.float32)
    real = ggml_quantize_chunk(qtype, x, (rng.random(256) + 0.1).astype(np.float32))
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
