"""The one architecture table: how each HF model family becomes a llama.cpp GGUF model.

Per family: the gguf architecture name, the HF → GGUF tensor names (through gguf-py's
`get_tensor_name_map`), the tensor transforms convert_hf_to_gguf.py applies (llama Q/K permutation,
gemma norm +1, gemma3 vocabulary trim, dropped lm_head) and the hyper-parameter KVs. Nothing else in
qconvert hard-codes HF tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from qconvert.errors import BadInput

Transform = Callable[[np.ndarray], np.ndarray]
# HF tensors convert_hf_to_gguf.py never writes
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class ArchSpec:
    """What differs between families; the defaults are plain llama-like NEOX models."""

    name: str                                   # gguf arch name, e.g. "llama"
    arch: gguf.MODEL_ARCH
    hparams: Callable[[dict, Any], None]        # writes the arch KVs into a GGUFWriter-like object
    vocab: tuple[str, ...] = ("spm", "gpt2")    # tokenizer exporters tried in order (gguf/tokenizer.py)
    permute_qk: bool = False                    # llama/mistral: undo HF's rotary permutation of q/k rows
    norm_shift: float = 0.0                     # gemma: RMSNorm weights are stored as (w - 1)
    drop_lm_head: bool = False                  # gemma, gemma2: lm_head is never written
    trim_vocab: bool = False                    # gemma3: token_embd cut to the real vocabulary size


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from and how to make it (read() returns float32, numpy order)."""

    name: str                       # gguf name
    shape: tuple[int, ...]          # numpy order, after the transform
    source: str | None              # HF tensor name (None for generated tensors)
    read: Callable[[], np.ndarray] = field(repr=False)
    dtype: str = "F32"              # source dtype name ("BF16", "F16", "F32", or a GGML type for GGUF input)

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml order: ne[0] is the row length."""
        return tuple(reversed(self.shape))


# ---------------------------------------------------------------------------------------------------------
# hyper-parameters (mirrors the KV each family's converter writes, in the same order)

def _find(cfg: dict, keys: list[str], default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def rope_parameters(cfg: dict) -> dict:
    """Rope settings in transformers 4 (`rope_scaling`, top-level theta) or 5 (`rope_parameters`) style."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp
    local = _find(cfg, ["local_rope_theta", "rope_local_theta", "rope_local_base_freq"])
    if local is not None:
        rp["sliding_attention"] = {"rope_theta": local}
    theta = _find(cfg, ["rope_theta", "rotary_emb_base"])
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


def _hp_text(cfg: dict, w: Any) -> None:
    """Generic text-model KVs (TextModel.set_gguf_parameters)."""
    w.add_block_count(n_layer(cfg))
    if (n_ctx := _find(cfg, ["max_position_embeddings", "n_ctx", "n_positions"])) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(cfg, ["hidden_size", "n_embd"])) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := _find(cfg, ["intermediate_size", "n_inner"])) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(cfg, ["num_attention_heads", "n_head"])) is not None:
        w.add_head_count(n_head)
    if (n_kv := _find(cfg, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(n_kv)
    rp = _full_rope(cfg)
    _rope_scaling(rp, w)
    if (theta := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (swa_theta := rope_parameters(cfg).get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(swa_theta)
    if (eps := _find(cfg, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)  # placeholder; re-set at the end like llama-quantize


def _rope_scaling(rp: dict, w: Any) -> None:
    rope_type, factor = rp.get("rope_type"), rp.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def _hp_llama(cfg: dict, w: Any) -> None:
    _hp_text(cfg, w)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim(cfg))


def _hp_gemma(cfg: dict, w: Any) -> None:
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


def _hp_gemma2(cfg: dict, w: Any) -> None:
    _hp_gemma(cfg, w)
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def _hp_gemma3(cfg: dict, w: Any) -> None:
    _hp_text(cfg, w)
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


def _hp_phi3(cfg: dict, w: Any) -> None:
    rp = rope_parameters(cfg)
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(_find(cfg, ["n_positions", "max_position_embeddings"]))
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


# ---------------------------------------------------------------------------------------------------------
# the table: HF `architectures[0]` and `model_type` both lead here

_LLAMA = ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, _hp_llama, vocab=("spm", "llama_hf", "gpt2"),
                  permute_qk=True)
_QWEN2 = ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, _hp_text)
_QWEN3 = ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, _hp_text)
# gemma/gemma2/phi3: the converter knows only SentencePiece there; a byte-level BPE tokenizer.json is
# exported the gpt2 way instead of failing (llama.cpp's vocabulary loader does not depend on the arch)
_GEMMA = ArchSpec("gemma", gguf.MODEL_ARCH.GEMMA, _hp_gemma, norm_shift=1.0, drop_lm_head=True)
_GEMMA2 = ArchSpec("gemma2", gguf.MODEL_ARCH.GEMMA2, _hp_gemma2, norm_shift=1.0, drop_lm_head=True)
_GEMMA3 = ArchSpec("gemma3", gguf.MODEL_ARCH.GEMMA3, _hp_gemma3, vocab=("spm", "gpt2"), norm_shift=1.0,
                   trim_vocab=True)
_PHI3 = ArchSpec("phi3", gguf.MODEL_ARCH.PHI3, _hp_phi3, vocab=("phi3", "gpt2"))

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA, "MistralForCausalLM": _LLAMA, "Qwen2ForCausalLM": _QWEN2,
    "Qwen3ForCausalLM": _QWEN3, "GemmaForCausalLM": _GEMMA, "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA3, "Phi3ForCausalLM": _PHI3,
}
MODEL_TYPES: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _QWEN2, "qwen3": _QWEN3, "gemma": _GEMMA,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA3, "gemma3": _GEMMA3, "phi3": _PHI3,
}


