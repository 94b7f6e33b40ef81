"""SmoothQuant (Xiao et al.; llm-compressor's SmoothQuantModifier, packed-formats-2026.md §3.4) before W8A8.

Per input channel j of the Linears one norm feeds (q/k/v, gate/up: ``arch.blocks.norm_groups``, the AWQ
scaling groups whose previous op is a norm)::

    s_j = max|x_j|^α / max_i |W_ij|^(1-α)      (s_j = max|x_j| where the weights are all zero; s ≥ 1e-5)
    norm weight  w ← (w + off) / s − off       (off 1 for Gemma's (1 + w) RMSNorm, else 0)
    W[:, j]      ← W[:, j] · s_j               for every balanced Linear

``max|x_j|`` is the calibration engine's ``abs_max`` of the norm's output (the balanced Linears' input),
the weight term the max over the group's Linears. llm-compressor uses the per-channel range ``max − min``
of the norm output and ``2·max|W|``; for activations symmetric about zero this is ``2^(2α−1)`` times our s,
a factor the per-channel weight scales and per-token activation scales of W8A8 absorb exactly.

The model computes the same function afterwards (in exact arithmetic); only where the quantizers round
changes: activation outliers move into the weights, which per-channel int8 holds easily.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.arch.blocks import ScalingGroup, norm_groups
from qconvert.arch.table import BLOCK_FAMILIES, resolve
from qconvert.errors import BadInput
from qconvert.load.config import text_config

MIN_SCALE = 1e-5  # llm-compressor's MINIMUM_SMOOTHING_SCALE


@dataclass(frozen=True)
class SmoothGroup:
    """One mapping of one decoder layer, with full names."""

    norm: str  # the norm's weight tensor, e.g. model.layers.3.input_layernorm.weight
    balanced: tuple[str, ...]  # Linear prefixes, e.g. model.layers.3.self_attn.q_proj
    norm_offset: float
    group: ScalingGroup  # the same group relative to the block (for folding into a materialised layer)


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise BadInput(f"--smoothquant {alpha}: the smoothing strength α must be between 0 and 1")


def layer_groups(config: dict, layer_prefix: str) -> list[SmoothGroup]:
    """The mappings of one decoder layer (``model.layers.3``) of this checkpoint's family; a family without
    a block layout has none and is refused."""
    spec = resolve(text_config(config))
    if spec.block is None:
        raise BadInput(f"--smoothquant: no smoothing mappings for the {spec.name} architecture "
                       f"(supported: {', '.join(BLOCK_FAMILIES)})")
    if spec.experts is not None:
        raise BadInput(f"--smoothquant: no smoothing mappings for Mixture-of-Experts blocks yet "
                       f"({spec.name} with experts); --method gptq or rtn without --smoothquant work")
    return [SmoothGroup(f"{layer_prefix}.{g.prev}.weight", tuple(f"{layer_prefix}.{b}" for b in g.balanced),
                        g.norm_offset, g)
            for g in norm_groups(spec.block, float(spec.norm_shift))]


def check_family(config: dict) -> None:
    layer_groups(config, "model.layers.0")


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """float32 [K]: s from the inputs' max |x| per channel and the balanced weights [N_i, K]."""
    a = act_max.detach().to("cpu", torch.float32)
    w = torch.stack([x.detach().to("cpu", torch.float32).abs().amax(0) for x in weights]).amax(0)
    if a.shape != w.shape:
        raise ValueError(f"{a.numel()} activation channels, {w.numel()} weight columns")
    s = torch.where(w > 0, a.pow(alpha) / w.pow(1 - alpha), a)
    return s.clamp_min(MIN_SCALE)


def fold_norm(w: torch.Tensor, s: torch.Tensor, offset: float) -> torch.Tensor:
    """The norm weight divided by s (in its own dtype; Gemma's ``(1 + w)`` form kept)."""
    return ((w.to(torch.float32) + offset) / s.to(w.device) - offset).to(w.dtype)


def scale_columns(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A balanced weight's input columns multiplied by s, in float32 (quantized from there: no extra
    rounding to the source dtype)."""
    return w.to(torch.float32) * s.to(w.device)[None, :]


def model_groups(config: dict, layers: list) -> list[SmoothGroup]:
    """Every decoder layer's mappings; ``layers`` are the quantize plan's LayerPlans (the layer prefix is the
    part of a Linear's name up to ``layers.<i>``: text models inside multimodal ones included)."""
    prefixes: dict[int, str] = {}
    for p in layers:
        if p.layer is not None and p.layer not in prefixes:
            head, sep, _ = p.prefix.partition(f"layers.{p.layer}.")
            prefixes[p.layer] = f"{head}{sep}".rstrip(".")
    return [g for i in sorted(prefixes) for g in layer_groups(config, prefixes[i])]


def check_tensors(ckpt, groups: list[SmoothGroup]) -> None:
    """Every norm and balanced Linear the family's layout names is in the checkpoint."""
    for g in groups:
        for name in (g.norm, *(f"{b}.weight" for b in g.balanced)):
            if name not in ckpt.tensors:
                raise BadInput(f"--smoothquant: {name} is not in the checkpoint (the architecture table's "
                               "block layout names it)", ckpt.path)


def fold_from_maxima(job, groups: list[SmoothGroup]) -> dict[str, torch.Tensor]:
    """One pass over the original weights (rtn; gptq with --stats): every mapping's factors from the inputs'
    max |x| (``job.config``'s --dataset or --stats) and its weights; the folded norms, and balanced Linears
    kept dense, are written now. Returns each quantized balanced Linear's column factors (applied to its
    weight, and to its Hessian for gptq, when its turn comes)."""
    from qconvert.methods.plan import input_maxima

    maxima = input_maxima(job.ckpt, job.config, [g.balanced[0] for g in groups], "--smoothquant")
    quantized = {p.prefix for p in job.quantized}
    columns: dict[str, torch.Tensor] = {}
    for g in groups:
        weights = {b: job.ckpt.read(f"{b}.weight") for b in g.balanced}
        s = smoothing_scales(maxima[g.balanced[0]], list(weights.values()), job.config.smoothquant)
        job.write(g.norm, fold_norm(job.ckpt.read(g.norm), s, g.norm_offset))
        for b, w in weights.items():
            if b in quantized:
                columns[b] = s
            else:  # kept dense: stored scaled, in its own dtype
                job.write(f"{b}.weight", scale_columns(w, s).to(w.dtype))
        del weights
    return columns
