"""The shape config.json implies for each checkpoint tensor, so that a wrong-shape weight is refused by every
command instead of being written out (issue 20).

Rules are keyed on the GGUF tensor kind (gguf-py's name map normalises every family's HF names), so one
table serves all families; a kind without a rule (a family's own tensor) is not checked. Shapes are in HF
(numpy) order, before any converter transform.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import gguf

from qconvert.arch.hparams import find, head_dim
from qconvert.arch.table import ArchSpec

Shape = tuple[int, ...]
_GGUF_NAME = re.compile(r"^(?:blk\.\d+\.)?(?P<kind>[a-z0-9_]+)\.(?P<part>weight|bias)$")


def _dims(spec: ArchSpec, cfg: dict) -> dict[str, int] | None:
    """The config's sizes the rules use; None when one is missing or not a plain int (per-layer lists)."""
    if "kv_lora_rank" in cfg or "qk_nope_head_dim" in cfg:
        return None  # MLA (deepseek2): q/k/v widths follow other sizes; its own rules belong with its spec
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        dims = {"hidden": hidden, "vocab": int(cfg["vocab_size"]), "head_dim": head_dim(cfg),
                "q": heads * head_dim(cfg), "kv": kv * head_dim(cfg)}
        if "linear_num_key_heads" in cfg:  # gated delta-net (Qwen3.5): in_proj_qkv holds q, k and v heads
            dims["qkv"] = (2 * int(cfg["linear_num_key_heads"]) * int(cfg["linear_key_head_dim"])
                           + int(cfg["linear_num_value_heads"]) * int(cfg["linear_value_head_dim"]))
        inter = spec.ffn_length(cfg) if spec.ffn_length else find(cfg, ["intermediate_size"])
        if inter is not None:
            dims["inter"] = int(inter)
    except (KeyError, TypeError, ValueError):
        return None
    return dims


# kind -> (rows, cols) of the weight from the sizes; a bias is the weight's first dimension
_RULES: dict[str, Callable[[dict[str, int]], Shape]] = {
    "token_embd": lambda d: (d["vocab"], d["hidden"]),
    "output": lambda d: (d["vocab"], d["hidden"]),
    "output_norm": lambda d: (d["hidden"],),
    "attn_norm": lambda d: (d["hidden"],),
    "ffn_norm": lambda d: (d["hidden"],),
    "post_attention_norm": lambda d: (d["hidden"],),
    "post_ffw_norm": lambda d: (d["hidden"],),
    "attn_q": lambda d: (d["q"] * d.get("q_factor", 1), d["hidden"]),
    "attn_k": lambda d: (d["kv"], d["hidden"]),
    "attn_v": lambda d: (d["kv"], d["hidden"]),
    "attn_output": lambda d: (d["hidden"], d["q"]),
    "attn_q_norm": lambda d: (d["q"] if d.get("full_qk_norm") else d["head_dim"],),
    "attn_k_norm": lambda d: (d["kv"] if d.get("full_qk_norm") else d["head_dim"],),
    "attn_qkv": lambda d: (d.get("qkv", d["q"] + 2 * d["kv"]), d["hidden"]),
    "ffn_gate": lambda d: (d["inter"], d["hidden"]),
    "ffn_up": lambda d: (d["inter"] * d.get("up_factor", 1), d["hidden"]),
    "ffn_down": lambda d: (d["hidden"], d["inter"]),
}
# families whose ffn_up holds gate and up stacked (phi3's / glm4's gate_up_proj, kept fused by the converter)
_FUSED_GATE_UP = (gguf.MODEL_ARCH.PHI3, gguf.MODEL_ARCH.GLM4)
# families whose q/k norms span all heads (OLMoE's / OLMo 2's q_norm [n_head * head_dim], k_norm
# [n_kv * head_dim])
_FULL_QK_NORM = (gguf.MODEL_ARCH.OLMOE, gguf.MODEL_ARCH.OLMO2)
# families whose q_proj also holds the output gate, a second q-sized block per head (Qwen3.5's attention)
_GATED_Q = (gguf.MODEL_ARCH.QWEN35,)


def expected_shape(spec: ArchSpec, cfg: dict, gguf_name: str) -> Shape | None:
    """The HF shape config.json implies for the tensor that becomes `gguf_name`; None if there is no rule."""
    m = _GGUF_NAME.match(gguf_name)
    dims = _dims(spec, cfg)
    if m is None or dims is None or m["kind"] not in _RULES:
        return None
    if spec.arch in _FUSED_GATE_UP:
        dims["up_factor"] = 2
    if spec.arch in _FULL_QK_NORM:
        dims["full_qk_norm"] = 1
    if spec.arch in _GATED_Q:
        dims["q_factor"] = 2
    try:
        shape = _RULES[m["kind"]](dims)
    except KeyError:  # a size this config does not have (no intermediate_size: MoE-only layers)
        return None
    return shape if m["part"] == "weight" else shape[:1]
