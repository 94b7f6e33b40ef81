"""Fast twins of the GGML block quantizers: numba, multi-threaded, byte-identical to `ggml.quantize`.

    from qconvert.kernels import ggml_fast
    q = ggml_fast.quantize(x, GGMLQuantizationType.Q4_K, imatrix=None, threads=None)
    # q: uint8 [nrows, row_bytes]

The kernels are literal float32 ports of ggml-quants.c (x86-64 build, no FMA) laid out as "lanes":
64 blocks side by side so each step vectorizes while every block keeps C's order of operations
(shared/reference/gguf.md §8). Rows are split into contiguous chunks, one per thread; blocks never
cross rows, so the bytes do not depend on the thread count. Types outside SUPPORTED fall back to the
numpy reference in the caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _iq3, _iq4, _kquants, _legacy

T = GGMLQuantizationType

# qtype -> (kernel without imatrix, kernel with imatrix, extra flag passed to the kernel)
_KERNELS: dict[GGMLQuantizationType, tuple[Callable, Callable, bool]] = {
    T.Q4_K: (_kquants.q45k_ref, _kquants.q45k_impl, False),
    T.Q5_K: (_kquants.q45k_ref, _kquants.q45k_impl, True),
    T.Q6_K: (_kquants.q6k, _kquants.q6k, None),
    T.Q2_K: (_kquants.q2k, _kquants.q2k, None),
    T.Q3_K: (_kquants.q3k, _kquants.q3k, None),
    T.Q8_0: (_legacy.q8_0, _legacy.q8_0, None),
    T.Q4_0: (_legacy.q4_0_ref, _legacy.q40_50_impl, False),
    T.Q5_0: (_legacy.q5_0_ref, _legacy.q40_50_impl, True),
    T.Q4_1: (_legacy.q4_1_ref, _legacy.q41_51_impl, False),
    T.Q5_1: (_legacy.q5_1_ref, _legacy.q41_51_impl, True),
    T.IQ4_NL: (_iq4.iq4, _iq4.iq4, False),
    T.IQ4_XS: (_iq4.iq4, _iq4.iq4, True),
    T.IQ3_XXS: (_iq3.iq3_xxs, _iq3.iq3_xxs, None),
    T.IQ3_S: (_iq3.iq3_s, _iq3.iq3_s, None),
}

SUPPORTED: set[GGMLQuantizationType] = set(_KERNELS)

# the imatrix-less Q4_0/Q4_1/Q5_0/Q5_1 kernels and Q8_0 ignore this; the row-based imatrix paths need sigma2
_ROW_SIGMA = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}


def _run(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: np.ndarray | None, out: np.ndarray) -> None:
    """Quantize whole rows x [nrows, n_per_row] into out [nrows, row_bytes] on the calling thread."""
    block, _ = GGML_QUANT_SIZES[qtype]
    nrows, n_per_row = x.shape
    blocks = x.reshape(nrows * (n_per_row // block), block)
    outb = out.reshape(blocks.shape[0], -1)
    plain, weighted, flag = _KERNELS[qtype]
    use_qw = imatrix is not None and qtype != T.Q8_0  # Q8_0 ignores the imatrix (ggml-quants.c)
    qw = imatrix if use_qw else np.zeros(1, np.float32)
    kernel = weighted if use_qw else plain
    if flag is None:
        kernel(blocks, qw, n_per_row // block, outb, use_qw)
    elif qtype in _ROW_SIGMA and use_qw:
        kernel(blocks, qw, n_per_row // block, outb, flag, _legacy.row_sigma2(x))
    elif qtype in (T.IQ4_NL, T.IQ4_XS):
        kernel(blocks, qw, n_per_row // block, outb, flag, use_qw)
    else:
        kernel(blocks, qw, n_per_row // block, outb, flag)


def _check(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> tuple[np.ndarray, ...]:
    if qtype not in SUPPORTED:
        raise ValueError(f"ggml_fast has no kernel for {qtype.name}; use qconvert.kernels.ggml")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D float32 array, got shape {x.shape}")
    block, _ = GGML_QUANT_SIZES[qtype]
    if x.shape[1] % block:
        raise ValueError(f"{qtype.name}: row length {x.shape[1]} is not a multiple of {block}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != x.shape[1]:
            raise ValueError(f"imatrix has {imatrix.shape[0]} values for rows of {x.shape[1]}")
    return x, imatrix


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """Same bytes as `ggml.quantize` / ggml_quantize_chunk: uint8 [nrows, n_per_row // block * type_size]."""
    qtype = GGMLQuantizationType(qtype)
    x, imatrix = _check(x, qtype, imatrix)
    block, size = GGML_QUANT_SIZES[qtype]
    nrows, n_per_row = x.shape
    out = np.empty((nrows, n_per_row // block * size), np.uint8)
    if out.size == 0:
        return out
    threads = (os.cpu_count() or 1) if threads is None else max(1, int(threads))
    # enough work per thread to amortise the pool; chunks are whole rows so bytes never depend on `threads`
    threads = min(threads, nrows, max(1, x.size // (1 << 16)))
    if threads <= 1:
        _run(qtype, x, imatrix, out)
        return out
    bounds = np.linspace(0, nrows, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        spans = zip(bounds[:-1], bounds[1:], strict=True)
        jobs = [pool.submit(_run, qtype, x[a:b], imatrix, out[a:b]) for a, b in spans]
        for job in jobs:
            job.result()
    return out
