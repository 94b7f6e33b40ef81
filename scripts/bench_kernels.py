"""Throughput of the fast GGML quantizers (the ggml_fast twins, through qconvert.kernels.quantize) vs
llama.cpp's ggml_quantize_chunk.

    python scripts/bench_kernels.py [--mweights 16] [--types Q4_K,Q6_K] [--c-fraction 0.25] [--lib DIR]
                                    [--repeat 1]

Prints M weights/s for each type, without and with an imatrix (only with one for the types ggml refuses
without: IQ2_XXS, IQ2_XS, IQ1_S), on 1 and 2 threads. ggml_quantize_chunk is
single-threaded: its 2-thread figure runs two row halves in a thread pool (ctypes releases the GIL).
C is timed on the first `--c-fraction` of the rows (it is ~10x slower; throughput does not depend on size).
The C library comes from the llama-cpp-python wheel (tests/oracle/llamacpp.py) unless --lib gives a directory
holding libggml-base.so. Every run also checks that both produce the same bytes on the common rows.
--repeat N reports the best of N runs of each measurement (the fast types take milliseconds per run, so one
run on a busy host mostly measures the other jobs).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qconvert.kernels import FAST_TYPES, block_type, quantize  # noqa: E402


def _c_quantizer(lib: str | None):
    if lib is None:
        from tests.oracle.llamacpp import lib_dir

        lib = str(lib_dir())
    dll = ctypes.CDLL(str(Path(lib) / "libggml-base.so"))
    fn = dll.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_size_t

    def run(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: np.ndarray | None,
            threads: int) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[qtype]
        nrows, n = x.shape
        out = np.empty((nrows, n // block * size), np.uint8)
        im = None if imatrix is None else imatrix.ctypes.data
        bounds = np.linspace(0, nrows, threads + 1).astype(int)

        def part(a: int, b: int) -> None:
            fn(int(qtype), x[a:b].ctypes.data, out[a:b].ctypes.data, 0, b - a, n, im)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, bounds[:-1], bounds[1:]))
        return out

    return run


def _weights(mweights: float, n_per_row: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Real-ish weights: heavy-tailed (Student t, 5 dof), per-row scale spread, a few outlier columns."""
    rng = np.random.default_rng(0)
    nrows = max(2, int(mweights * 1e6) // n_per_row)
    x = rng.standard_t(5, (nrows, n_per_row)).astype(np.float32)
    x *= (0.02 * rng.lognormal(0, 0.3, (nrows, 1))).astype(np.float32)
    x[:, rng.integers(0, n_per_row, 8)] *= np.float32(8.0)
    imatrix = (rng.gamma(0.7, 2.0, n_per_row) ** 2).astype(np.float32)
    return x, imatrix


def _rate(fn, x: np.ndarray, repeat: int = 1) -> tuple[float, np.ndarray]:
    best = 0.0
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        best = max(best, x.size / (time.perf_counter() - t) / 1e6)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mweights", type=float, default=16.0, help="millions of weights (default 16)")
    ap.add_argument("--types", default=",".join(sorted(t.name for t in FAST_TYPES)))
    ap.add_argument("--c-fraction", type=float, default=0.25, help="fraction of rows timed for C")
    ap.add_argument("--lib", default=None, help="directory with libggml-base.so (default: llama_cpp wheel)")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per figure (default 1)")
    args = ap.parse_args()

    c_quant = _c_quantizer(args.lib)
    x, imatrix = _weights(args.mweights)
    xc = np.ascontiguousarray(x[: max(2, int(len(x) * args.c_fraction))])
    print(f"{x.size / 1e6:.1f} M weights ({x.shape[0]} x {x.shape[1]}), C timed on {xc.shape[0]} rows")
    head = (f"{'type':8s} {'imatrix':7s} | {'ours 1t':>8s} {'ours 2t':>8s} | {'C 1t':>7s} {'C 2t':>7s} | "
            f"{'x 1t':>5s} {'x 2t':>5s}")
    print(head)
    print("-" * len(head))
    for name in args.types.split(","):
        qtype = GGMLQuantizationType[name.strip()]
        needs = block_type(qtype).reference.requires_imatrix  # ggml aborts without one
        for im in (imatrix,) if needs else (None, imatrix):
            quantize(x[:2], qtype, im, threads=1)  # JIT / cache load outside the timing
            r1, ours = _rate(lambda q=qtype, i=im: quantize(x, q, i, threads=1), x, args.repeat)
            r2, _ = _rate(lambda q=qtype, i=im: quantize(x, q, i, threads=2), x, args.repeat)
            c1, ref = _rate(lambda q=qtype, i=im: c_quant(q, xc, i, 1), xc, args.repeat)
            c2, _ = _rate(lambda q=qtype, i=im: c_quant(q, xc, i, 2), xc, args.repeat)
            same = np.array_equal(ours[: len(xc)], ref)
            flag = "" if same else "  BYTES DIFFER"
            imx = "yes" if im is not None else "no"
            print(f"{name:8s} {imx:7s} | {r1:8.1f} {r2:8.1f} | {c1:7.1f} {c2:7.1f} | "
                  f"{r1 / c1:5.1f} {r2 / c2:5.1f}{flag}", flush=True)


if __name__ == "__main__":
    main()
