"""The architecture table: how each HF model family becomes a llama.cpp GGUF model, and what its decoder
block looks like.

One ``ArchSpec`` per family: the gguf architecture, its hyper-parameter writer (hparams.py), the tokenizer
rules (vocab.py), the tensor transforms convert_hf_to_gguf.py applies (tensors.py reads the flags), the
tensors and KVs it generates, and the block layout methods use (blocks.py). HF ``architectures[0]`` and
``model_type`` both lead to it. Adding a family is one spec and its lines in the two maps below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from qconvert.arch import hparams as hp
from qconvert.arch import vocab
from qconvert.arch.blocks import GEMMA2_BLOCK, LLAMA_BLOCK, MLA_BLOCK, PHI3_BLOCK, BlockLayout
from qconvert.errors import BadInput


@dataclass(frozen=True)
class Experts:
    """Where a MoE family keeps its routed experts: ``<prefix>.layers.N.<module>.X.<proj>.weight``, one
    Linear per expert and projection (the hub layout), stacked into ``ffn_{gate,up,down}_exps``."""

    module: str = "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # transformers 5's own parameters, ``<module>.gate_up_proj`` [E, 2I, H] (gate rows first) and
    # ``<module>.down_proj`` [E, H, I], accepted as Qwen2MoeModel accepts them
    fused: bool = True
    # gpt-oss: only fused parameters, in x@W orientation (gate_up_proj [E, H, 2I] with gate/up interleaved
    # columns, down_proj [E, I, H]) with biases, or as MXFP4 ``*_blocks`` / ``*_scales`` (GptOssModel)
    interleaved: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """What differs between families; the defaults are plain llama-like NEOX models."""

    name: str                                   # gguf arch name, e.g. "llama"
    arch: gguf.MODEL_ARCH
    hparams: Callable[[dict, Any], None]        # writes the arch KVs into a GGUFWriter-like object
    vocab: vocab.Vocab = vocab.Vocab()          # tokenizer exporters and quirks
    permute_qk: bool = False                    # llama/mistral: undo HF's rotary permutation of q/k rows
    norm_shift: float = 0.0                     # gemma: RMSNorm weights are stored as (w - 1)
    drop_lm_head: bool = False                  # gemma, gemma2: lm_head is never written
    trim_vocab: bool = False                    # gemma3: token_embd cut to the real vocabulary size
    extra_kvs: Callable[[dict, Any], None] | None = None  # KVs written before general.* (phi3 long rope)
    extra_tensors: Callable[[dict], list[tuple[str, np.ndarray]]] | None = None  # generated (rope factors)
    block: BlockLayout | None = LLAMA_BLOCK     # decoder-block module names (None: methods cannot walk it)
    experts: Experts | None = None              # MoE families: the routed experts' layout
    needs_output: bool = False                  # llama.cpp's loader requires output.weight (no tied lm_head)
    mla: bool = False                           # deepseek2: kv_b_proj split into attn_k_b / attn_v_b (3-D),
                                                # MTP layers (>= num_hidden_layers) and a tied lm_head dropped
    # glm4moe: MTP (NextN) layers counted into block_count and kept (model.layers.{>= L} -> blk.{>= L}.*,
    # nextn.*); how many, from the config
    mtp_layers: Callable[[dict], int] | None = None
    check: Callable[[dict, str], None] | None = None  # refusals from config.json before any tensor is planned
    zero_biases: bool = False                   # cohere2: biases dropped, refused unless all zero (its
                                                # llama.cpp graph has none)
    # the way back (`convert model.gguf --to hf`, arch/hf.py): config.json from the KVs (hparams.cfg_*), and
    # the HF module of each GGUF block tensor where it is not the llama-like default (arch/hf.HF_MODULES).
    # None: no verified way back (tests/pipelines/test_gguf_to_hf.py round-trips every family that has one),
    # refused in one line rather than writing a checkpoint transformers loads wrong
    hf_config: Callable[[Any], dict] | None = hp.cfg_text
    hf_modules: tuple[tuple[str, str], ...] = ()
    # the MLP's real width where it is not intermediate_size (LFM2's auto-adjusted one), for the shape checks
    ffn_length: Callable[[dict], int] | None = None
    # hybrid families: the GGUF tensors (blk.N.<tensor>) every layer of each config layer_types entry must
    # have ("*": every layer, for stacks without layer_types), so that a checkpoint missing one layer's
    # tensors is refused by name before any output
    layer_tensors: dict[str, tuple[str, ...]] | None = None
    # a family's own weight transform (Falcon-H1's folded multipliers), before the generic ones
    weight_transform: Callable[[dict, str], Callable[[np.ndarray], np.ndarray] | None] | None = None
    # norms that norm_shift leaves alone (Qwen3.5's gated delta-net norm multiplies by w, not 1 + w)
    unshifted_norms: tuple[str, ...] = ()
    # Mamba2Model's layouts: A and D as [n_head, 1], the grouped norm as [n_group, d_inner / n_group]
    mamba2: bool = False
    # HF tensor prefixes the family's converter drops (Qwen3.5's MTP head, as with --no-mtp)
    drop_prefixes: tuple[str, ...] = ()
    # where the converter reorders a Linear's input columns (Qwen3.5's out_proj): the HF column of each GGUF
    # column, for what is collected per HF input (imatrix entries)
    input_order: Callable[[dict, str], np.ndarray | None] | None = None


_LLAMA = ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, hp.hp_llama,
                  vocab=vocab.Vocab(("spm", "llama_hf", "gpt2"), vocab.llama_before, vocab.llama_after),
                  permute_qk=True, extra_tensors=hp.extra_tensors_llama, hf_config=hp.cfg_llama)
_QWEN2 = ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, hp.hp_text, hf_config=hp.cfg_qwen2)
_QWEN3 = ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, hp.hp_text)
# gemma/gemma2/phi3: the converter knows only SentencePiece there; a byte-level BPE tokenizer.json is
# exported the gpt2 way instead of failing (llama.cpp's vocabulary loader does not depend on the arch)
_GEMMA = ArchSpec("gemma", gguf.MODEL_ARCH.GEMMA, hp.hp_gemma, vocab=vocab.Vocab(after=vocab.gemma_after),
                  norm_shift=1.0, drop_lm_head=True, hf_config=hp.cfg_gemma)
_GEMMA2 = ArchSpec("gemma2", gguf.MODEL_ARCH.GEMMA2, hp.hp_gemma2,
                   vocab=vocab.Vocab(after=vocab.gemma2_after), norm_shift=1.0, drop_lm_head=True,
                   block=GEMMA2_BLOCK, hf_config=hp.cfg_gemma2,
                   hf_modules=(("ffn_norm", "pre_feedforward_layernorm"),))
_GEMMA3 = ArchSpec("gemma3", gguf.MODEL_ARCH.GEMMA3, hp.hp_gemma3,
                   vocab=vocab.Vocab(after=vocab.gemma3_after), norm_shift=1.0, trim_vocab=True,
                   block=GEMMA2_BLOCK, hf_config=hp.cfg_gemma3,
                   hf_modules=(("ffn_norm", "pre_feedforward_layernorm"),))
_PHI3 = ArchSpec("phi3", gguf.MODEL_ARCH.PHI3, hp.hp_phi3, vocab=vocab.Vocab(("phi3", "gpt2")),
                 extra_kvs=hp.extra_kv_phi3, extra_tensors=hp.extra_tensors_phi3, block=PHI3_BLOCK,
                 hf_config=hp.cfg_phi3, hf_modules=(("ffn_up", "mlp.gate_up_proj"),))

# MoE families: llama-shaped blocks with a sparse MLP (AWQ: arch/blocks.MoeFFN; glm4moe's and deepseek2's
# leading dense layers are llama's block, deepseek2's attention MLA_BLOCK's); gpt-oss's fused, biased experts
# have no layout the methods know (block=None)
_QWEN2MOE = ArchSpec("qwen2moe", gguf.MODEL_ARCH.QWEN2MOE, hp.hp_qwen2moe, experts=Experts(),
                     check=hp.check_qwen_moe,
                     needs_output=True, hf_config=hp.cfg_qwen2moe)
_QWEN3MOE = ArchSpec("qwen3moe", gguf.MODEL_ARCH.QWEN3MOE, hp.hp_qwen2moe, experts=Experts(),
                     check=hp.check_qwen_moe,
                     hf_config=hp.cfg_qwen3moe)
_OLMOE = ArchSpec("olmoe", gguf.MODEL_ARCH.OLMOE, hp.hp_olmoe, experts=Experts(),
                  needs_output=True, hf_config=hp.cfg_olmoe)
_DEEPSEEK2 = ArchSpec("deepseek2", gguf.MODEL_ARCH.DEEPSEEK2, hp.hp_deepseek2, block=MLA_BLOCK,
                      experts=Experts(), mla=True, hf_config=hp.cfg_deepseek2,
                      hf_modules=(("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
                                  ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
                                  ("ffn_down_shexp", "mlp.shared_experts.down_proj")))
# GLM-4.5/4.6/4.7: sigmoid routing with the correction bias (exp_probs_b), shared experts, leading dense
# layers, partial rotary, q/k/v biases; block_count counts the MTP layer even when the checkpoint has none
# (llama.cpp's loader then loads the trunk only). Glm4MoeModel takes per-expert tensors only (fused ones
# leave it with "Unprocessed experts"); the fused form is accepted here as for the Qwen families
_GLM4MOE = ArchSpec("glm4moe", gguf.MODEL_ARCH.GLM4_MOE, hp.hp_glm4moe,
                    vocab=vocab.Vocab(("gpt2",), specials=vocab.glm4moe_specials),
                    experts=Experts(), mtp_layers=hp.glm4moe_nextn, hf_config=hp.cfg_glm4moe,
                    hf_modules=(*_DEEPSEEK2.hf_modules, ("nextn.eh_proj", "eh_proj"),
                                ("nextn.enorm", "enorm"), ("nextn.hnorm", "hnorm"),
                                ("nextn.shared_head_norm", "shared_head.norm"),
                                ("nextn.embed_tokens", "embed_tokens"),
                                ("nextn.shared_head_head", "shared_head.head")))
# Mixtral is llama with experts (block_sparse_moe.experts.X.w1/w3/w2 = gate/up/down); the converter's
# LlamaModel knows no fused form for it
_MIXTRAL = ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, hp.hp_llama, vocab=_LLAMA.vocab, permute_qk=True,
                    extra_tensors=hp.extra_tensors_llama, block=BlockLayout(mlp="block_sparse_moe"),
                    experts=Experts("block_sparse_moe.experts", "w1", "w3", "w2", fused=False),
                    hf_config=hp.cfg_llama, hf_modules=(("ffn_gate_inp", "block_sparse_moe.gate"),))

# gpt-oss: MoE with biases everywhere, attention sinks and an even-layers sliding window; the experts are
# fused (or MXFP4 blocks, copied as they are); llama.cpp's loader requires output.weight
_GPT_OSS = ArchSpec("gpt-oss", gguf.MODEL_ARCH.GPT_OSS, hp.hp_gpt_oss, vocab=vocab.Vocab(("gpt2",)),
                    block=None, experts=Experts(interleaved=True), needs_output=True,
                    hf_config=hp.cfg_gpt_oss, hf_modules=(("ffn_gate_inp", "mlp.router"),))

# the dense 2026 families. Only the llama-shaped ones get a block layout: the post-norm (olmo2, exaone4),
# sandwich-norm (glm4) and parallel (cohere2) blocks have no norm in front of q/k/v and gate/up that AWQ /
# SmoothQuant could fold into, so those methods refuse them
_SMOLLM3 = ArchSpec("smollm3", gguf.MODEL_ARCH.SMOLLM3, hp.hp_smollm3, vocab=_LLAMA.vocab, permute_qk=True,
                    extra_tensors=hp.extra_tensors_llama)
# Olmo3 too: the converter writes both as olmo2 (Olmo3's sliding window as KVs); llama.cpp's olmo2 loader
# requires output.weight
_OLMO2 = ArchSpec("olmo2", gguf.MODEL_ARCH.OLMO2, hp.hp_olmo2, vocab=vocab.Vocab(("gpt2",)), block=None,
                  needs_output=True, hf_config=hp.cfg_olmo2)
_GRANITE = ArchSpec("granite", gguf.MODEL_ARCH.GRANITE, hp.hp_granite, vocab=_LLAMA.vocab, permute_qk=True,
                    extra_tensors=hp.extra_tensors_llama, hf_config=hp.cfg_granite)
_GLM4 = ArchSpec("glm4", gguf.MODEL_ARCH.GLM4, hp.hp_glm4, vocab=vocab.Vocab(("gpt2",),
                 specials=vocab.glm4_specials), block=None, hf_config=hp.cfg_glm4,
                 # the sandwich norms: post_self_attn / post_mlp norms on the outputs, gate and up fused
                 hf_modules=(("post_attention_norm", "post_self_attn_layernorm"),
                             ("post_ffw_norm", "post_mlp_layernorm"), ("ffn_up", "mlp.gate_up_proj")))
_EXAONE4 = ArchSpec("exaone4", gguf.MODEL_ARCH.EXAONE4, hp.hp_exaone4, vocab=vocab.Vocab(("gpt2",)),
                    extra_tensors=hp.extra_tensors_exaone4, block=None, hf_config=None)
_COHERE2 = ArchSpec("cohere2", gguf.MODEL_ARCH.COHERE2, hp.hp_cohere2, vocab=vocab.Vocab(("gpt2",)),
                    zero_biases=True, block=None, hf_config=None)
_SEED_OSS = ArchSpec("seed_oss", gguf.MODEL_ARCH.SEED_OSS, hp.hp_text, vocab=vocab.Vocab(("gpt2",)))
# the converter reads tokenizer.model only
_ERNIE4_5 = ArchSpec("ernie4_5", gguf.MODEL_ARCH.ERNIE4_5, hp.hp_text,
                     vocab=vocab.Vocab(("spm",), after_config=vocab.ernie4_5_after_config), hf_config=None)

def _weights(*stems: str) -> tuple[str, ...]:
    return tuple(f"{stem}.weight" for stem in stems)


# the hybrid families: layers that are not all attention (layer_types). LFM2's short-convolution layers
# (in_proj -> depthwise conv over conv_L_cache tokens -> out_proj) beside full-attention ones with q/k norms;
# no block layout (a conv layer has no q/k/v for AWQ to balance)
_LFM2 = ArchSpec("lfm2", gguf.MODEL_ARCH.LFM2, hp.hp_lfm2, vocab=vocab.Vocab(("gpt2",)), check=hp.check_lfm2,
                 block=None, hf_config=hp.cfg_lfm2, ffn_length=hp.lfm2_feed_forward_length,
                 hf_modules=(("attn_norm", "operator_norm"), ("attn_output", "self_attn.out_proj"),
                             ("attn_q_norm", "self_attn.q_layernorm"),
                             ("attn_k_norm", "self_attn.k_layernorm"),
                             ("ffn_norm", "ffn_norm"), ("ffn_gate", "feed_forward.w1"),
                             ("ffn_up", "feed_forward.w3"), ("ffn_down", "feed_forward.w2"),
                             ("shortconv.conv", "conv.conv"), ("shortconv.in_proj", "conv.in_proj"),
                             ("shortconv.out_proj", "conv.out_proj")),
                 layer_tensors={"conv": _weights("shortconv.conv", "shortconv.in_proj", "shortconv.out_proj"),
                                "full_attention": _weights("attn_q", "attn_k", "attn_v", "attn_output")})
# Falcon-H1: every layer runs a Mamba-2 mixer and attention side by side, then the MLP; the µP multipliers
# are folded into the weights (llama.cpp has no KVs for them)
_FALCON_H1 = ArchSpec("falcon-h1", gguf.MODEL_ARCH.FALCON_H1, hp.hp_falcon_h1, vocab=vocab.Vocab(("gpt2",)),
                      check=hp.check_falcon_h1, block=None, hf_config=None, mamba2=True,
                      weight_transform=hp.falcon_h1_multipliers,
                      layer_tensors={"*": (*_weights("ssm_in", "ssm_conv1d", "ssm_out", "attn_q", "attn_k",
                                                     "attn_v", "attn_output"), "ssm_a", "ssm_d",
                                           "ssm_dt.bias")})
# Qwen3.5 (text model): gated delta-net layers, every fourth one full attention with a gated query; the norms
# stored as w - 1 except the delta-net's own; value heads regrouped for ggml's broadcast
# (_LinearAttentionVReorderBase); the MTP head is dropped (convert_hf_to_gguf.py --no-mtp)
_QWEN35 = ArchSpec("qwen35", gguf.MODEL_ARCH.QWEN35, hp.hp_qwen35, check=hp.check_qwen35, block=None,
                   hf_config=None, norm_shift=1.0, unshifted_norms=("linear_attn.norm.weight",),
                   weight_transform=hp.qwen35_value_heads, input_order=hp.qwen35_value_columns,
                   drop_prefixes=("mtp.",),
                   layer_tensors={"linear_attention": (*_weights("attn_qkv", "attn_gate", "ssm_alpha",
                                                                 "ssm_beta", "ssm_conv1d", "ssm_norm",
                                                                 "ssm_out"), "ssm_a", "ssm_dt.bias"),
                                  "full_attention": _weights("attn_q", "attn_k", "attn_v", "attn_output")})

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA, "MistralForCausalLM": _LLAMA, "Qwen2ForCausalLM": _QWEN2,
    "Qwen3ForCausalLM": _QWEN3, "GemmaForCausalLM": _GEMMA, "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA3, "Phi3ForCausalLM": _PHI3, "Qwen3MoeForCausalLM": _QWEN3MOE,
    "OlmoeForCausalLM": _OLMOE, "Qwen2MoeForCausalLM": _QWEN2MOE, "MixtralForCausalLM": _MIXTRAL,
    "DeepseekV3ForCausalLM": _DEEPSEEK2, "Glm4MoeForCausalLM": _GLM4MOE,
    "GptOssForCausalLM": _GPT_OSS,
    "SmolLM3ForCausalLM": _SMOLLM3, "Olmo2ForCausalLM": _OLMO2, "Olmo3ForCausalLM": _OLMO2,
    "GraniteForCausalLM": _GRANITE, "Glm4ForCausalLM": _GLM4, "Exaone4ForCausalLM": _EXAONE4,
    "Cohere2ForCausalLM": _COHERE2, "SeedOssForCausalLM": _SEED_OSS, "Ernie4_5ForCausalLM": _ERNIE4_5,
    "Ernie4_5_ForCausalLM": _ERNIE4_5, "Lfm2ForCausalLM": _LFM2, "LFM2ForCausalLM": _LFM2,
    "FalconH1ForCausalLM": _FALCON_H1, "Qwen3_5ForCausalLM": _QWEN35,
}
MODEL_TYPES: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _QWEN2, "qwen3": _QWEN3, "gemma": _GEMMA,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA3, "gemma3": _GEMMA3, "phi3": _PHI3, "qwen3_moe": _QWEN3MOE,
    "olmoe": _OLMOE, "qwen2_moe": _QWEN2MOE, "mixtral": _MIXTRAL, "deepseek_v3": _DEEPSEEK2,
    "glm4_moe": _GLM4MOE, "gpt_oss": _GPT_OSS,
    "smollm3": _SMOLLM3, "olmo2": _OLMO2, "olmo3": _OLMO2, "granite": _GRANITE, "glm4": _GLM4,
    "exaone4": _EXAONE4, "cohere2": _COHERE2, "seed_oss": _SEED_OSS, "ernie4_5": _ERNIE4_5,
    "lfm2": _LFM2, "falcon_h1": _FALCON_H1, "qwen3_5_text": _QWEN35,
}
# families whose decoder blocks methods (AWQ) can walk, in table order
BLOCK_FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.name for s in MODEL_TYPES.values() if s.block))


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


def resolve_gguf(arch: str, has_experts: bool, source: object = None) -> tuple[str, str, ArchSpec]:
    """(HF architectures[0], model_type, spec) of a GGUF file's general.architecture: the first family of
    the table written as that arch (the llama arch with experts is Mixtral)."""
    for hf_arch, spec in ARCHITECTURES.items():
        if spec.name == arch and (spec.experts is not None) == has_experts and spec.hf_config is not None:
            model_type = next(m for m, s in MODEL_TYPES.items() if s is spec)
            return hf_arch, model_type, spec
    found = arch + (" with experts" if has_experts else "")
    supported = ", ".join(sorted({s.name for s in ARCHITECTURES.values() if s.hf_config is not None}))
    raise BadInput(f"GGUF architecture {found} cannot be converted back to HF (supported: {supported})",
                   source)
