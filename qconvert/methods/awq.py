"""AWQ (Lin et al.): activation-aware scale search and weight clipping, pure functions of weights and inputs.

Follows AutoAWQ (``awq/quantize/quantizer.py``) and llm-awq (``auto_scale.py``, ``auto_clip.py``),
checkpoint-formats.md §3.3:

* pseudo-quantizer: zero-point ``scale = (max-min).clamp(1e-5)/(2^b-1)``, ``zero = clamp(-round(min/scale))``
  (min/max are *not* widened to contain 0, unlike GPTQ); no-zero-point
  ``scale = absmax.clamp(1e-5)/(2^(b-1)-1)``
  with codes in ``[-2^(b-1), 2^(b-1)-1]`` (stored offset by 2^(b-1), the QuantizedTensor convention);
* scale grid: ``ratio = r/n_grid``, ``s = x_mean^ratio / (w_mean^(1-ratio) + 1e-4)`` (duo scaling) or
  ``x_mean^ratio``, normalised by ``sqrt(max(s)·min(s))``; the caller's loss picks the ratio;
* clipping: shrink ``max|w|`` of every (row, group) by ``1 - i/20`` for ``i < 10`` and keep the value with the
  least output error of that group's partial dot products over ~512 sampled input tokens.

Difference from the references, on purpose: scales are rounded to the dtype the format stores before codes
are chosen (the references round at packing time), so the search sees the weights readers reconstruct. The
clip error ``mean_t (x_t·(q-w))²`` of each group is computed as ``dᵀ H_g d`` with the group's block of
``H = XᵀX / T`` — the same number, without materialising token × row × group products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from qconvert.methods.quantizer import grouped_tensor, quantize_codes
from qconvert.methods.types import QuantizedTensor, QuantSpec, scale_dtype

log = logging.getLogger("qconvert.awq")

# smallest positive value of each scale dtype (a scale rounded to 0 would divide by zero)
_TINY = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}


@dataclass(frozen=True)
class AWQConfig:
    """Knobs of the search; defaults are AutoAWQ's except ``search_tokens`` (see below)."""

    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    # the scale-search loss runs the inspected module (self_attn, mlp, ...) n_grid times: on CPU that is the
    # cost of the method, so it runs on this many tokens (whole sequences, evenly spread over the calibration
    # set); the activation statistic x_mean always uses every token. None = all tokens, as AutoAWQ.
    # Measured on SmolLM2-135M W4 g64, 16x512 calibration tokens: 512 -> ppl 19.20 in 137 s CPU, 2048 -> 19.38
    # in 247 s (RTN 22.51, GPTQ 20.63 in 119 s): more tokens only cost time.
    search_tokens: int | None = 512


# ------------------------------------------------------------------------------------------------------------
# the AWQ pseudo-quantizer


def _round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    dt = scale_dtype(spec.scale_dtype)
    s = scale.to(dt).to(torch.float32)
    return torch.where(s > 0, s, torch.full_like(s, _TINY[dt]))


