"""Round-to-nearest: per-group min/max (or MSE-grid) scales, no calibration data."""

from __future__ import annotations

import numpy as np
import torch

from qconvert.methods.quantized import QuantizedTensor
from qconvert.methods.quantizer import QuantSpec, find_params, grouped_tensor


def _as_float32(weight: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.detach().to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))


def rtn_quantize(weight: np.ndarray | torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize ``W [N, K]`` group by group; ``K`` must be a multiple of the group (callers check and name
    the layer)."""
    w = _as_float32(weight)
    n, k = w.shape
    g = spec.group_for(k)
    if k % g:
        raise ValueError(f"group size {g} does not divide {k} input columns")
    rows = w.reshape(n * (k // g), g)
    scale, zero = find_params(rows, spec)
    return grouped_tensor(rows, scale, zero, (n, k), spec)


def relative_error(weight: np.ndarray | torch.Tensor, qt: QuantizedTensor) -> float:
    """``||W - deq(Q)|| / ||W||`` (Frobenius): the number the progress bar and the summary show."""
    w = _as_float32(weight).numpy()
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - qt.dequantize())) / norm if norm else 0.0
