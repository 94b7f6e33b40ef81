"""Hyper-parameters: the GGUF KVs each family's converter writes (in its order), read from config.json.

Each ``hp_*`` writer mirrors one ``set_gguf_parameters`` of convert_hf_to_gguf.py; ``extra_*`` are the KVs
and tensors the converter generates from the rope settings. The table (table.py) names which one a family
uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from qconvert.errors import BadInput


def find(cfg: dict, keys: list[str], default: Any = None) -> Any:
    """The first of ``keys`` that is set (the converter's find_hparam)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def n_layer(cfg: dict) -> int:
    return int(find(cfg, ["num_hidden_layers", "n_layer", "n_layers", "num_layers"]))


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_parameters(cfg: dict) -> dict:
    """Rope settings in transformers 4 (`rope_scaling`, top-level theta) or 5 (`rope_parameters`) style."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp
    local = find(cfg, ["local_rope_theta", "rope_local_theta", "rope_local_base_freq"])
    if local is not None:
        rp["sliding_attention"] = {"rope_theta": local}
    theta = find(cfg, ["rope_theta", "rotary_emb_base"])
    if "rope_theta" not in rp and theta is not None:
        rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    for k in ("partial_rotary_factor", "original_max_position_embeddings"):
        if k not in rp and cfg.get(k) is not None:
            rp[k] = cfg[k]
    return rp


def _full_rope(cfg: dict) -> dict:
    rp = rope_parameters(cfg)
    return rp.get("full_attention", rp)


# ---------------------------------------------------------------------------------------------------------
# the KV writers (w: a GGUFWriter-like object)

def hp_text(cfg: dict, w: Any) -> None:
    """Generic text-model KVs (TextModel.set_gguf_parameters)."""
    w.add_block_count(n_layer(cfg))
    if (n_ctx := find(cfg, ["max_position_embeddings", "n_ctx", "n_positions"])) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := find(cfg, ["hidden_size", "n_embd"])) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := find(cfg, ["intermediate_size", "n_inner"])) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := find(cfg, ["num_attention_heads", "n_head"])) is not None:
        w.add_head_count(n_head)
    if (n_kv := find(cfg, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(n_kv)
    rp = _full_rope(cfg)
    _rope_scaling(rp, w)
    if (sections := rp.get("mrope_section")) is not None:  # [time, height, width, extra], zero-padded
        w.add_rope_dimension_sections((list(sections) + [0] * 4)[:4])
    if (theta := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (swa_theta := rope_parameters(cfg).get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(swa_theta)
    if (eps := find(cfg, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := find(cfg, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(eps)  # LayerNorm families (cohere2)
    _moe_kvs(cfg, w)
    if (hd := cfg.get("head_dim")) is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)  # placeholder; re-set at the end like llama-quantize


# ---------------------------------------------------------------------------------------------------------
# the inverse: config.json from a GGUF file's KVs (`convert model.gguf --to hf`). Each ``cfg_*`` undoes the
# ``hp_*`` writer above it; what llama.cpp does not store is the value llama.cpp itself assumes.

class GGUFKVs:
    """A GGUF file's KVs as config.json values: ``kv["block_count"]`` reads ``{arch}.block_count``."""

    def __init__(self, arch: str, fields: dict[str, Any], tensors: dict[str, tuple[int, ...]]):
        self.arch = arch
        self.fields = fields
        self.tensors = tensors          # gguf name -> numpy shape

    def raw(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(f"{self.arch}.{key}")
        if value is None:
            return default
        if isinstance(value, float):
            return plain_float(value)
        return value.item() if isinstance(value, np.generic) else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise BadInput(f"GGUF file has no {self.arch}.{key}: cannot rebuild config.json")
        return value

    def has_tensor(self, name: str) -> bool:
        return name in self.tensors


def plain_float(x: float) -> float | int:
    """A float32 KV as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def _put(out: dict, key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def _rope_from_kv(kv: GGUFKVs, theta: Any) -> dict:
    """rope_parameters (transformers 5) from the rope KVs: the inverse of _rope_scaling."""
    rp: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    kind, factor = kv.get("rope.scaling.type"), kv.get("rope.scaling.factor")
    if kind == "linear" and factor is not None:
        rp.update(rope_type="linear", factor=factor)
    elif kind == "yarn" and factor is not None:
        rp.update(rope_type="yarn", factor=factor,
                  original_max_position_embeddings=kv.get("rope.scaling.original_context_length"))
        for key, name in (("yarn_ext_factor", "extrapolation_factor"),
                          ("yarn_attn_factor", "attention_factor"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            _put(rp, name, kv.get(f"rope.scaling.{key}"))
    return rp


def cfg_text(kv: GGUFKVs) -> dict:
    """The inverse of hp_text: sizes, heads, rope, norm epsilon, the generic MoE counts, head_dim."""
    out: dict[str, Any] = {"num_hidden_layers": kv["block_count"]}
    for key, name in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                      ("feed_forward_length", "intermediate_size"),
                      ("attention.head_count", "num_attention_heads"),
                      ("attention.head_count_kv", "num_key_value_heads"),
                      ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                      ("expert_used_count", "num_experts_per_tok")):
        _put(out, name, kv.get(key))
    out["rope_parameters"] = _rope_from_kv(kv, kv.get("rope.freq_base", 10000.0))
    _put(out, "head_dim", kv.get("attention.key_length") or kv.get("rope.dimension_count"))
    return out


# expert_gating_func values (llama-hparams.h LLAMA_EXPERT_GATING_FUNC_TYPE; gguf 0.19 lacks SQRT_SOFTPLUS)
_GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
_SCORE_KEYS = ["score_function", "scoring_func", "score_func", "moe_router_activation",
               "moe_router_activation_func", "expert_selection_fn"]


def n_expert(cfg: dict) -> int | None:
    """The routed expert count (the converter's expert_count lookup); None for a dense model."""
    n = find(cfg, ["num_local_experts", "num_experts", "n_routed_experts"])
    return None if n is None else int(n)


def _moe_kvs(cfg: dict, w: Any) -> None:
    """TextModel's generic MoE KVs, each only when its hyper-parameter is set."""
    if (n := n_expert(cfg)) is not None:
        w.add_expert_count(n)
    if (k := find(cfg, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
        w.add_expert_used_count(k)
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    if (score := find(cfg, _SCORE_KEYS)) is not None:
        if score not in _GATING:
            raise BadInput(f"unsupported expert scoring function {score!r} (supported: {', '.join(_GATING)})")
        w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=w.arch), _GATING[score])


def _rope_scaling(rp: dict, w: Any) -> None:
    rope_type, factor = rp.get("rope_type"), rp.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        if rp.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(rp["extrapolation_factor"])
        if (attn := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if rp.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
        if rp.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def hp_llama(cfg: dict, w: Any) -> None:
    hp_text(cfg, w)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim(cfg))


def hp_smollm3(cfg: dict, w: Any) -> None:
    """SmolLM3Model is LlamaModel under another arch. llama.cpp hardcodes the NoPE layers (every 4th,
    src/models/smollm3.cpp n_no_rope_layer_step) and the converter writes nothing about them: another
    no_rope_layers pattern would convert to a model that runs rope where transformers does not."""
    n = n_layer(cfg)
    want = [int((i + 1) % 4 != 0) for i in range(n)]
    if cfg.get("no_rope_layers") is not None and list(cfg["no_rope_layers"]) != want:
        raise BadInput(f"smollm3 no_rope_layers {cfg['no_rope_layers']} is not llama.cpp's fixed pattern "
                       f"{want} (NoPE on every 4th layer)")
    hp_llama(cfg, w)


LFM2_LAYER_TYPES = ("conv", "full_attention")


def lfm2_feed_forward_length(cfg: dict) -> int:
    """Lfm2MLP's width: with block_auto_adjust_ff_dim, 2/3 of the configured one, times the multiplier,
    rounded up to block_multiple_of (LFM2Model._add_feed_forward_length)."""
    ff = int(find(cfg, ["block_ff_dim", "intermediate_size"]))
    if cfg.get("block_auto_adjust_ff_dim"):
        ff = int(2 * ff / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            ff = int(cfg["block_ffn_dim_multiplier"] * ff)
        multiple = int(cfg["block_multiple_of"])
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


def check_layer_types(cfg: dict, arch: str, kinds: tuple[str, ...]) -> None:
    """A hybrid stack's layer_types: one entry per layer, each a kind the family's llama.cpp graph has."""
    types = cfg.get("layer_types") or []
    if len(types) != n_layer(cfg):
        raise BadInput(f"{arch}: layer_types has {len(types)} entries for {n_layer(cfg)} layers")
    for i, t in enumerate(types):
        if t not in kinds:
            raise BadInput(f"{arch}: layer_types[{i}] is {t!r}, not one of {', '.join(kinds)}")


def check_lfm2(cfg: dict, arch: str) -> None:
    check_layer_types(cfg, arch, LFM2_LAYER_TYPES)


def hp_lfm2(cfg: dict, w: Any) -> None:
    """LFM2Model: the short-convolution layers have no KV heads (head_count_kv is per layer, 0 there), the
    convolution's cache length, and the adjusted feed-forward width."""
    n_kv = cfg["num_key_value_heads"]
    hp_text({**cfg, "num_key_value_heads": [0 if t == "conv" else n_kv for t in cfg["layer_types"]],
             "intermediate_size": lfm2_feed_forward_length(cfg)}, w)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_shortconv_l_cache(cfg["conv_L_cache"])


def cfg_lfm2(kv: GGUFKVs) -> dict:
    """The inverse of hp_lfm2: layer_types from the per-layer KV head counts (0: a short-conv layer), the
    MLP width as it is (no auto-adjust), the norm epsilon under LFM2's name."""
    out = cfg_text(kv)
    n_kv = out.pop("num_key_value_heads")
    per_layer = list(n_kv) if isinstance(n_kv, (list, tuple, np.ndarray)) else \
        [n_kv] * out["num_hidden_layers"]
    attn = {int(n) for n in per_layer if n}
    if len(attn) != 1:
        raise BadInput(f"lfm2 GGUF head_count_kv {per_layer}: expected one count on the attention layers")
    out.update(layer_types=["full_attention" if n else "conv" for n in per_layer],
               num_key_value_heads=attn.pop(), block_auto_adjust_ff_dim=False,
               norm_eps=out.pop("rms_norm_eps"),
               conv_L_cache=kv["shortconv.l_cache"],
               conv_bias=any(name.endswith("shortconv.in_proj.bias") for name in kv.tensors))
    return out


def find_mamba(cfg: dict, keys: list[str], default: Any = None) -> Any:
    """find() over the keys and then their ``mamba_``-prefixed spellings (FalconH1Model.find_hparam)."""
    return find(cfg, [*keys, *(f"mamba_{k}" for k in keys)], default)


def falcon_h1_ssm(cfg: dict) -> tuple[int, int]:
    """(d_inner, n_group) of Falcon-H1's Mamba-2 mixers."""
    return int(find_mamba(cfg, ["mamba_d_ssm"])), int(find_mamba(cfg, ["n_groups"]))


def check_falcon_h1(cfg: dict, arch: str) -> None:
    """What FalconH1Model asserts, and the multiplier lists its folding indexes."""
    d_inner, _ = falcon_h1_ssm(cfg)
    if cfg.get("hidden_act") not in (None, "silu"):
        raise BadInput(f"{arch} hidden_act {cfg['hidden_act']!r}: llama.cpp's graph runs silu only")
    if d_inner % int(find_mamba(cfg, ["d_head"])):
        raise BadInput(f"{arch} mamba_d_ssm {d_inner} is not a multiple of mamba_d_head")
    for key, n in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
        if len(cfg.get(key) or []) != n:
            raise BadInput(f"{arch} {key} {cfg.get(key)}: expected {n} values")


def hp_falcon_h1(cfg: dict, w: Any) -> None:
    """FalconH1Model: Mamba2Model's KVs (from config.json as it is), then the attention ones over them."""
    d_inner, n_group = falcon_h1_ssm(cfg)
    ssm_head = find_mamba(cfg, ["mamba_d_head", "head_dim"]) or 64
    w.add_context_length(2**20)
    w.add_embedding_length(find_mamba(cfg, ["hidden_size", "d_model", "dim"]))
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(n_layer(cfg))
    w.add_ssm_conv_kernel(find_mamba(cfg, ["conv_kernel", "d_conv"]) or 4)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(find_mamba(cfg, ["state_size", "d_state"]) or 128)
    w.add_ssm_time_step_rank(d_inner // ssm_head)
    w.add_ssm_group_count(n_group)
    w.add_layer_norm_rms_eps(find_mamba(cfg, ["layer_norm_epsilon", "rms_norm_eps"]) or 1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)  # placeholder; re-set at the end like llama-quantize
    w.add_vocab_size(cfg["vocab_size"])
    w.add_block_count(n_layer(cfg))
    w.add_context_length(cfg.get("max_position_embeddings", 0))
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(_full_rope(cfg)["rope_theta"])


def falcon_h1_multipliers(cfg: dict, hf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Falcon-H1's µP multipliers folded into the weights, as FalconH1Model.modify_tensors does: float32
    products, k_proj's two factors one after the other, and mamba.in_proj's five row blocks
    [z, x, B, C, dt] each by its ssm_multipliers entry after ssm_in_multiplier."""
    def scalars(*keys: str) -> Callable[[np.ndarray], np.ndarray]:
        def apply(x: np.ndarray) -> np.ndarray:
            for key in keys:
                x = x * np.float32(cfg[key])
            return x
        return apply

    mlp = cfg.get("mlp_multipliers")
    # the converter's substring tests, in its order (the first that matches wins)
    for needle, fn in (("down_proj", lambda x: x * np.float32(mlp[1])),
                       ("gate_proj", lambda x: x * np.float32(mlp[0])),
                       ("k_proj", scalars("key_multiplier", "attention_in_multiplier")),
                       ("q_proj", scalars("attention_in_multiplier")),
                       ("v_proj", scalars("attention_in_multiplier")),
                       ("o_proj", scalars("attention_out_multiplier")),
                       ("out_proj", scalars("ssm_out_multiplier")),
                       ("in_proj", lambda x: _falcon_h1_in_proj(cfg, x)),
                       ("lm_head", scalars("lm_head_multiplier")),
                       ("embed_tokens", scalars("embedding_multiplier"))):
        if needle in hf_name:
            return fn
    return None


def _falcon_h1_in_proj(cfg: dict, x: np.ndarray) -> np.ndarray:
    x = x * np.float32(cfg["ssm_in_multiplier"])
    d_inner, g_state = int(cfg["mamba_d_ssm"]), int(cfg["mamba_n_groups"]) * int(cfg["mamba_d_state"])
    edges = [0, d_inner, 2 * d_inner, 2 * d_inner + g_state, 2 * d_inner + 2 * g_state, x.shape[0]]
    for lo, hi, m in zip(edges, edges[1:], cfg["ssm_multipliers"], strict=False):
        x[lo:hi] *= np.float32(m)
    return x


QWEN35_LAYER_TYPES = ("linear_attention", "full_attention")
_QWEN35_MROPE_SECTION = [11, 11, 10, 0]  # _Qwen35MRopeMixin's default, written when rope_parameters has none


def check_qwen35(cfg: dict, arch: str) -> None:
    check_layer_types(cfg, arch, QWEN35_LAYER_TYPES)
    n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    if n_v % n_k:
        raise BadInput(f"{arch}: linear_num_value_heads {n_v} is not a multiple of "
                       f"linear_num_key_heads {n_k}")


def hp_qwen35(cfg: dict, w: Any) -> None:
    """Qwen3_5TextModel (Qwen3NextModel's KVs with interleaved M-RoPE): the delta-net sizes in the ssm.*
    keys (state = key head dim, groups = key heads, time-step rank = value heads), which layers are
    recurrent, and the rotary part of each head."""
    hp_text(cfg, w)
    rp = _full_rope(cfg)
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_array(f"{w.arch}.attention.recurrent_layers", [t == "linear_attention" for t in cfg["layer_types"]])
    w.add_full_attention_interval(cfg.get("full_attention_interval", 4))
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(rope_dim * rp.get("partial_rotary_factor", 0.25)))
    if "mrope_section" not in rp:
        w.add_rope_dimension_sections(_QWEN35_MROPE_SECTION)


def _tiled(x: np.ndarray, axis: int, n_k: int, per_k: int, head: int) -> np.ndarray:
    """Value heads along `axis` from grouped by key head [k0v0, k0v1, k1v0, k1v1] to tiled [k0v0, k1v0,
    k0v1, k1v1] (each head `head` wide)."""
    grouped = x.reshape(*x.shape[:axis], n_k, per_k, head, *x.shape[axis + 1:])
    return np.swapaxes(grouped, axis, axis + 1).reshape(x.shape)


def qwen35_value_heads(cfg: dict, hf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """_LinearAttentionVReorderBase: with fewer key than value heads, the delta-net's value heads are tiled
    (see _tiled), so ggml broadcasts the key heads instead of repeating them. Every tensor indexed by value
    head follows: the v rows of in_proj_qkv and of the conv, in_proj_z/a/b rows, A and dt, out_proj's
    columns (qwen35_value_columns)."""
    n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    if n_k == n_v or ".linear_attn." not in hf_name:
        return None
    d_v, per_k = int(cfg["linear_value_head_dim"]), n_v // n_k
    qk = 2 * n_k * int(cfg["linear_key_head_dim"])  # the q and k rows / channels before v

    def rows(head: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: _tiled(x, 0, n_k, per_k, head)

    def v_part(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:qk], rows(d_v)(x[qk:])])

    if (columns := qwen35_value_columns(cfg, hf_name)) is not None:
        return lambda x: x[:, columns]
    for needle, fn in ((".in_proj_qkv.", v_part), (".conv1d.", v_part), (".in_proj_z.", rows(d_v)),
                       (".in_proj_a.", rows(1)), (".in_proj_b.", rows(1)), (".A_log", rows(1)),
                       (".dt_proj.", rows(1))):
        if needle in hf_name:
            return fn
    return None


def qwen35_value_columns(cfg: dict, hf_name: str) -> np.ndarray | None:
    """Which HF input column each GGUF column of the delta-net's out_proj holds (its value heads tiled);
    imatrix entries, made per HF input, follow the same order."""
    n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    if n_k == n_v or ".linear_attn.out_proj." not in hf_name:
        return None
    d_v = int(cfg["linear_value_head_dim"])
    return _tiled(np.arange(n_v * d_v), 0, n_k, n_v // n_k, d_v)


def hp_granite(cfg: dict, w: Any) -> None:
    """GraniteModel: llama's KVs without head_dim (the converter pops it), then each multiplier as its
    scale KV when it is truthy; the weights stay as they are (llama.cpp applies the scales)."""
    hp_llama({k: v for k, v in cfg.items() if k != "head_dim"}, w)
    if cfg.get("attention_multiplier"):
        w.add_attention_scale(cfg["attention_multiplier"])
    if cfg.get("embedding_multiplier"):
        w.add_embedding_scale(cfg["embedding_multiplier"])
    if cfg.get("residual_multiplier"):
        w.add_residual_scale(cfg["residual_multiplier"])
    if cfg.get("logits_scaling"):
        w.add_logit_scale(cfg["logits_scaling"])


def cfg_granite(kv: GGUFKVs) -> dict:
    """GraniteConfig: llama's, with each multiplier back from its scale KV (absent: transformers' 1.0)."""
    out = cfg_llama(kv)
    for key, name in (("attention.scale", "attention_multiplier"),
                      ("embedding_scale", "embedding_multiplier"),
                      ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
        if (value := kv.get(key)) is not None:
            out[name] = plain_float(value)
    return out


def cfg_llama(kv: GGUFKVs) -> dict:
    """LlamaConfig (and MixtralConfig: the llama arch with experts) from the KVs."""
    out = cfg_text(kv)
    out["attention_bias"] = kv.has_tensor("blk.0.attn_q.bias")
    out["mlp_bias"] = kv.has_tensor("blk.0.ffn_up.bias")
    if (n := kv.get("expert_count")) is not None:
        out.update(num_local_experts=n, sliding_window=None)
        del out["attention_bias"], out["mlp_bias"]
    return out


def cfg_qwen2(kv: GGUFKVs) -> dict:
    return cfg_text(kv)


def qwen_moe_dense_layers(cfg: dict) -> list[int]:
    """The layers a Qwen2-MoE / Qwen3-MoE checkpoint runs as dense MLPs (transformers' rule: in
    mlp_only_layers, or not on the decoder_sparse_step grid)."""
    step, only = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
    sparse = (n_expert(cfg) or 0) > 0 and step > 0
    return [i for i in range(n_layer(cfg)) if i in only or not (sparse and (i + 1) % step == 0)]


def check_qwen_moe(cfg: dict, arch: str) -> None:
    """Refuse dense layers in a qwen2moe / qwen3moe (before any tensor is planned: the converter's name map
    has no plain ffn_down for them either)."""
    if dense := qwen_moe_dense_layers(cfg):
        raise BadInput(f"{arch} with dense MLP layers {dense} (mlp_only_layers / decoder_sparse_step): "
                       f"llama.cpp's {arch} loader needs experts in every layer")


def hp_qwen2moe(cfg: dict, w: Any) -> None:
    """Qwen2MoeModel (qwen2moe, qwen3moe): the expert FFN sizes after the generic block. Dense layers
    (mlp_only_layers, decoder_sparse_step) are refused: the converter writes their MLP as ffn_gate/up/down,
    but llama.cpp's qwen2moe and qwen3moe loaders require the router and experts in every layer, so the file
    would not load."""
    check_qwen_moe(cfg, w.arch)
    hp_text(cfg, w)
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


def _cfg_qwen_moe(kv: GGUFKVs, norm_topk: bool) -> dict:
    out = cfg_text(kv)
    out.update(num_experts=kv["expert_count"], decoder_sparse_step=1, mlp_only_layers=[],
               norm_topk_prob=norm_topk)  # llama.cpp's graph hardcodes the renormalisation per arch
    _put(out, "moe_intermediate_size", kv.get("expert_feed_forward_length"))
    _put(out, "shared_expert_intermediate_size", kv.get("expert_shared_feed_forward_length"))
    return out


def cfg_qwen2moe(kv: GGUFKVs) -> dict:
    return _cfg_qwen_moe(kv, False)


def cfg_qwen3moe(kv: GGUFKVs) -> dict:
    return _cfg_qwen_moe(kv, True)


def hp_deepseek2(cfg: dict, w: Any) -> None:
    """DeepseekV2Model: MLA written as MQA (head_count_kv 1; key/value length of the compressed cache, in the
    slot TextModel made for head_dim, which transformers' DeepseekV3Config always has), then the MLA sizes,
    the MoE block and the rope dimension."""
    hp_text({**cfg, "num_key_value_heads": 1, "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
             "head_dim": cfg.get("head_dim", cfg["qk_rope_head_dim"])}, w)
    has_moe = cfg.get("n_routed_experts") is not None
    dense = cfg.get("first_k_dense_replace")
    w.add_leading_dense_block_count(dense if dense is not None else (0 if has_moe else n_layer(cfg)))
    r = cfg.get("kv_lora_rank", 512)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(r)
    w.add_key_length(r + cfg["qk_rope_head_dim"])
    w.add_value_length(r)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(find(cfg, ["moe_intermediate_size", "intermediate_size"]))
    if has_moe:
        w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    if (mscale_all := rope_parameters(cfg).get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)  # the loader divides by 0.1 again (legacy)


def _cfg_shared_expert_moe(kv: GGUFKVs) -> dict:
    """DeepseekV3Config's / Glm4MoeConfig's MoE keys: sizes, shared experts, leading dense layers, expert
    groups, routed scaling and the top-k renormalisation."""
    return dict(first_k_dense_replace=kv.get("leading_dense_block_count", 0),
                n_shared_experts=kv.get("expert_shared_count", 0),
                moe_intermediate_size=kv.get("expert_feed_forward_length"),
                n_routed_experts=kv.get("expert_count"),
                n_group=kv.get("expert_group_count", 1), topk_group=kv.get("expert_group_used_count", 1),
                routed_scaling_factor=kv.get("expert_weights_scale", 1.0),
                norm_topk_prob=bool(kv.get("expert_weights_norm", False)))


def cfg_deepseek2(kv: GGUFKVs) -> dict:
    """DeepseekV3Config: MLA back from its MQA form (heads of kv_b_proj = attention heads)."""
    out = cfg_text(kv)
    rope = kv["rope.dimension_count"]
    n_head = kv["attention.head_count"]
    out.update(num_key_value_heads=n_head, head_dim=rope, qk_rope_head_dim=rope,
               qk_nope_head_dim=kv["attention.key_length_mla"] - rope,
               v_head_dim=kv["attention.value_length_mla"],
               kv_lora_rank=kv["attention.kv_lora_rank"], q_lora_rank=kv.get("attention.q_lora_rank"),
               **_cfg_shared_expert_moe(kv), num_nextn_predict_layers=0)
    gating = {v: k for k, v in _GATING.items()}.get(kv.get("expert_gating_func", 1), "softmax")
    out["scoring_func"] = gating
    if (log_mul := kv.get("rope.scaling.yarn_log_multiplier")) is not None:
        out["rope_parameters"]["mscale_all_dim"] = plain_float(log_mul / 0.1)
    return out


def cfg_olmo2(kv: GGUFKVs) -> dict:
    """Olmo2Config. OLMo 3 is written as olmo2 with its sliding window; Olmo3's layer types are not read
    back (yet): refused rather than returned as an OLMo 2 that attends in full."""
    if kv.get("attention.sliding_window") is not None:
        raise BadInput("olmo2 GGUF with a sliding window (OLMo 3) cannot be converted back to HF yet")
    return cfg_text(kv)


def hp_olmoe(cfg: dict, w: Any) -> None:
    hp_text(cfg, w)
    w.add_layer_norm_rms_eps(1e-5)  # OlmoeModel forces it (re-set: the key keeps its first position)


def cfg_olmoe(kv: GGUFKVs) -> dict:
    out = cfg_text(kv)
    out.update(num_experts=kv["expert_count"], norm_topk_prob=False)
    return out


_GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # transformers 5.25's config keys


def hp_gpt_oss(cfg: dict, w: Any) -> None:
    """GptOssModel: the generic block, the sliding window and the expert width (= intermediate_size). The
    converter writes no sliding-window pattern: llama.cpp's loader defaults to 2 (even layers sliding), which
    is transformers' default layer_types; any other layer_types is written as the pattern array, which the
    loader reads first (load_swa_pattern), instead of converting to a model that attends wrongly."""
    for key, value in _GPT_OSS_SWIGLU.items():
        if cfg.get(key, value) != value:
            # the converter ignores these and llama.cpp's graph hardcodes gpt-oss's values
            # (llama-graph.cpp LLM_FFN_SWIGLU_OAI_MOE): the file would run another activation
            raise BadInput(f"gpt-oss {key} {cfg[key]} is not {value}, the value llama.cpp's gpt-oss graph "
                           "hardcodes")
    hp_text(cfg, w)
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    swa = [t == "sliding_attention" for t in cfg.get("layer_types") or []]
    if swa and swa != [i % 2 == 0 for i in range(len(swa))]:
        w.add_sliding_window_pattern(swa)


def cfg_gpt_oss(kv: GGUFKVs) -> dict:
    """GptOssConfig: the expert width, the sliding layers (llama.cpp's default: even layers), biases
    everywhere; yarn as llama.cpp computes it (no truncation of the correction range)."""
    out = cfg_text(kv)
    n = out["num_hidden_layers"]
    pattern = kv.get("attention.sliding_window_pattern")
    swa = [bool(x) for x in pattern] if pattern is not None else [i % 2 == 0 for i in range(n)]
    out.update(intermediate_size=kv["expert_feed_forward_length"], num_local_experts=kv["expert_count"],
               sliding_window=kv.get("attention.sliding_window"), attention_bias=True,
               layer_types=["sliding_attention" if s else "full_attention" for s in swa])
    if out["rope_parameters"].get("rope_type") == "yarn":
        out["rope_parameters"]["truncate"] = False
    return out


def _swa_pattern(cfg: dict) -> list[bool] | None:
    """layer_types as the converters' sliding-window pattern (True = sliding); None without layer_types."""
    types = cfg.get("layer_types")
    return None if types is None else [t == "sliding_attention" for t in types]


def hp_olmo2(cfg: dict, w: Any) -> None:
    """Olmo2Model (Olmo2 and Olmo3): the generic block; a config with sliding_window (Olmo3) adds it and the
    pattern from layer_types, else every 4th layer full."""
    hp_text(cfg, w)
    if "sliding_window" in cfg:
        w.add_sliding_window(cfg["sliding_window"])
        pattern = _swa_pattern(cfg)
        w.add_sliding_window_pattern(pattern if pattern is not None else
                                     [(i + 1) % 4 != 0 for i in range(n_layer(cfg))])


def hp_glm4(cfg: dict, w: Any) -> None:
    """Glm4Model: the generic block and the rotary dimensions (head_dim x partial_rotary_factor, 0.5 by
    default). With M-RoPE (GLM-4V) the converter permutes q/k to neox order: not supported here."""
    rp = rope_parameters(cfg)
    if "mrope_section" in rp:
        raise BadInput("glm4 with M-RoPE (rope_parameters.mrope_section, GLM-4V) is not supported")
    hp_text(cfg, w)
    w.add_rope_dimension_count(int(head_dim(cfg) * rp.get("partial_rotary_factor", 0.5)))


def cfg_glm4(kv: GGUFKVs) -> dict:
    """Glm4Config: hp_glm4 undone (the rotary fraction from rope.dimension_count; q/k/v biases from the
    tensors present)."""
    out = cfg_text(kv)
    rotary = kv["rope.dimension_count"] / out["head_dim"]
    out["rope_parameters"]["partial_rotary_factor"] = plain_float(rotary)
    out["attention_bias"] = "blk.0.attn_q.bias" in kv.tensors
    return out


# what transformers' Glm4MoeConfig fills in for a key config.json lacks (the converter reads AutoConfig's
# to_dict(), A.1 of the reference): the hub configs carry them all, older ones may not
GLM4MOE_DEFAULTS = {"num_nextn_predict_layers": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "n_group": 1, "topk_group": 1}


def glm4moe_config(cfg: dict) -> dict:
    return {**GLM4MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}


def glm4moe_nextn(cfg: dict) -> int:
    """The MTP (NextN) layers Glm4MoeModel counts into block_count, whether the checkpoint holds their
    tensors or not (transformers' Glm4MoeForCausalLM has none; the hub's GLM-4.5 files have layer L)."""
    return int(glm4moe_config(cfg)["num_nextn_predict_layers"])


def hp_glm4moe(cfg: dict, w: Any) -> None:
    """Glm4MoeModel: the generic block with block_count = num_hidden_layers + num_nextn_predict_layers, then
    the rotary dimensions (head_dim x partial_rotary_factor, 0.5 by default), the expert count again, the
    expert and shared-expert sizes, the leading dense layers, sigmoid gating (always), routed scaling, the
    top-k renormalisation (written even when false) and the MTP layer count. Expert groups llama.cpp's
    loader would abort on (it asserts 0 < topk_group < n_group and n_group | n_expert when n_group > 1, and
    n_group < n_expert) are refused here."""
    cfg = glm4moe_config(cfg)
    n, groups, used = n_expert(cfg), int(cfg["n_group"]), int(cfg["topk_group"])
    if n is not None and (groups >= n or (groups > 1 and (n % groups or not 0 < used < groups))):
        raise BadInput(f"glm4moe n_group {groups} / topk_group {used} with {n} experts: llama.cpp's loader "
                       "needs n_group < experts and, for n_group > 1, 0 < topk_group < n_group dividing "
                       "the experts")
    nextn = glm4moe_nextn(cfg)
    hp_text({**cfg, "num_hidden_layers": n_layer(cfg) + nextn}, w)
    w.add_rope_dimension_count(int(head_dim(cfg) * rope_parameters(cfg).get("partial_rotary_factor", 0.5)))
    if n is not None:
        w.add_expert_count(n)
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=w.arch), _GATING["sigmoid"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    w.add_nextn_predict_layers(nextn)


def cfg_glm4moe(kv: GGUFKVs) -> dict:
    """Glm4MoeConfig: glm4's, the MoE sizes and routing, and the MTP layers out of num_hidden_layers (their
    count stays in num_nextn_predict_layers); the per-head q/k norms are read from the tensors present."""
    out = cfg_glm4(kv)
    nextn = int(kv.get("nextn_predict_layers", 0))
    out.update(num_hidden_layers=kv["block_count"] - nextn, num_nextn_predict_layers=nextn,
               use_qk_norm="blk.0.attn_q_norm.weight" in kv.tensors, **_cfg_shared_expert_moe(kv))
    return out


def hp_exaone4(cfg: dict, w: Any) -> None:
    """Exaone4Model: the generic block, vocab_size, the sliding window and its pattern (layer_types, else
    sliding_window_pattern: an int p means every p-th layer full, a string like "LLLG" repeats)."""
    n, p = n_layer(cfg), cfg.get("sliding_window_pattern")
    if cfg.get("sliding_window") is not None and n != 64 and any(_swa_pattern(cfg) or [True]):
        # src/models/exaone4.cpp turns sliding windows (and NoPE on the global layers) on for 64 layers only
        raise BadInput(f"exaone4 with sliding_window and {n} layers: llama.cpp runs sliding-window attention "
                       "only for the 64-layer model (EXAONE 4.0 32B), this one would attend in full")
    hp_text(cfg, w)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window") is None:
        return
    w.add_sliding_window(cfg["sliding_window"])
    if (pattern := _swa_pattern(cfg)) is not None:
        w.add_sliding_window_pattern(pattern)
    elif isinstance(p, str) and p:
        w.add_sliding_window_pattern([p[i % len(p)] == "L" for i in range(n)])
    elif isinstance(p, int) and not isinstance(p, bool) and p:
        w.add_sliding_window_pattern([(i + 1) % p != 0 for i in range(n)])


def extra_tensors_exaone4(cfg: dict) -> list[tuple[str, np.ndarray]]:
    """Exaone4Model's llama3 rope factors: llama's, with its own default factor (16)."""
    rp = _full_rope(cfg)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    factors = llama3_rope_factors({"factor": 16.0, **rp}, head_dim(cfg))
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)]


def hp_cohere2(cfg: dict, w: Any) -> None:
    """Cohere2Model: the generic block (LayerNorm epsilon), the logit scale, the sliding window, vocab_size,
    the rotary dimensions (rotary_pct of hidden/heads) and rope scaling none. llama.cpp's loader assumes
    every 4th layer global unless the file says (load_swa_pattern(ml, 4)) and the converter writes no
    pattern: another layer_types is written as the pattern, which the loader reads first."""
    hp_text(cfg, w)
    w.add_logit_scale(cfg["logit_scale"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_vocab_size(cfg["vocab_size"])
    # the converter requires rotary_pct; transformers' Cohere2 ignores it and rotates whole heads
    rotary = cfg.get("rotary_pct", 1.0)
    w.add_rope_dimension_count(int(rotary * (cfg["hidden_size"] // cfg["num_attention_heads"])))
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    pattern = _swa_pattern(cfg)
    if pattern is not None and pattern != [(i + 1) % 4 != 0 for i in range(len(pattern))]:
        w.add_sliding_window_pattern(pattern)


def hp_gemma(cfg: dict, w: Any) -> None:
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer(cfg))
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)


def cfg_gemma(kv: GGUFKVs) -> dict:
    out = cfg_text(kv)
    out["query_pre_attn_scalar"] = out["head_dim"]  # llama.cpp scales by 1/sqrt(key_length)
    return out


def hp_gemma2(cfg: dict, w: Any) -> None:
    hp_gemma(cfg, w)
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def cfg_gemma2(kv: GGUFKVs) -> dict:
    out = cfg_gemma(kv)
    out.update(attn_logit_softcapping=kv.get("attn_logit_softcapping"),
               final_logit_softcapping=kv.get("final_logit_softcapping"),
               sliding_window=kv.get("attention.sliding_window"))
    return out


def hp_gemma3(cfg: dict, w: Any) -> None:
    hp_text(cfg, w)
    # the gemma3 converter re-sets these with its own defaults (a re-set keeps the key's position)
    w.add_context_length(cfg.get("max_position_embeddings", 131072))
    w.add_head_count(cfg.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_key_length(cfg.get("head_dim", 256))
    w.add_value_length(cfg.get("head_dim", 256))
    w.add_rope_freq_base(_full_rope(cfg).get("rope_theta", 1_000_000.0))
    if cfg.get("attn_logit_softcapping") is not None:
        raise BadInput("gemma3 checkpoints must not set attn_logit_softcapping")
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(cfg["sliding_window"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", 4))
    swa = [t == "sliding_attention" for t in cfg.get("layer_types") or []]
    if swa and swa != [i % 6 < 5 for i in range(len(swa))]:
        # llama.cpp assumes 5 local : 1 global unless told; the converter does not tell (wrong rope base)
        w.add_sliding_window_pattern(swa)


def cfg_gemma3(kv: GGUFKVs) -> dict:
    """Gemma3TextConfig: per-layer attention kinds from the sliding-window pattern (llama.cpp's 5:1 unless
    the file says), the local rope base in its own rope_parameters entry."""
    out = cfg_gemma(kv)
    pattern = kv.get("attention.sliding_window_pattern")
    n = out["num_hidden_layers"]
    swa = [bool(x) for x in pattern] if pattern is not None else [i % 6 < 5 for i in range(n)]
    full = out.pop("rope_parameters")
    out.update(layer_types=["sliding_attention" if s else "full_attention" for s in swa],
               sliding_window=kv.get("attention.sliding_window"),
               final_logit_softcapping=kv.get("final_logit_softcapping"),
               rope_parameters={"full_attention": full, "sliding_attention": {
                   "rope_theta": kv.get("rope.freq_base_swa", 10000.0), "rope_type": "default"}})
    return out


def hp_phi3(cfg: dict, w: Any) -> None:
    rp = rope_parameters(cfg)
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(find(cfg, ["n_positions", "max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings",
                                           cfg.get("max_position_embeddings")))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layer(cfg))
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    w.add_rope_freq_base(rp.get("full_attention", rp).get("rope_theta", 10000.0))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_sliding_window(cfg.get("sliding_window") or 0)  # 0 tells Phi-4 apart from other phi3 models


def cfg_phi3(kv: GGUFKVs) -> dict:
    """Phi3Config: the partial rotary factor from the rope dimensions, the long rope back from its KVs (its
    factor tensors are read by the caller)."""
    out = cfg_text(kv)
    out.pop("head_dim", None)
    n_embd, n_head = out["hidden_size"], out["num_attention_heads"]
    rotary = kv["rope.dimension_count"] * n_head / n_embd
    out["rope_parameters"]["partial_rotary_factor"] = plain_float(rotary)
    _put(out, "original_max_position_embeddings", kv.get("rope.scaling.original_context_length"))
    out["sliding_window"] = kv.get("attention.sliding_window") or None
    return out


# ---------------------------------------------------------------------------------------------------------
# generated KVs and tensors (rope factors)

def _phi3_long_rope(cfg: dict) -> tuple[float, np.ndarray, np.ndarray] | None:
    """phi3 long-context rope (su / longrope): attention factor and per-frequency long/short factors."""
    rp = rope_parameters(cfg)
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return None
    max_pos = find(cfg, ["n_positions", "max_position_embeddings"])
    orig = rp.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if not short or not orig:
        raise BadInput("phi3 long rope needs rope_scaling.short_factor and original_max_position_embeddings")
    dims = int(rp.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // cfg["num_attention_heads"]
    if len(long) != len(short) or len(long) * 2 != dims:
        raise BadInput(f"phi3 rope long/short factors must have {dims // 2} entries, "
                       f"got {len(long)} and {len(short)}")
    kind = str(rp.get("rope_type") or rp.get("type") or "").lower()
    scale = max_pos / orig
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise BadInput(f"phi3 rope scaling type {kind or '(missing)'!r} is not supported")
    return attn, np.asarray(long, dtype=np.float32), np.asarray(short, dtype=np.float32)


def extra_kv_phi3(cfg: dict, w: Any) -> None:
    """The long-rope attention factor the phi3 converter adds while generating its rope tensors."""
    if (lr := _phi3_long_rope(cfg)) is not None:
        w.add_rope_scaling_attn_factors(lr[0])


def extra_tensors_phi3(cfg: dict) -> list[tuple[str, np.ndarray]]:
    """phi3 long/short rope factors (gguf name, float32 data)."""
    if (lr := _phi3_long_rope(cfg)) is None:
        return []
    names = (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)
    return [(gguf.TENSOR_NAMES[n] + ".weight", f) for n, f in zip(names, lr[1:], strict=True)]


def extra_tensors_llama(cfg: dict) -> list[tuple[str, np.ndarray]]:
    """llama3-style rope frequency factors (none for other rope types)."""
    rp = _full_rope(cfg)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    factors = llama3_rope_factors(rp, head_dim(cfg))
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)]


def llama3_rope_factors(rp: dict, dim: int) -> np.ndarray:
    """Per-frequency rope scale for llama3-style rope (computed as Llama 3.1 defines it)."""
    base = rp.get("rope_theta", 10000.0)
    factor = rp.get("factor", 8.0)
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
