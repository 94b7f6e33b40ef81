"""AWQ on one decoder block: folding scales into the previous operation, and the per-block driver the
calibration runner calls ("quantize as you go"). The scaling groups come from the architecture table
(arch/blocks.py: each family's block layout and AutoAWQ's get_layers_for_scaling groups built from it).

Folding keeps the float model mathematically identical: balanced ``W[:, c] *= s[c]``; a norm's weight is
divided by ``s`` (Gemma's RMSNorm multiplies by ``1 + w``: ``w ← (1 + w)/s − 1``); a previous Linear's
output rows (and bias) are divided by ``s``. Only the rows feeding the balanced layers are touched (the v
rows of a fused qkv, the up half of a fused gate_up). Clipping skips the Linears the plan names (q and k;
of a fused qkv, all but the v rows).

Mixture-of-Experts blocks (calib/experts.LinearExperts in the materialised layer) get the MoE groups of
arch/blocks.py: one scale vector for the norm in front of every expert, shared expert and router, then one
up→down group per expert. An expert whose Linears saw fewer than ``min_expert_tokens`` calibration rows keeps
unit scales for its up→down group and is not clipped (its few rows would fit the scales to noise); the shared
norm's scales still apply to it, as they must for the float model to stay the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qconvert.arch.blocks import BlockLayout, BlockPlan, MoeFFN, ScalingGroup, awq_plan
from qconvert.arch.table import BLOCK_FAMILIES, ArchSpec, resolve
from qconvert.calib.experts import LinearExperts, expert_of
from qconvert.errors import BadInput
from qconvert.load.config import text_config
from qconvert.methods.awq import (
    AWQConfig,
    apply_clip,
    awq_quantize,
    sample_tokens,
    scaled_fake_quantize,
    search_clip,
    search_scales,
    weight_mean,
)
from qconvert.methods.plan import CalibrationOptions, ExpertOptions, IntOptions, Job, LayerPlan
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec

log = logging.getLogger("qconvert.awq")


def _spec(config: dict) -> ArchSpec:
    spec = resolve(text_config(config))
    if spec.block is None:
        raise BadInput(f"--method awq: no AWQ scaling groups for the {spec.name} architecture "
                       f"(supported: {', '.join(BLOCK_FAMILIES)})")
    return spec


def family(config: dict) -> str:
    """The architecture-table family name of a checkpoint, refused clearly when AWQ cannot walk its blocks."""
    return _spec(config).name


def _linear(block: nn.Module, name: str) -> nn.Linear:
    try:
        mod = block.get_submodule(name)
    except AttributeError:  # e.g. a deepseek_v3 without q_lora_rank (q_proj in place of q_a_proj/q_b_proj)
        raise BadInput(f"--method awq: the decoder block has no {name}, which this family's AWQ groups "
                       "need") from None
    if not isinstance(mod, nn.Linear):
        raise BadInput(f"--method awq: {name} is a {type(mod).__name__}, expected a Linear")
    return mod


def _weighted(block: nn.Module, name: str) -> nn.Module:
    """A balanced module: a Linear, or a router (transformers 5's ``*TopKRouter``: a 2-D ``weight`` applied
    as a Linear without bias)."""
    mod = block.get_submodule(name)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise BadInput(f"--method awq: {name} is a {type(mod).__name__} without a 2-D weight")
    return mod


def moe_ffn(block: nn.Module, layout: BlockLayout) -> MoeFFN | None:
    """The units and routers of the block's sparse MLP (None for a dense MLP): every LinearExperts' experts,
    every shared expert (a child with gate/up/down Linears), every other child with a weight (a router)."""
    sparse = block.get_submodule(layout.mlp)
    if not any(isinstance(m, LinearExperts) for m in sparse.children()):
        return None
    units: list[tuple[str, str, str]] = []
    routers: list[str] = []
    for n, m in sparse.named_children():
        full = f"{layout.mlp}.{n}"
        if isinstance(m, LinearExperts):
            units += [tuple(f"{full}.{e}.{p}" for p in expert.names) for e, expert in enumerate(m)]
        elif all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            units.append((f"{full}.gate_proj", f"{full}.up_proj", f"{full}.down_proj"))
        elif any(True for _ in m.parameters()):
            _weighted(block, full)
            routers.append(full)
    return MoeFFN(units, routers)  # type: ignore[arg-type]


def block_plan(config: dict, block: nn.Module) -> BlockPlan:
    """The scaling groups of one decoder block of this checkpoint's family."""
    spec = _spec(config)
    layout = spec.block
    assert layout is not None  # _spec refused the others

    def linear(name: str) -> tuple[int, int]:
        lin = _linear(block, name)
        return lin.out_features, lin.in_features

    def heads() -> tuple[int, int, int]:
        attn = block.get_submodule(layout.attn)
        n_head, n_kv = int(attn.config.num_attention_heads), int(attn.config.num_key_value_heads)
        return n_head, n_kv, int(getattr(attn, "head_dim", None) or attn.config.hidden_size // n_head)

    return awq_plan(layout, linear, heads, float(spec.norm_shift), moe_ffn(block, layout))


# ------------------------------------------------------------------------------------------------------------
# folding


def fold_scales(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Divide the previous op by ``s`` and multiply the balanced layers' input columns by ``s`` (in place);
    the block computes the same function afterwards."""
    prev = block.get_submodule(group.prev)
    s = s.to(device=prev.weight.device)
    if isinstance(prev, nn.Linear):
        lo, hi = group.prev_rows or (0, prev.out_features)
        if hi - lo != s.numel():
            raise ValueError(f"{group.prev}: rows {lo}:{hi} do not match {s.numel()} scales")
        prev.weight[lo:hi].div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias[lo:hi].div_(s.to(prev.bias.dtype))
    else:
        w = prev.weight
        w.copy_(((w.to(torch.float32) + group.norm_offset) / s - group.norm_offset).to(w.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))
    for name in group.balanced:
        mod = _weighted(block, name)
        mod.weight.mul_(s.to(mod.weight.dtype)[None, :])


# ------------------------------------------------------------------------------------------------------------
# capture: inputs and outputs of the modules the search inspects, on a subset of the calibration samples


@dataclass
class Capture:
    calls: dict[str, list[tuple[tuple, dict, torch.Tensor]]]  # inspected module -> (args, kwargs, output)
    inputs: dict[str, list[torch.Tensor]]  # Linear -> its inputs per batch
    tokens: int

    def linear_input(self, name: str) -> torch.Tensor:
        xs = self.inputs[name]
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).to(torch.float32)


def pick_batches(n_batches: int, tokens_per_batch: int, budget: int | None) -> list[int]:
    """Evenly spread batch indices covering ``budget`` tokens (all batches for None)."""
    if budget is None:
        return list(range(n_batches))
    want = min(n_batches, max(1, math.ceil(budget / max(tokens_per_batch, 1))))
    return sorted({round(i * (n_batches - 1) / max(want - 1, 1)) for i in range(want)})


def capture(step, inspect: set[str], linears: list[str], budget: int | None) -> Capture:
    """Run the block (original weights) on a subset of its input batches, keeping what the search needs."""
    args, kwargs = step.call_args()
    first = step.inputs[0]
    size = first.shape[0]
    picks = [i for i in pick_batches(len(step.inputs), first.shape[0] * first.shape[1], budget)]
    calls: dict[str, list] = {n: [] for n in inspect}
    inputs: dict[str, list] = {n: [] for n in linears}
    handles = []

    def keep_call(name):
        def hook(_m, a, kw, out):
            calls[name].append((a, kw, out[0] if isinstance(out, tuple) else out))
        return hook

    def keep_input(name):
        def hook(_m, a):
            inputs[name].append(a[0])
        return hook

    for name in inspect:
        mod = step.module.get_submodule(name)
        handles.append(mod.register_forward_hook(keep_call(name), with_kwargs=True))
    for name in linears:
        handles.append(step.module.get_submodule(name).register_forward_pre_hook(keep_input(name)))
    tokens = 0
    try:
        for i in picks:
            h = step.inputs[i]
            if h.shape[0] != size:  # the call arguments were caught for this batch size only
                continue
            step.module(h, *args, **kwargs)
            tokens += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    return Capture(calls, inputs, tokens)


# ------------------------------------------------------------------------------------------------------------
# the block driver


@dataclass
class LinearResult:
    qt: QuantizedTensor
    error: float  # ||W·s - deq|| / ||W·s|| (scaling makes the unscaled weight the wrong reference)


@dataclass
class BlockResult:
    quantized: dict[str, LinearResult]  # full Linear name -> result
    ratios: dict[str, float]  # scaling group -> chosen grid ratio (-1: none)
    fallbacks: dict[str, int]  # full expert name -> the rows its Linears saw (below the minimum: unit scales)


def _module_loss(mod: nn.Module, calls: list) -> float:
    total = 0.0
    count = 0
    for a, kw, ref in calls:
        out = mod(*a, **kw)
        out = out[0] if isinstance(out, tuple) else out
        total += float((out.to(torch.float32) - ref.to(torch.float32)).pow(2).sum())
        count += ref.numel()
    return total / max(count, 1)


def _x_mean(step, group: ScalingGroup, cap: Capture) -> torch.Tensor:
    """Mean |x| per input channel of the group's balanced layers, pooled over ``group.stats_from``."""
    names = group.stats_from or group.balanced[:1]
    stats = [step.stats.get(f"{step.name}.{n}") for n in names]
    if all(st is not None and st.abs_sum is not None for st in stats):
        count = sum(st.count for st in stats)
        if count:
            return (sum(st.abs_sum for st in stats) / count).to(torch.float32)
    # statistics not requested: the captured subset
    return torch.cat([cap.linear_input(n) for n in names]).abs().mean(dim=0)


def _rows_seen(step, group: ScalingGroup) -> int | None:
    """The calibration rows a routed expert's Linears saw (None outside routed experts' groups)."""
    if group.unit is None or expert_of(f"{step.name}.{group.balanced[0]}") is None:
        return None
    st = step.stats.get(f"{step.name}.{group.balanced[0]}")
    return int(st.count) if st is not None else 0


def _search_group(step, group: ScalingGroup, specs: dict[str, QuantSpec | None], cap: Capture,
                  cfg: AWQConfig) -> tuple[torch.Tensor, float] | None:
    block = step.module
    quantized = [n for n in group.balanced if specs.get(f"{step.name}.{n}") is not None]
    if not quantized:
        return None  # nothing to protect from quantization error
    lins = {n: _linear(block, n) for n in quantized}
    orig = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    qspecs = {n: specs[f"{step.name}.{n}"] for n in quantized}
    w_mean = weight_mean([(orig[n], qspecs[n]) for n in quantized]) if cfg.duo_scaling else None
    x_mean = _x_mean(step, group, cap)
    mod = block.get_submodule(group.inspect)
    calls = cap.calls[group.inspect]

    def loss(s: torch.Tensor) -> float:
        try:
            for n, lin in lins.items():
                lin.weight.copy_(scaled_fake_quantize(orig[n], s, qspecs[n]).to(lin.weight.dtype))
            return _module_loss(mod, calls)
        finally:
            for n, lin in lins.items():
                lin.weight.copy_(orig[n])

    found = search_scales(x_mean, w_mean, loss, cfg.n_grid)
    return found.scales, found.ratio


def quantize_block(
    step,
    specs: dict[str, QuantSpec | None],
    config: dict,
    cfg: AWQConfig = AWQConfig(),
    store_dtype: Callable[[str], torch.dtype] | None = None,
    min_expert_tokens: int = 0,
) -> BlockResult:
    """AWQ on one decoder block (a calib.runner LayerStep): search and fold the scales, clip, quantize.

    ``specs``: full Linear name -> QuantSpec (None or absent = kept in float; its weight is still scaled).
    On return the block holds the folded float parameters and, for quantized Linears, their dequantized
    weights, so re-running it propagates the quantized block's outputs. ``store_dtype(full tensor name)`` is
    the dtype a float tensor will be written in: folded parameters are rounded to it so the block computes
    exactly what readers of the output will. A routed expert whose Linears saw fewer than
    ``min_expert_tokens`` rows keeps unit up→down scales and is not clipped (``BlockResult.fallbacks``).
    """
    block = step.module
    plan = block_plan(config, block)
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    inspect = {g.inspect for g in plan.groups}
    cap = capture(step, inspect, linears, cfg.search_tokens)

    found: dict[str, tuple[torch.Tensor, float]] = {}
    fallbacks: dict[str, int] = {}
    unclipped: set[str] = set()
    for group in plan.groups:  # every search sees the original block, as AutoAWQ
        rows = _rows_seen(step, group)
        if rows is not None and rows < min_expert_tokens:
            assert group.unit is not None
            fallbacks[f"{step.name}.{group.unit}"] = rows
            expert = block.get_submodule(group.unit)
            unclipped.update(f"{group.unit}.{n}" for n in expert.names)  # type: ignore[union-attr]
            continue
        res = _search_group(step, group, specs, cap, cfg)
        if res is not None:
            found[group.name] = res
    input_scale: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        if group.name in found:
            s = found[group.name][0]
            fold_scales(block, group, s)
            for n in group.balanced:
                input_scale[n] = s
    _round_float_params(step, specs, store_dtype)

    quantized: dict[str, LinearResult] = {}
    for rel in linears:
        full = f"{step.name}.{rel}"
        spec = specs.get(full)
        if spec is None:
            continue
        lin = _linear(block, rel)
        w = lin.weight.detach().to(torch.float32)
        wc = w
        if cfg.clip and rel not in plan.no_clip and rel not in unclipped:
            x = sample_tokens(cap.linear_input(rel), cfg.clip_tokens)
            if rel in input_scale:
                x = x / input_scale[rel].to(x.device)[None, :]
            rows = plan.clip_rows.get(rel)
            max_val = search_clip(w, x, spec, n_grid=cfg.clip_grid, max_shrink=cfg.clip_max_shrink,
                                  rows=slice(*rows) if rows else None)
            wc = apply_clip(w, max_val)
        qt = awq_quantize(wc, spec)
        deq = torch.from_numpy(qt.dequantize())
        norm = float(w.norm())
        err = float((w - deq).norm()) / norm if norm else 0.0
        lin.weight.copy_(deq.to(device=lin.weight.device, dtype=lin.weight.dtype))
        quantized[full] = LinearResult(qt, err)
    ratios = {g.name: found[g.name][1] if g.name in found else -1.0 for g in plan.groups}
    log.debug("%s: AWQ ratios %s", step.name, ratios)
    return BlockResult(quantized, ratios, fallbacks)


def _round_float_params(step, specs, store_dtype) -> None:
    """Round every parameter that stays in float to the dtype it is written in."""
    if store_dtype is None:
        return
    for pname, p in step.module.named_parameters():
        full = f"{step.name}.{pname}"
        if full.endswith(".weight") and specs.get(full[: -len(".weight")]) is not None:
            continue  # quantized: replaced by its dequantized weight
        dt = store_dtype(full)
        if dt != p.dtype:
            p.copy_(p.to(dt).to(p.dtype))


# ------------------------------------------------------------------------------------------------------------
# the method: the calibration runner walks the decoder blocks; each block is scaled, clipped and quantized in
# place, written out, and re-run so the next block sees the quantized block's outputs.

@dataclass(frozen=True)
class Config(IntOptions, CalibrationOptions, ExpertOptions):
    """``--method awq``: the integer grid (zero point by default, as AutoAWQ) and the calibration data."""

    sym: bool = False

    def check(self) -> None:
        if not self.dataset:
            raise BadInput("--method awq needs calibration text: --dataset FILE.txt|.jsonl|.parquet|hf:NAME")
        self.check_calibration()
        self.check_experts()

    def pack_options(self, lm_head: bool) -> PackOptions:
        return PackOptions(method="awq", lm_head=lm_head)


def run(job: Job) -> None:
    from qconvert.calib.runner import LayerwiseRunner
    from qconvert.load.dtypes import TORCH_FLOATS
    from qconvert.methods.rtn import relative_error

    cfg: Config = job.config
    ckpt = job.ckpt
    family(ckpt.config)  # refuse unsupported architectures before reading any data
    tokens = cfg.tokens(ckpt)
    specs = {p.prefix: p.spec for p in job.layers}
    by_prefix = {p.prefix: p for p in job.layers}

    def store_dtype(name: str) -> torch.dtype:
        info = ckpt.tensors.get(name)
        return TORCH_FLOATS.get(info.dtype, torch.float32) if info is not None else torch.float32

    expert_tokens: dict[str, int] = {}
    fallbacks: dict[str, int] = {}

    def on_layer(step) -> bool:
        expert_tokens.update(step.expert_tokens)
        block = quantize_block(step, specs, ckpt.config, AWQConfig(), store_dtype,  # type: ignore[arg-type]
                               cfg.min_expert_tokens)
        fallbacks.update(block.fallbacks)
        for prefix, r in block.quantized.items():
            job.emit(by_prefix[prefix], r.qt, r.error, None)
        for pname, param in step.module.named_parameters():
            name = f"{step.name}.{pname}"
            if name not in job.written and name in ckpt.tensors:
                job.write(name, param.detach().to("cpu", store_dtype(name)).clone())
        if job.progress:
            worst = max((r.error for r in block.quantized.values()), default=0.0)
            job.progress(step.index + 1, job.n_layers, f"layers.{step.index} max err {worst:.4g}")
        return True  # re-run the block: the next one sees the quantized outputs

    runner = LayerwiseRunner(ckpt, device=cfg.device, dtype=cfg.calib_dtype, all_experts=cfg.all_experts)
    runner.run(tokens, kinds=("abs_sum",), on_layer=on_layer)
    job.notes.extend(cfg.expert_notes(expert_tokens, fallbacks, "kept unit AWQ scales, unclipped"))

    def lm_head(p: LayerPlan, w: torch.Tensor) -> tuple[QuantizedTensor, float]:
        # --quantize-lm-head: no scaling group feeds it; the AWQ quantizer alone
        assert isinstance(p.spec, QuantSpec)
        w = w.to(torch.float32)
        qt = awq_quantize(w, p.spec)
        return qt, relative_error(w, qt)

    job.stream(lm_head)
