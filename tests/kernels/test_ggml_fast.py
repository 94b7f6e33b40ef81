"""Fast numba GGML quantizers (the registered twins, through qconvert.kernels.quantize): byte-identical to
llama.cpp's ggml_quantize_chunk (x86-64) and to the numpy reference, independent of the thread count, and
compiled without fused multiply-adds."""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from safetensors import safe_open

from qconvert.errors import BadInput
from qconvert.kernels import FAST_TYPES, block_type, quantize
from qconvert.kernels.ggml_fast import (
    _core,
    _fp4,
    _grids,
    _iq1,
    _iq2,
    _iq3,
    _iq4,
    _kquants,
    _legacy,
    _lowbit,
    _search,
)
from tests.oracle.llamacpp import ggml_quantize_chunk

T = GGMLQuantizationType
TYPES = sorted(FAST_TYPES, key=lambda t: t.name)
N = 512  # row length: two super-blocks, sixteen 32-blocks
# lattice-grid types: ggml aborts (GGML_ASSERT) on weights so large that every neighbour score overflows;
# those rows are left out here, and test_ggml_iq3 / test_ggml_iq2_fast check that we refuse them
GRID_TYPES = {T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M}
# the types ggml refuses without an imatrix (it aborts; we raise BadInput)
NEEDS_IMATRIX = {T.IQ2_XXS, T.IQ2_XS, T.IQ1_S}
GRID_MAX_ABS = 1e15


def _rows_for(qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    return x[np.abs(x).max(axis=1) < GRID_MAX_ABS] if qtype in GRID_TYPES else x


def _refused(qtype: GGMLQuantizationType, x: np.ndarray, im: np.ndarray | None) -> bool:
    """Without an imatrix, the types ggml refuses must be refused by the twin too (then True)."""
    if im is not None or qtype not in NEEDS_IMATRIX:
        return False
    with pytest.raises(BadInput, match="needs an importance matrix"):
        quantize(x, qtype, None)
    return True


def _imatrix(n: int, seed: int) -> np.ndarray:
    """Mean squared activations look like this: positive, heavy-tailed, some (near) zero."""
    rng = np.random.default_rng(seed)
    im = (rng.gamma(0.7, 2.0, n) ** 2).astype(np.float32)
    im[rng.random(n) < 0.05] = 0.0
    return im


def _special_rows(n: int) -> np.ndarray:
    """Degenerate blocks: all-zero, constant, tiny, huge, a single non-zero, ties, one-signed."""
    rng = np.random.default_rng(7)
    rows = [np.full(n, v, np.float32) for v in (0.0, 1.0, -0.5, 1e-30, -1e-30, 1e30, -1e30, 3e4, 1e-8)]
    one = np.zeros(n, np.float32)
    one[5] = -2.0
    sparse = np.zeros(n, np.float32)
    sparse[::37] = 1.0
    mixed = rng.standard_normal(n).astype(np.float32)
    mixed[100:200] = 1e30
    holes = rng.standard_normal(n).astype(np.float32)
    holes[::16] = 0.0
    holes[256:288] = 0.0
    rows += [one, sparse, mixed, holes,
             (rng.standard_normal(n) * 1e30).astype(np.float32),
             (rng.standard_normal(n) * 1e-30).astype(np.float32),
             np.round(rng.standard_normal(n) * 4).astype(np.float32),  # many exact ties
             rng.integers(-3, 4, n).astype(np.float32),
             np.abs(rng.standard_normal(n)).astype(np.float32),
             -np.abs(rng.standard_normal(n)).astype(np.float32)]
    return np.stack(rows)


def _random_rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.concatenate([
        (rng.standard_normal((24, n)) * 0.02).astype(np.float32),
        rng.uniform(-1, 1, (16, n)).astype(np.float32),
        (rng.standard_t(2, (16, n)) * 0.01).astype(np.float32),  # heavy tails / outliers
        (rng.laplace(0, 1, (16, n)) * 5).astype(np.float32),
    ])


def _assert_same(qtype: GGMLQuantizationType, got: np.ndarray, want: np.ndarray, what: str) -> None:
    size = GGML_QUANT_SIZES[qtype][1]
    assert got.shape == want.shape and got.dtype == np.uint8
    bad = np.nonzero((got.reshape(-1, size) != want.reshape(-1, size)).any(axis=1))[0]
    assert bad.size == 0, f"{qtype.name} {what}: {bad.size}/{got.size // size} blocks differ, first {bad[:8]}"


@pytest.fixture(scope="module")
def real_weights(smollm2_dir) -> np.ndarray:
    """128 rows of a real SmolLM2 MLP weight (row length 1536 = 6 super-blocks), with some zero blocks."""
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("layers.0.mlp.down_proj.weight"))
        w = f.get_slice(name)[:128].float().numpy().astype(np.float32)
    w = np.ascontiguousarray(w)
    w[7, :256] = 0.0
    w[9, 64:96] = 0.0
    return w


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_and_special_blocks_match_llamacpp(qtype, use_imatrix):
    x = _rows_for(qtype, np.concatenate([_random_rows(N), _special_rows(N)]))
    im = _imatrix(N, 1) if use_imatrix else None
    if _refused(qtype, x, im):
        return
    with np.errstate(all="ignore"):
        got = quantize(x, qtype, im, threads=2)
        _assert_same(qtype, got, ggml_quantize_chunk(qtype, x, im), "fuzz")


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_real_weights_match_llamacpp(real_weights, qtype, use_imatrix):
    im = _imatrix(real_weights.shape[1], 2) if use_imatrix else None
    if _refused(qtype, real_weights, im):
        return
    got = quantize(real_weights, qtype, im)
    _assert_same(qtype, got, ggml_quantize_chunk(qtype, real_weights, im), "SmolLM2 down_proj")


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_numpy_reference(qtype, use_imatrix):
    """Same bytes as the executable spec (qconvert.kernels.ggml), on a small input (the spec is slow)."""
    reference = block_type(qtype).reference
    x = _rows_for(qtype, np.concatenate([_random_rows(N)[::8], _special_rows(N)[[0, 1, 9, 12]]]))
    im = _imatrix(N, 4) if use_imatrix else None
    if _refused(qtype, x, im):
        with pytest.raises(BadInput, match="needs an importance matrix"):
            reference.quantize(x, None)
        return
    with np.errstate(all="ignore"):
        _assert_same(qtype, quantize(x, qtype, im), reference.quantize(x, im), "numpy reference")


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q4_0, T.Q8_0, T.IQ3_S, T.TQ1_0, T.MXFP4,
                                   T.IQ2_XS, T.IQ1_M], ids=lambda t: t.name)
