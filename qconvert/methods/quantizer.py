"""Per-row scale / zero search for integer weight quantization (checkpoint-formats.md §1.4, §2 find_params).

The row is the unit: callers reshape a weight so that each row is one group of one output channel. The
min/max range always includes 0 (as GPTQ does); symmetric uses ``zero = 2^(bits-1)`` and ``scale =
2·absmax/maxq``; asymmetric ``scale = (max-min)/maxq``, ``zero = round(-min/scale)``. The optional MSE grid
shrinks the range by ``p = 1 - i/grid`` for ``i < maxshrink·grid`` and keeps, per row, the candidate with
the least ``Σ|Q(x)-x|^norm``.

Scales are rounded to the dtype the format stores (fp16 for GPTQ/AWQ, the model dtype for
compressed-tensors) *before* zero points and codes are computed, so that the codes written are exactly
consistent with the scales on disk and the dequantized weights the method reports are the ones every reader
reconstructs.
"""

from __future__ import annotations

import torch

from qconvert.methods.types import QuantizedTensor, QuantSpec, scale_dtype

# smallest positive value of each scale dtype: a row of (almost) zeros must not get a zero scale
_TINY = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}


def _round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    dt = scale_dtype(spec.scale_dtype)
    s = scale.to(dt).to(torch.float32)
    return torch.where(s > 0, s, torch.full_like(s, _TINY[dt]))


def params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (float32, zero integer-valued) per row from a range that contains 0."""
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # all-zero row: [-1, 1] as the references
        scale = _round_scale(2 * amax / maxq, spec)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = _round_scale((xmax - xmin) / maxq, spec)
    zero = torch.round(-xmin / scale)
    if spec.min_zero > 0:
        # a zero below min_zero is only possible when min is ~0: keep zero = min_zero and widen the step so
        # max stays representable with the codes left above the zero
        low = zero < spec.min_zero
        widened = _round_scale(xmax / (maxq - spec.min_zero), spec)
        scale = torch.where(low, torch.maximum(widened, scale), scale)
        zero = torch.where(low, torch.full_like(zero, spec.min_zero), zero)
    return scale, zero.clamp(0, maxq)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer-valued float codes ``clamp(round(x/scale) + zero, 0, maxq)``; scale/zero broadcast over x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (quantize_codes(x, scale, zero, maxq) - zero)


def find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [R] and zero [R] for each row of ``x [R, C]`` (float32)."""
    x = x.to(torch.float32)
    zero_t = torch.zeros(x.shape[0], dtype=torch.float32)
    xmin = torch.minimum(x.min(dim=1).values, zero_t)
    xmax = torch.maximum(x.max(dim=1).values, zero_t)
    scale, zero = params_from_range(xmin, xmax, spec)
    if spec.mse <= 0:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(spec.maxshrink * spec.grid)):
        p = 1 - i / spec.grid
        s1, z1 = params_from_range(p * xmin, p * xmax, spec)
        q = fake_quantize(x, s1[:, None], z1[:, None], spec.maxq)
        err = (q - x).abs_().pow_(spec.mse).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def grouped_tensor(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int],
                   spec: QuantSpec) -> QuantizedTensor:
    """Codes of ``rows`` [N*G, g] under per-row (scale, zero), as a QuantizedTensor of ``shape`` [N, K]."""
    n, k = shape
    groups = rows.shape[0] // n
    codes = quantize_codes(rows, scale[:, None], zero[:, None], spec.maxq)
    return QuantizedTensor(
        codes=codes.reshape(n, k).to(torch.uint8).numpy(),
        scales=scale.reshape(n, groups).numpy(),
        zeros=zero.reshape(n, groups).to(torch.int32).numpy(),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
        scale_dtype=spec.scale_dtype,
    )
