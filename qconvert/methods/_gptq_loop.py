"""The GPTQ column loop of one block, compiled with numba (the spec is gptq.column_loop_reference).

Float32 throughout, the reference's operations in its order; no fastmath, so no fused multiply-adds: the
results are the reference's to the bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def block_loop(w1, u1, s, z, maxq, codes, err1, losses):  # pragma: no cover - compiled
    n, b = w1.shape
    zero = np.float32(0.0)
    two = np.float32(2.0)
    for i in range(b):
        d = u1[i, i]
        for r in range(n):
            x = w1[r, i]
            q = np.float32(np.rint(x / s[r, i])) + z[r, i]
            q = min(max(q, zero), maxq)
            deq = s[r, i] * (q - z[r, i])
            codes[r, i] = q
            diff = x - deq
            losses[r] += diff * diff / (d * d) / two
            e = diff / d
            err1[r, i] = e
            for j in range(i, b):
                w1[r, j] -= e * u1[i, j]
