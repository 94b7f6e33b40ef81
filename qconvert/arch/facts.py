"""Model facts: the hyper-parameters llama.cpp's quantization rules read, built one way for every input.

``facts_from_kv`` reads them from GGUF KVs, as ``llama_model_quantize`` does (llama_model::load_hparams on
the input file): a GGUF input's own header, or the header convert writes for an HF checkpoint (the output
equals llama-quantize run on our BF16 GGUF, so its KVs are what llama.cpp would read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    """The hparams the rules read: arch name as in general.architecture, layer 0 head counts, expert count."""

    arch: str
    n_layer: int  # block_count (llama.cpp's n_layer_all: the ffn_down counter's range)
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (is_70b_model)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def falcon(self) -> bool:
        """llama-quant.cpp's `arch == LLM_ARCH_FALCON` rules (output, ffn_down, attn_output)."""
        return self.arch == "falcon"


def is_70b_model(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int = 0) -> bool:
    """llama.cpp's LLM_TYPE_70B, the only model size the rules read (the attn_v Q3_K/Q4_K -> Q5_K bump).

    Set by each arch's load_arch_hparams (src/models/<arch>.cpp) from hparams.n_layer() (block_count minus
    nextn_predict_layers): llama (and llama-embed, which reuses it) only without 8 experts (8x7B/8x22B take
    that branch) and with GQA (80 layers without it is 65B); qwen2, olmo and deci at 80 layers; jais2 at 68.
    """
    if arch in ("llama", "llama-embed"):
        return n_expert != 8 and n_layer == 80 and n_head != n_head_kv
    if arch in ("qwen2", "olmo", "deci"):
        return n_layer == 80
    return arch == "jais2" and n_layer == 68


def _int(kv: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = kv.get(key)
    if v is None:
        return default
    return int(v[0] if isinstance(v, list | tuple) else v)  # per-layer arrays: layer 0, as n_head() reads


def facts_from_kv(arch: str, kv: Mapping[str, Any]) -> ModelFacts:
    """ModelFacts from GGUF KVs (key -> value), the way llama_model::load_hparams reads them."""
    n_layer = _int(kv, f"{arch}.block_count")
    n_head = _int(kv, f"{arch}.attention.head_count")
    n_head_kv = _int(kv, f"{arch}.attention.head_count_kv", n_head)  # defaults to head_count in llama.cpp
    n_expert = _int(kv, f"{arch}.expert_count")
    n_nextn = _int(kv, f"{arch}.nextn_predict_layers")  # MTP layers do not count for the model size
    return ModelFacts(arch, n_layer, n_head, n_head_kv, n_expert,
                      is_70b_model(arch, n_layer - n_nextn, n_head, n_head_kv, n_expert))
