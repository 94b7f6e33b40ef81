"""FP4 E2M1 elements, shared by every FP4 format we write: GGUF's MXFP4 / NVFP4 blocks
(kernels/ggml/fp4_blocks.py and their numba twins) and the packed compressed-tensors schemes.

A code is 4 bits: sign (bit 3), 2 exponent bits, 1 mantissa bit. Magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6:

    code   0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15
    E2M1   0  0.5    1  1.5    2    3    4    6   -0 -0.5   -1 -1.5   -2   -3   -4   -6

The formats differ in how a value is rounded to a code and how codes are packed; only the element code is
shared. This module has each rounding rule once:

* ``nearest_ggml(x, d)`` -- ggml's ``best_index_mxfp4`` (ggml-quants.c): scan codes 0..15 and keep the
  first minimum of ``|kvalues_fp4[c]*d - x|`` in float32. ``kvalues_fp4`` is E2M1 *doubled* (0, 1, 2, 3, 4,
  6, 8, 12, ...), so ``d`` is half the real scale. First-minimum means: zero (and -0.0, NaN, ±inf) -> code 0,
  never 8; an exact tie between two magnitudes goes to the smaller one (toward zero); beyond 6·scale clamps
  to ±6. ggml decodes code 8 as +0 (``kvalues_fp4[8] == 0``).
* ``nearest_ggml_run`` -- the numba twin of it. It scans only the 8 magnitudes of |x|; this is the same as
  C's 16-code scan because, for x >= 0, each negative code's error ``round(a + x)`` is never below the
  positive one's ``round(|a - x|)`` (rounding is monotone, and ties keep the earlier, positive code), and for
  x < 0 every positive code's ``round(a + |x|)`` is at least code 0's ``|x|``, while code 8+c's error is
  exactly ``round(|a - |x||)``. So the answer is the first minimum m over magnitudes, made negative (m + 8)
  only when x < 0 and m > 0.
* ``encode_rne(v)`` -- round to nearest, ties to even, saturating at ±6; the sign bit is set for v < 0, so
  small negatives give code 8 (-0) while -0.0 itself gives code 0 (torch.sign(-0.0) is 0). This is
  compressed-tensors' ``cast_to_fp4`` + ``pack_fp4_to_uint8``
  (quantization/utils/fp4_utils.py, compressors/nvfp4/helpers.py), i.e. what vLLM checkpoints hold.
  Thresholds on |v|: <= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1, < 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3,
  <= 5 -> 4, else 6. It differs from ggml's rule on the ties 0.75, 1.75 and 3.5 (ggml rounds them down) and
  on the sign of zero.

``decode(codes)`` gives the true E2M1 values (code 8 = -0.0).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ggml_fast._core import F0, JIT

F32 = np.float32

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=F32)
# kvalues_fp4 / kvalues_mxfp4 (ggml-common.h): E2M1 doubled as int8; code 8 is a plain 0
KVALUES_GGML = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=F32)
_K1, _K2, _K3, _K4, _K6, _K8, _K12 = (F32(k) for k in KVALUES_GGML[1:8])  # numba freezes these constants
_C = tuple(np.int32(c) for c in range(9))  # int32 codes keep the vector lanes 32-bit wide

# encode_rne: (upper bound on |v|, bound included) of the buckets of codes 0..6; above the last -> 7
_RNE_BOUNDS = (
    (0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True),
)  # fmt: skip


def decode(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (any integer array) -> float32 E2M1 values."""
    return E2M1[np.asarray(codes) & 0xF]


def nearest_ggml(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """best_index_mxfp4(x, d) elementwise (x and d broadcast): int32 codes 0..15, C's first minimum."""
    x = np.asarray(x, dtype=F32)
    d = np.asarray(d, dtype=F32)
    best = np.abs(KVALUES_GGML[0] * d - x)
    idx = np.zeros(np.broadcast(x, d).shape, dtype=np.int32)
    for c in range(1, 16):
        err = np.abs(KVALUES_GGML[c] * d - x)
        better = err < best  # strict: the first minimum wins, NaN never wins
        idx = np.where(better, c, idx)
        best = np.where(better, err, best)
    return idx


@njit(inline="always", **JIT)
def _keep_first_min(v, a, c, best, code):
    err = np.abs(a - v)
    better = err < best  # strict, and false for NaN: the first minimum stays (compiles to vminps + blend)
    return (err if better else best), (c if better else code)


@njit(inline="always", **JIT)
def nearest_ggml_run(x, base, n, d, codes, cbase):
    """best_index_mxfp4(x[base + j], d) for j < n into codes[cbase + j] (int32): the 8-magnitude scan of the
    module docstring, unrolled so that LLVM vectorises over j (a literal n in the caller becomes a constant
    trip count once this is inlined). The magnitudes ``KVALUES_GGML[c]*d`` are the C products."""
    a1, a2, a3, a4 = _K1 * d, _K2 * d, _K3 * d, _K4 * d
    a6, a8, a12 = _K6 * d, _K8 * d, _K12 * d
    for j in range(n):
        xv = x[base + j]
        v = np.abs(xv)
        best, code = v, _C[0]  # code 0: |0*d - x| = |x|
        best, code = _keep_first_min(v, a1, _C[1], best, code)
        best, code = _keep_first_min(v, a2, _C[2], best, code)
        best, code = _keep_first_min(v, a3, _C[3], best, code)
        best, code = _keep_first_min(v, a4, _C[4], best, code)
        best, code = _keep_first_min(v, a6, _C[5], best, code)
        best, code = _keep_first_min(v, a8, _C[6], best, code)
        best, code = _keep_first_min(v, a12, _C[7], best, code)
        codes[cbase + j] = code + (_C[8] if (xv < F0) & (code > _C[0]) else _C[0])


def encode_rne(v: np.ndarray) -> np.ndarray:
    """Already-scaled values -> uint8 E2M1 codes, round to nearest even, saturating (compressed-tensors'
    rule; finite inputs, ±inf saturate)."""
    v = np.asarray(v, dtype=F32)
    a = np.abs(v)
    mag = np.full(v.shape, 7, dtype=np.uint8)
    for code in range(6, -1, -1):  # from the top bucket down: the lowest matching bucket is written last
        bound, inclusive = _RNE_BOUNDS[code]
        below = (a <= F32(bound)) if inclusive else (a < F32(bound))
        mag = np.where(below, np.uint8(code), mag)
    return mag | ((v < 0).astype(np.uint8) << 3)