def awq_params(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [R] and zero [R] (float32, zero integer-valued, unsigned-code convention) of each row of
    ``rows [R, g]``."""
    if spec.sym:
        half = 1 << (spec.bits - 1)
        amax = rows.abs().amax(dim=1).clamp(min=1e-5)
        scale = _round_scale(amax / (half - 1), spec)
        return scale, torch.full_like(scale, half)
    xmax = rows.amax(dim=1)
    xmin = rows.amin(dim=1)
    scale = _round_scale((xmax - xmin).clamp(min=1e-5) / spec.maxq, spec)
    zero = (-torch.round(xmin / scale)).clamp(0, spec.maxq)
    if spec.min_zero > 0:
        # gptq format v1 stores zero-1: a zero below min_zero (min >= ~0) keeps zero = min_zero and widens the
        # step so that max stays representable with the codes above it
        low = zero < spec.min_zero
        widened = _round_scale(xmax.clamp(min=1e-5) / (spec.maxq - spec.min_zero), spec)
        scale = torch.where(low, torch.maximum(widened, scale), scale)
        zero = torch.where(low, torch.full_like(zero, spec.min_zero), zero)
    return scale, zero


def _group_rows(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    n, k = w.shape
    g = spec.group_for(k)
    if k % g:
        raise ValueError(f"group size {g} does not divide {k} input columns")
    return w.reshape(n * (k // g), g), g


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``deq(Q(w))`` of a weight ``[N, K]`` (float32), group by group."""
    rows, _ = _group_rows(w.to(torch.float32), spec)
    scale, zero = awq_params(rows, spec)
    q = quantize_codes(rows, scale[:, None], zero[:, None], spec.maxq)
    return (scale[:, None] * (q - zero[:, None])).reshape(w.shape)


def awq_quantize(weight: torch.Tensor | np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Quantize an (already scaled and clipped) ``W [N, K]`` with the AWQ pseudo-quantizer."""
    w = torch.as_tensor(weight).detach().to(torch.float32)
    n, k = w.shape
    rows, _ = _group_rows(w, spec)
    scale, zero = awq_params(rows, spec)
    return grouped_tensor(rows, scale, zero, (n, k), spec)


# ------------------------------------------------------------------------------------------------------------
# scale search


def weight_mean(weights: list[tuple[torch.Tensor, QuantSpec]]) -> torch.Tensor:
    """Duo-scaling weight statistic: per input channel, the mean over all rows of the balanced layers of
    ``|w| / max|w| of its group``."""
    total = None
    rows = 0
    for w, spec in weights:
        grouped, _ = _group_rows(w.to(torch.float32).abs(), spec)
        rel = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape)
        part = rel.sum(dim=0)
        total = part if total is None else total + part
        rows += w.shape[0]
    assert total is not None, "weight_mean needs at least one weight"
    return total / rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """The scale vector of one grid point (``w_mean`` None = llm-awq's activation-only scales)."""
    x_mean = x_mean.to(torch.float32)
    if w_mean is not None:
        s = (x_mean.pow(ratio) / (w_mean.to(torch.float32).pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # float32 [K]: multiply the balanced layers' input columns, divide the previous op
    ratio: float  # the grid point chosen (-1: no finite loss, identity scales)
    loss: float
    losses: list[float] = field(default_factory=list)  # one per grid point, in grid order


def search_scales(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor], float],
    n_grid: int = 20,
) -> ScaleSearch:
    """Evaluate ``loss_fn(s)`` (output MSE of the inspected module with the balanced layers set to
    ``Q(W·s)/s``) on the grid; the least loss wins, the first one on ties (as the references)."""
    best = ScaleSearch(torch.ones_like(x_mean, dtype=torch.float32), -1.0, float("inf"))
    for r in range(n_grid):
        ratio = r / n_grid
        s = candidate_scales(x_mean, w_mean, ratio)
        loss = float(loss_fn(s))
        best.losses.append(loss)
        if loss < best.loss:
            best.scales, best.ratio, best.loss = s, ratio, loss
    if best.ratio < 0:
        log.warning("AWQ scale search found no finite loss; keeping the layer unscaled")
    return best


def scaled_fake_quantize(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W·s)/s``: the weight a balanced layer has in the search, expressed on the unscaled inputs."""
    return fake_quantize(w * s[None, :], spec) / s[None, :]


# ------------------------------------------------------------------------------------------------------------
# clipping


def group_hessians(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[G, g, g]``: the diagonal blocks of ``XᵀX / T`` for inputs ``x [T, K]``."""
    t, k = x.shape
    xb = x.to(torch.float32).reshape(t, k // group, group).transpose(0, 1)  # [G, T, g]
    return torch.bmm(xb.transpose(1, 2), xb) / max(t, 1)


def sample_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every ``T // n``-th row of ``x [T, K]`` (AutoAWQ's ``n_sample_token`` subsampling)."""
    step = max(1, x.shape[0] // n)
    return x[::step]


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows: slice | None = None,
) -> torch.Tensor:
    """Best clipping threshold ``max_val [N, G]`` of each (row, group) of ``w [N, K]`` for inputs ``x [T, K]``
    (already subsampled). Rows outside ``rows`` keep their own max|w| (no clipping)."""
    w = w.to(torch.float32)
    n, k = w.shape
    g = spec.group_for(k)
    wg = w.reshape(n, k // g, g)
    org_max = wg.abs().amax(dim=-1)  # [N, G]
    best = org_max.clone()
    sel = rows if rows is not None else slice(None)
    ws = wg[sel]
    if ws.shape[0] == 0:
        return best
    hess = group_hessians(x, g)  # [G, g, g]
    base = org_max[sel]
    best_err = torch.full_like(base, float("inf"))
    best_sel = base.clone()
    for i in range(int(max_shrink * n_grid)):
        max_val = base * (1 - i / n_grid)
        wc = torch.maximum(torch.minimum(ws, max_val[..., None]), -max_val[..., None])
        d = fake_quantize(wc.reshape(ws.shape[0], k), spec).reshape(ws.shape) - ws  # [n, G, g]
        dh = torch.bmm(d.transpose(0, 1), hess).transpose(0, 1)  # [n, G, g]
        err = (dh * d).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_sel = torch.where(better, max_val, best_sel)
    best[sel] = best_sel
    return best


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each (row, group) of ``w [N, K]`` to ``±max_val [N, G]`` (symmetric, as the references)."""
    n, k = w.shape
    groups = max_val.shape[1]
    wg = w.reshape(n, groups, k // groups)
    m = max_val[..., None].to(w.dtype)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(n, k)