def test_bytes_do_not_depend_on_thread_count(qtype):
    x = _random_rows(1024)[:37]  # rows not divisible by the thread counts
    im = _imatrix(1024, 5)
    for imx in ((im,) if qtype in NEEDS_IMATRIX else (None, im)):
        one = quantize(x, qtype, imx, threads=1)
        for threads in (2, 3, None):
            _assert_same(qtype, quantize(x, qtype, imx, threads=threads), one, f"threads={threads}")


def test_rejects_bad_input():
    x = np.zeros((2, 512), np.float32)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quantize(np.zeros((2, 96), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize(x, T.Q4_K, np.ones(256, np.float32))
    with pytest.raises(ValueError, match="no GGUF kernel"):  # Q8_K: ggml's dot-product type, never stored
        quantize(x, T.Q8_K)
    assert quantize(np.zeros((0, 512), np.float32), T.Q6_K).shape == (0, 420)


_FMA = re.compile(r"\bvfn?m(?:add|sub)")  # vfmadd*, vfmsub*, vfnmadd*, vfnmsub* (FMA3/FMA4)


def _dispatchers():
    for mod in (_core, _search, _kquants, _legacy, _iq4, _grids, _iq3, _lowbit, _fp4, _iq2, _iq1):
        for value in vars(mod).values():
            if isinstance(value, numba.core.registry.CPUDispatcher):
                yield value


@pytest.mark.slow  # recompiles every kernel signature without numba's cache: minutes
def test_compiled_kernels_contain_no_fma():
    """FMA contraction would change the bytes (gguf.md §2.4.7, §8): scan the machine code of every kernel.

    Cached code cannot be inspected, so each compiled signature is recompiled here without the cache."""
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    for qtype in TYPES:  # populate the signatures the public entry point uses
        if qtype not in NEEDS_IMATRIX:
            quantize(x, qtype)
        quantize(x, qtype, np.ones(512, np.float32))
    options = {**_core.JIT, "cache": False}
    done: set[tuple[str, object]] = set()
    scanned = 0
    while True:  # compiling a caller registers its callees' signatures: repeat until nothing new
        todo = [(d, s) for d in _dispatchers() for s in d.signatures
                if (d.py_func.__qualname__, s) not in done]
        if not todo:
            break
        for disp, sig in todo:
            done.add((disp.py_func.__qualname__, sig))
            fresh = numba.njit(**options)(disp.py_func)
            fresh.compile(sig)
            asm = fresh.inspect_asm(sig)
            assert asm.count("\n") > 20, f"{disp.py_func.__qualname__}: no assembly to inspect"
            found = _FMA.findall(asm)
            assert not found, f"{disp.py_func.__qualname__}{sig}: {len(found)} fused multiply-adds"
            scanned += 1
    names = {name for name, _ in done}
    kernels = ("q45k_ref", "q45k_impl", "q6k", "q2k", "q3k", "make_qkx", "make_qx", "make_qp", "iq4", "iq3",
               "tq1_0", "tq2_0", "q1_0", "q2_0", "mxfp4", "nvfp4", "iq2", "make_qp32", "kernel_s", "kernel_m",
               "_splits_s", "_splits_m")
    for kernel in kernels:
        assert kernel in names, f"{kernel} was not scanned"
    assert scanned >= 15