def text_config(config: dict) -> dict:
    """The language-model hyper-parameters (multimodal configs nest them under text_config)."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def resolve(config: dict, source: object = None) -> ArchSpec:
    """The ArchSpec of a checkpoint, from config.json's architectures or model_type."""
    for hf_arch in config.get("architectures") or []:
        if hf_arch in ARCHITECTURES:
            return ARCHITECTURES[hf_arch]
    if config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "none"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise BadInput(f"unsupported architecture {found} (supported: {supported})", source)


def n_layer(cfg: dict) -> int:
    return int(_find(cfg, ["num_hidden_layers", "n_layer", "n_layers", "num_layers"]))


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def model_facts(spec: ArchSpec, cfg: dict) -> dict:
    """Inputs of the mixture rules (ModelFacts fields)."""
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    layers = n_layer(cfg)
    # llama.cpp's LLM_TYPE_70B: 80-layer llama with GQA, or 80-layer qwen2
    is_70b = layers == 80 and ((spec.name == "llama" and n_head_kv != n_head) or spec.name == "qwen2")
    return {"arch": spec.name, "n_layer": layers, "n_head": n_head, "n_head_kv": n_head_kv,
            "n_expert": int(_find(cfg, ["num_local_experts", "num_experts"], 0) or 0), "is_70b": is_70b}


# ---------------------------------------------------------------------------------------------------------
# tensors

def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores rotary halves split per head; llama.cpp (normal rope) wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transform(spec: ArchSpec, cfg: dict, hf_name: str, n_vocab_real: int | None) -> Transform | None:
    steps: list[Transform] = []
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        n = int(cfg["num_attention_heads"])
        steps.append(lambda x, n=n: permute_rows(x, n))
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        n = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        steps.append(lambda x, n=n: permute_rows(x, n))
    if spec.trim_vocab and n_vocab_real is not None and hf_name.endswith("embed_tokens.weight"):
        steps.append(lambda x, n=n_vocab_real: x[:n])
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        steps.append(lambda x, s=spec.norm_shift: x + np.float32(s))  # in float32, as the converter does
    if not steps:
        return None

    def apply(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return np.ascontiguousarray(x, dtype=np.float32)
    return apply


def _hf_name(name: str) -> str:
    # SmolVLM-style text towers are stored under text_model.
    return name.replace("text_model.", "") if "text_model." in name else name


def plan_tensors(ckpt: Any, spec: ArchSpec, cfg: dict,
                 n_vocab_real: int | None = None) -> list[PlannedTensor]:
    """Every GGUF tensor of the checkpoint, with its reader. Unknown names → BadInput (like the converter)."""
    tmap = gguf.get_tensor_name_map(spec.arch, n_layer(cfg))
    planned = list(_extra_tensors(spec, cfg))
    for raw in ckpt.tensors:
        hf = _hf_name(raw)
        if hf.endswith(_SKIPPED_SUFFIXES) or (spec.drop_lm_head and hf == "lm_head.weight"):
            continue
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInput(f"cannot map tensor {raw!r} to a {spec.name} GGUF tensor", ckpt.path)
        info = ckpt.tensors[raw]
        shape = tuple(info.shape)
        fn = _transform(spec, cfg, hf, n_vocab_real)
        if spec.trim_vocab and n_vocab_real is not None and hf.endswith("embed_tokens.weight"):
            shape = (min(n_vocab_real, shape[0]), *shape[1:])
        planned.append(PlannedTensor(name, shape, raw, _reader(ckpt, raw, fn), str(info.dtype).upper()))
    _check_unique(planned, ckpt)
    return planned


def _reader(ckpt: Any, raw: str, fn: Transform | None) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        x = np.asarray(ckpt.read_numpy(raw), dtype=np.float32)
        return fn(x) if fn is not None else x
    return read


def _check_unique(planned: list[PlannedTensor], ckpt: Any) -> None:
    seen: set[str] = set()
    for t in planned:
        if t.name in seen:
            raise BadInput(f"two checkpoint tensors map to {t.name}", ckpt.path)
        seen.add(t.name)


def _phi3_long_rope(cfg: dict) -> tuple[float, np.ndarray, np.ndarray] | None:
    """phi3 long-context rope (su / longrope): attention factor and per-frequency long/short factors."""
    rp = rope_parameters(cfg)
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return None
    max_pos = _find(cfg, ["n_positions", "max_position_embeddings"])
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


def extra_kvs(spec: ArchSpec, cfg: dict, w: Any) -> None:
    """KVs the converter adds while generating extra tensors — before general.*, as it does."""
    if spec.name == "phi3" and (lr := _phi3_long_rope(cfg)) is not None:
        w.add_rope_scaling_attn_factors(lr[0])


def _extra_tensors(spec: ArchSpec, cfg: dict) -> list[PlannedTensor]:
    """Tensors the converter generates (llama3 rope frequency factors, phi3 long/short rope factors)."""
    if spec.name == "phi3" and (lr := _phi3_long_rope(cfg)) is not None:
        names = (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)
        return [PlannedTensor(gguf.TENSOR_NAMES[n] + ".weight", f.shape, None, lambda f=f: f)
                for n, f in zip(names, lr[1:], strict=True)]
    rp = _full_rope(cfg)
    if spec.name != "llama" or str(rp.get("rope_type", "")).lower() != "llama3":
        return []
    factors = llama3_rope_factors(rp, head_dim(cfg))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [PlannedTensor(name, factors.shape, None, lambda f=factors: f)]


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
