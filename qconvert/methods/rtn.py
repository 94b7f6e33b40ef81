"""Round-to-nearest: per-group min/max (or MSE-grid) scales, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qconvert.methods.plan import IntOptions, Job, LayerPlan
from qconvert.methods.quantizer import find_params, grouped_tensor
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec


@dataclass(frozen=True)
class Config(IntOptions):
    def check(self) -> None:
        return None

    def pack_options(self, lm_head: bool) -> PackOptions:
        return PackOptions(method="rtn", lm_head=lm_head)


def run(job: Job) -> None:
    """Tensor by tensor: no data, so nothing but the weight itself."""

    def quantize(p: LayerPlan, w: torch.Tensor) -> tuple[QuantizedTensor, float]:
        assert isinstance(p.spec, QuantSpec)
        qt = rtn_quantize(w, p.spec)
        return qt, relative_error(w, qt)

    job.stream(quantize)


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
