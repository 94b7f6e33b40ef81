"""Fast twins of the GGML block quantizers: numba, multi-threaded, byte-identical to the NumPy reference.

The kernels are literal float32 ports of ggml-quants.c (x86-64 build, no FMA) laid out as "lanes":
64 blocks side by side so each step vectorizes while every block keeps C's order of operations
(shared/reference/gguf.md §8). Which type has which twin is said once, in qconvert.kernels.registry;
callers go through ``qconvert.kernels.quantize``.

Every twin has the same calling convention (FastKernel):

    twin(blocks, qw, nbr, out, use_qw) -> None
      blocks  float32 [nblocks, block_size], C-contiguous: whole rows of nbr blocks each, row after row
      qw      float32 [n_per_row], the importance matrix (a 1-element dummy when use_qw is False)
      nbr     blocks per row (the column of block b is (b % nbr) * block_size)
      out     uint8 [nblocks, type_size], written in place
      use_qw  whether an imatrix was given (a type ggml quantizes without one ignores it)

A twin may be a numba kernel itself or a small Python function choosing among several (imatrix / no
imatrix paths, a flag shared by two types). One that must refuse an input (where ggml would abort)
raises BadInput. `run` splits the rows into contiguous chunks, one per thread; blocks never cross
rows, so the bytes do not depend on the thread count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FastKernel = Callable[[np.ndarray, np.ndarray, int, np.ndarray, bool], None]


def _run_chunk(twin: FastKernel, block_size: int, x: np.ndarray, imatrix: np.ndarray | None,
         out: np.ndarray) -> None:
    """Quantize whole rows x [nrows, n_per_row] into out [nrows, row_bytes] on the calling thread."""
    nrows, n_per_row = x.shape
    nbr = n_per_row // block_size
    blocks = x.reshape(nrows * nbr, block_size)
    use_qw = imatrix is not None
    twin(blocks, imatrix if use_qw else np.zeros(1, np.float32), nbr, out.reshape(nrows * nbr, -1), use_qw)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_CHUNKS_PER_THREAD = 4  # several row chunks per thread: a thread slowed by other work (the convert
                        # pipeline reads the next tensor meanwhile) does not hold the others up


def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count for the whole process (a tensor is a few ms of work for small models)."""
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="qconvert-quant")
    return pool


def run(twin: FastKernel, block_size: int, type_size: int, x: np.ndarray, imatrix: np.ndarray | None,
        threads: int | None = None) -> np.ndarray:
    """x: C-contiguous float32 [nrows, n_per_row] (a multiple of block_size); imatrix: float32 [n_per_row]
    or None (both checked by the caller). Returns uint8 [nrows, n_per_row // block_size * type_size]."""
    nrows, n_per_row = x.shape
    out = np.empty((nrows, n_per_row // block_size * type_size), np.uint8)
    if out.size == 0:
        return out
    threads = (os.cpu_count() or 1) if threads is None else max(1, int(threads))
    # enough work per chunk to amortise the pool; chunks are whole rows so bytes never depend on `threads`
    chunks = min(threads * _CHUNKS_PER_THREAD, nrows, max(1, x.size // (1 << 16)))
    if threads <= 1 or chunks <= 1:
        _run_chunk(twin, block_size, x, imatrix, out)
        return out
    bounds = np.linspace(0, nrows, chunks + 1).astype(int)
    pool = _pool(threads)
    spans = zip(bounds[:-1], bounds[1:], strict=True)
    jobs = [pool.submit(_run_chunk, twin, block_size, x[a:b], imatrix, out[a:b]) for a, b in spans]
    for job in jobs:
        job.result()
    return out
