"""Mixture-of-Experts blocks as the calibration engine runs them: one nn.Linear per expert and projection.

transformers 5 keeps a layer's routed experts as two 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]) of one ``*Experts`` module: no Linear per expert, so no statistics hook, no weight a
method could replace. ``linearise`` swaps every such module of the skeleton for ``LinearExperts``: a
ModuleList of per-expert MLPs named as the hub checkpoint names them (``experts.X.gate_proj`` or Mixtral's
``experts.X.w1``), so each Linear is materialised from its own checkpoint tensor and statistics and
quantized weights come out under the checkpoint's per-expert names (what vLLM's fused-MoE loaders expect).
The router is the model's own module, untouched: the top-k choice is exactly transformers'. A checkpoint
that stores its experts fused (transformers 5's save, gpt-oss) is read through load.expert_slices, which
names each expert's slice of the fused tensor as the hub would. gpt-oss's GptOssExperts (x@W, gate/up
interleaved, biases, the clamped swiglu) becomes LinearExperts of OaiExpertMLP under the same names.

``LinearExperts.forward`` is transformers' eager experts forward (the same for every supported family):
expert by expert, its routed tokens through ``down(act(gate(x)) * up(x))``, scaled by the routing weight and
``index_add_``-ed into the output. Two differences, both invisible in the output:

* an expert no token was routed to still runs, on zero rows, so every expert's Linears have statistics
  (count 0) and the engine sees the same Linears, in the same order, on every batch;
* with ``all_experts`` every expert runs on every token (llm-compressor's calibrate-all-experts): its
  Linears' statistics see the whole batch, while only the routed rows reach the layer output.

``routed`` counts, per expert, the (token, expert) pairs the router chose: what llama-imatrix counts.
"""

from __future__ import annotations

import re
import statistics

import torch
from torch import nn

from qconvert.arch.table import ArchSpec

# transformers 5 names the sparse block "mlp" in every supported family; the checkpoint may not
RUNTIME_BLOCK = "mlp"

# Fewer calibration tokens than this and an expert is not calibrated: its Hessian has rank <= the token count
# and GPTQ's solution fits those few rows (RTN's error on unseen inputs is the safer bet), its mean |x| is
# noise (AWQ keeps unit scales). Top-k routing leaves rare experts below it on short calibration sets;
# --all-experts gives every expert every token.
MIN_EXPERT_TOKENS = 32

# "<...>.experts.<N>" of a routed expert's Linear name ("model.layers.0.mlp.experts.5.down_proj")
_EXPERT = re.compile(r"^(.*\.experts\.\d+)\.([^.]+)$")


def expert_of(name: str) -> str | None:
    """The expert a Linear belongs to ("model.layers.0.mlp.experts.5"), or None outside routed experts."""
    m = _EXPERT.match(name)
    return m.group(1) if m else None


def token_report(tokens: dict[str, int], minimum: int = MIN_EXPERT_TOKENS) -> str | None:
    """One line on the tokens the router sent to each expert (None without experts)."""
    if not tokens:
        return None
    counts = sorted(tokens.values())
    layers = {name.rsplit(".experts.", 1)[0] for name in tokens}
    low = sorted((n for n, c in tokens.items() if c < minimum), key=_natural)
    line = (f"experts: {len(tokens)} in {len(layers)} layers; routed tokens per expert min {counts[0]} / "
            f"median {statistics.median(counts):g} / max {counts[-1]}")
    if low:
        shown = ", ".join(f"{n} ({tokens[n]})" for n in low[:8]) + (f", ... {len(low) - 8} more"
                                                                    if len(low) > 8 else "")
        line += f"; {len(low)} below {minimum}: {shown}"
    return line


def experts_modules(module: nn.Module, prefix: str) -> dict[str, LinearExperts]:
    """Full names of the LinearExperts inside ``module`` (a decoder layer named ``prefix``)."""
    return {f"{prefix}.{n}" if n else prefix: m for n, m in module.named_modules()
            if isinstance(m, LinearExperts)}


def routed_tokens(modules: dict[str, LinearExperts]) -> dict[str, int]:
    """"<experts module>.X" -> the (token, expert) pairs counted since the counters were zeroed."""
    return {f"{n}.{e}": int(c) for n, m in modules.items() for e, c in enumerate(m.routed.tolist())}


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its Linears under the checkpoint's names."""

    def __init__(self, hidden: int, inter: int, act: nn.Module, names: tuple[str, str, str],
                 bias: bool = False):
        super().__init__()
        self.names = names  # (gate, up, down)
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden)), strict=True):
            with torch.device("meta"):
                self.add_module(name, nn.Linear(i, o, bias=bias))
        self.act_fn = act

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.glu(gate(x), up(x)))


