"""FP8 E4M3 weight quantization: one scale per tensor, per output channel, or per 128×128 block.

    scale = amax / 448          (rounded to the dtype the format stores it in, then used as stored)
    q     = e4m3(clamp(w / scale, -448, 448))          dequant = e4m3 value × scale

The clamp is explicit because casts only saturate on some torch versions, and because a scale rounded down
to bfloat16 can put w / scale a hair above 448. A zero scale (an all-zero row or block) becomes the scale
dtype's eps, as compressed-tensors does, so that nothing divides by zero. The numpy spec of the codes is
kernels/fp8.py; this module uses its torch twin, which tests hold to the same bits.

Static activation scales: amax of the layer's input over the calibration tokens / 448 — the max of the
per-channel maxima, or a percentile of the per-token maxima to ignore rare outlier tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.kernels import fp8 as fp8_kernel
from qconvert.kernels.fp8 import E4M3_MAX

STRATEGIES = ("tensor", "channel", "block")
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FP8Spec:
    strategy: str = "channel"  # tensor | channel | block
    block: tuple[int, int] = (128, 128)  # rows × columns per scale (block strategy only)
    scale_dtype: str = "float32"  # how the format stores scales; quantization uses the stored value

    def check_shape(self, name: str, n: int, k: int) -> None:
        if self.strategy == "block" and (n % self.block[0] or k % self.block[1]):
            bn, bk = self.block
            raise BadInput(
                f"{name}: shape {n}×{k} is not divisible into {bn}×{bk} blocks; skip it with "
                f"--ignore '{re.escape(name)}' or use --scheme dynamic"
            )


@dataclass
class FP8Tensor:
    """The method's result, before any format names it."""

    codes: torch.Tensor  # uint8 E4M3 bit patterns [N, K]
    scale: torch.Tensor  # float32 values of the stored scales: [1], [N, 1] or [N/bn, K/bk]
    spec: FP8Spec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def stored_scale(self) -> torch.Tensor:
        return self.scale.to(SCALE_DTYPES[self.spec.scale_dtype])

    def float8(self) -> torch.Tensor:
        return self.codes.view(torch.float8_e4m3fn)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] = e4m3 × scale (exact in float32: 4 × 8 significant bits at most)."""
        return self.codes.view(torch.float8_e4m3fn).float() * expand_scale(self.scale, self.shape, self.spec)


def round_scale(scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 scale → the value it has once stored in `dtype` (zeros become that dtype's eps)."""
    tdtype = SCALE_DTYPES[dtype]
    stored = scale.to(tdtype)
    stored = torch.where(stored == 0, torch.tensor(torch.finfo(tdtype).eps, dtype=tdtype), stored)
    return stored.float()


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], spec: FP8Spec) -> torch.Tensor:
    """A scale grid broadcast against an [N, K] weight."""
    if spec.strategy != "block":
        return scale  # [1] and [N, 1] broadcast as they are
    bn, bk = spec.block
    return scale.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def weight_amax(w: torch.Tensor, spec: FP8Spec) -> torch.Tensor:
    a = w.abs()
    if spec.strategy == "tensor":
        return a.amax().reshape(1)
    if spec.strategy == "channel":
        return a.amax(dim=1, keepdim=True)
    n, k = a.shape
    bn, bk = spec.block
    return a.reshape(n // bn, bn, k // bk, bk).amax(dim=(1, 3))


def fp8_quantize(w: torch.Tensor | np.ndarray, spec: FP8Spec, name: str = "weight") -> FP8Tensor:
    """Quantize one [N, K] weight. NaN/Inf refuse with the tensor's name (they would poison a whole scale)."""
    w = torch.as_tensor(w)
    if w.ndim != 2:
        raise BadInput(f"{name}: FP8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    w32 = w.float()
    spec.check_shape(name, *w32.shape)
    amax = weight_amax(w32, spec)
    if not torch.isfinite(amax).all():  # amax propagates NaN and Inf: no separate pass over w
        raise BadInput(f"{name}: weight contains NaN or Inf values; refusing to quantize it")
    scale = round_scale(amax / E4M3_MAX, spec.scale_dtype)
    codes = fp8_kernel.quantize_fp8_torch(w32, expand_scale(scale, tuple(w32.shape), spec))
    return FP8Tensor(codes, scale, spec)


def relative_error(w: torch.Tensor | np.ndarray, qt: FP8Tensor) -> float:
    w32 = torch.as_tensor(w).float()
    denom = torch.linalg.vector_norm(w32)
    return float(torch.linalg.vector_norm(qt.dequantize().sub_(w32)) / denom) if denom > 0 else 0.0


def input_scale(
    abs_max: torch.Tensor,
    token_max: torch.Tensor | None = None,
    percentile: float = 100.0,
    scale_dtype: str = "float32",
) -> torch.Tensor:
    """Static per-tensor activation scale [1] (stored-dtype value, as float32).

    percentile 100: the largest |x| seen (llm-compressor's static min-max observer). Below 100: that
    percentile of the per-token maxima (needs the calibration engine's token_max statistic)."""
    if percentile >= 100.0:
        amax = abs_max.float().max()
    else:
        if token_max is None or token_max.numel() == 0:
            raise ValueError("a percentile needs per-token maxima (stat kind token_max)")
        # numpy: torch.quantile refuses more than 2^24 values (~16 M calibration tokens)
        amax = torch.tensor(float(np.quantile(token_max.float().flatten().numpy(), percentile / 100.0)))
    return round_scale((amax / E4M3_MAX).reshape(1), scale_dtype)