class OaiExpertMLP(ExpertMLP):
    """One gpt-oss expert (GptOssExperts' eager forward for one expert): biased Linears and the clamped
    swiglu ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    def __init__(self, hidden: int, inter: int, alpha: float, limit: float, names: tuple[str, str, str]):
        super().__init__(hidden, inter, nn.Identity(), names, bias=True)
        self.alpha, self.limit = alpha, limit

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class LinearExperts(nn.ModuleList):
    """Drop-in for a transformers ``*Experts`` module: forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]. Its children are the experts, "0" .. "E-1", as in the checkpoint."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        n_experts = len(experts)
        self.num_experts = n_experts
        self.all_experts = False
        self.routed = torch.zeros(n_experts, dtype=torch.int64)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E, k, T] as transformers builds it; index E (one past the last) is its "no expert" slot
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            self.routed[e] += int(token_idx.numel())
            if self.all_experts:
                out = expert(hidden_states)[token_idx]
            else:
                out = expert(hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _is_fused_experts(mod: nn.Module) -> bool:
    params = dict(mod.named_parameters(recurse=False))
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    if gu is None or down is None or gu.ndim != 3 or down.ndim != 3 or "gate_up_proj_bias" in params:
        return False
    # [E, 2I, H] and [E, H, I] (gpt-oss's transposed, interleaved, biased experts are another layout)
    return gu.shape[2] == down.shape[1] and gu.shape[1] == 2 * down.shape[2] and hasattr(mod, "act_fn")


def _is_oai_experts(mod: nn.Module) -> bool:
    """gpt-oss's GptOssExperts: gate_up_proj [E, H, 2I] (x@W, gate/up interleaved) + bias, down_proj
    [E, I, H] + bias, the swiglu constants alpha / limit."""
    params = dict(mod.named_parameters(recurse=False))
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    if gu is None or down is None or gu.ndim != 3 or down.ndim != 3:
        return False
    return ("gate_up_proj_bias" in params and "down_proj_bias" in params and hasattr(mod, "alpha")
            and hasattr(mod, "limit") and gu.shape[1] == down.shape[2] and gu.shape[2] == 2 * down.shape[1])


def _linear_experts(mod: nn.Module, names: tuple[str, str, str]) -> LinearExperts | None:
    """The LinearExperts standing in for one transformers experts module, or None for any other module."""
    if _is_fused_experts(mod):
        n, two_i, hidden = mod.gate_up_proj.shape
        return LinearExperts([ExpertMLP(int(hidden), int(two_i) // 2, mod.act_fn, names) for _ in range(n)])
    if _is_oai_experts(mod):
        n, hidden, two_i = mod.gate_up_proj.shape
        return LinearExperts([OaiExpertMLP(int(hidden), int(two_i) // 2, float(mod.alpha), float(mod.limit),
                                           names) for _ in range(n)])
    return None


def linearise(model: nn.Module, spec: ArchSpec) -> list[LinearExperts]:
    """Replace every fused experts module of ``model`` (parameters on meta) by a LinearExperts, and give the
    sparse block the checkpoint's module name; returns the new modules in layer order."""
    ex = spec.experts
    assert ex is not None
    names = (ex.gate, ex.up, ex.down)
    block_name = ex.module.rsplit(".", 1)[0]  # "mlp" or Mixtral's "block_sparse_moe"
    made = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _linear_experts(child, names)
            if new is None:
                continue
            parent._modules[child_name] = new
            made.append(new)
    if block_name != RUNTIME_BLOCK:
        _rename_blocks(model, block_name)
    return made


def _rename_blocks(model: nn.Module, block_name: str) -> None:
    """Register each decoder layer's ``mlp`` under the checkpoint's name. The layer's forward still reads
    ``self.mlp``: kept as a plain instance attribute, which attribute lookup finds before nn.Module's
    ``_modules`` (named_modules, and so every name the engine hands out, then uses the checkpoint's)."""
    for mod in model.modules():
        block = mod._modules.get(RUNTIME_BLOCK)
        if block is None or not any(isinstance(c, LinearExperts) for c in block.children()):
            continue
        del mod._modules[RUNTIME_BLOCK]
        mod._modules[block_name] = block
        mod.__dict__[RUNTIME_BLOCK] = block


def set_all_experts(experts: list[LinearExperts], on: bool) -> None:
    for m in experts:
        m.all_experts = on
