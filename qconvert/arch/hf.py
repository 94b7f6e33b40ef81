"""The way back: a GGUF file's tensors as the HF checkpoint `convert --to gguf` would have made it from.

Every GGUF tensor gets its HF name (the table's family, its ``hf_modules`` over the llama-like defaults
below, each checked by mapping it forward again through gguf-py's name map, so a name here can never
disagree with what `convert --to gguf` writes) and the inverse of the forward transform (tensors.py:
``inverse_transform``, ``join_kv_b``, the expert stacks split back into per-expert Linears). Generated tensors
(rope factors) become config.json entries instead. The plan is built before anything is read: a tensor the
family cannot name is a BadInput before any output exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np

from qconvert.arch.hparams import GGUFKVs, llama3_rope_factors, plain_float
from qconvert.arch.table import ArchSpec
from qconvert.arch.tensors import (
    LM_HEAD,
    _hf_name,
    inverse_transform,
    is_depthwise_conv,
    join_interleaved,
    join_kv_b,
    name_map,
)
from qconvert.errors import BadInput

# GGUF block tensor stem -> HF module under model.layers.N (families override with ArchSpec.hf_modules)
HF_MODULES: dict[str, str] = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "exp_probs_b": "mlp.gate.e_score_correction",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_sinks": "self_attn.sinks",
}
TOP_MODULES: dict[str, str] = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                               "output": LM_HEAD, "token_embd_norm": "model.embedding_norm"}
# tensors the converter generates from config.json: read back into it, never written
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
ROPE_LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
ROPE_SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
GENERATED = (ROPE_FREQS, ROPE_LONG, ROPE_SHORT)
_EXPERT_STEMS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_BLOCK = re.compile(r"^blk\.(?P<bid>\d+)\.(?P<stem>(?:nextn\.|shortconv\.)?[^.]+)\.(?P<suffix>weight|bias)$")

Reader = Callable[[str], np.ndarray]  # gguf name -> float32 array in numpy order


@dataclass
class HFGroup:
    """HF tensors made from the same GGUF tensors in one read (an expert stack gives E Linears)."""

    sources: tuple[str, ...]                              # gguf names
    outputs: list[tuple[str, tuple[int, ...]]]            # HF name, shape
    read: Callable[[], list[np.ndarray]] = field(repr=False)


def hf_module(spec: ArchSpec, stem: str) -> str | None:
    return dict(spec.hf_modules).get(stem, HF_MODULES.get(stem))


def _forward(spec: ArchSpec, n_layer: int, hf: str) -> str | None:
    tmap = name_map(spec.arch, n_layer)
    return tmap.get_name(_hf_name(hf), try_suffixes=(".weight", ".bias"))


def hf_name(spec: ArchSpec, n_layer: int, name: str) -> str:
    """The HF name of a GGUF (non-expert) tensor; BadInput if the family has none or it maps elsewhere."""
    stem, _, suffix = name.rpartition(".")
    if stem in TOP_MODULES:
        hf = f"{TOP_MODULES[stem]}.{suffix}"
    elif (m := _BLOCK.match(name)) and (module := hf_module(spec, m["stem"])) is not None:
        hf = f"model.layers.{m['bid']}.{module}.{m['suffix']}"
    else:
        raise BadInput(f"GGUF tensor {name} has no HF name in the {spec.name} family")
    # the two parameters the converter renames (_hf_name): back to their HF spelling
    hf = hf.replace("e_score_correction.bias", "e_score_correction_bias")
    hf = hf.replace(".self_attn.sinks.weight", ".self_attn.sinks")
    if (back := _forward(spec, n_layer, hf)) != name:
        raise BadInput(f"GGUF tensor {name}: its {spec.name} HF name {hf} maps to {back}, not back to it")
    return hf


def _expert_outputs(spec: ArchSpec, n_layer: int, name: str, shape: tuple[int, ...]
                    ) -> list[tuple[str, tuple[int, ...]]]:
    ex = spec.experts
    m = _BLOCK.match(name)
    if ex is None or m is None or len(shape) != 3:
        raise BadInput(f"GGUF tensor {name} {list(shape)} is not a {spec.name} expert stack [E, rows, cols]")
    proj = {"ffn_gate_exps": ex.gate, "ffn_up_exps": ex.up, "ffn_down_exps": ex.down}[m["stem"]]
    pre = f"model.layers.{m['bid']}.{ex.module}"
    if _forward(spec, n_layer, f"{pre}.{proj}.weight") != name:
        raise BadInput(f"GGUF tensor {name}: {pre}.{proj} does not map back to it")
    return [(f"{pre}.{x}.{proj}.weight", shape[1:]) for x in range(shape[0])]


def plan_hf(spec: ArchSpec, cfg: dict, shapes: dict[str, tuple[int, ...]], read: Reader) -> list[HFGroup]:
    """Every HF tensor of the GGUF file, grouped by the GGUF tensors each read needs, in file order."""
    # the MTP layers a family keeps (glm4moe) are blocks too: blk.{>= num_hidden_layers}
    n_layer = int(cfg["num_hidden_layers"]) + (spec.mtp_layers(cfg) if spec.mtp_layers else 0)
    groups: list[HFGroup] = []
    for name, shape in shapes.items():
        if name in GENERATED or name.endswith(".attn_v_b.weight"):
            continue  # config.json entries; attn_v_b goes with attn_k_b
        stem = _BLOCK.match(name)["stem"] if _BLOCK.match(name) else ""
        if stem in _EXPERT_STEMS and spec.experts is not None and spec.experts.interleaved:
            if stem != "ffn_up_exps":  # up goes with gate
                groups.append(_interleaved_group(spec, name, shapes, read))
        elif stem in _EXPERT_STEMS:
            groups.append(HFGroup((name,), _expert_outputs(spec, n_layer, name, shape),
                                  lambda n=name: list(read(n))))
        elif stem == "attn_k_b":
            groups.append(_kv_b_group(spec, n_layer, name, shapes, read))
        else:
            hf = hf_name(spec, n_layer, name)
            fn = inverse_transform(spec, cfg, hf)
            if is_depthwise_conv(hf):  # back to nn.Conv1d's [channels, 1, kernel]
                shape = (shape[0], 1, shape[1])
            groups.append(HFGroup((name,), [(hf, shape)], _one(read, name, fn)))
    _check_unique(groups)
    return groups


def _one(read: Reader, name: str, fn: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[], list]:
    return lambda: [fn(read(name)) if fn is not None else read(name)]


def _interleaved_group(spec: ArchSpec, name: str, shapes: dict[str, tuple[int, ...]],
                       read: Reader) -> HFGroup:
    """gpt-oss: ffn_gate_exps + ffn_up_exps back to the fused x@W gate_up_proj [E, H, 2I] (interleaved),
    ffn_down_exps to down_proj [E, I, H]; their biases alike (``<proj>_bias``)."""
    assert spec.experts is not None
    m = _BLOCK.match(name)
    assert m is not None
    bias = m["suffix"] == "bias"
    pre = f"model.layers.{m['bid']}.{spec.experts.module}"
    shape = shapes[name]
    if m["stem"] == "ffn_down_exps":
        hf = f"{pre}.down_proj" + ("_bias" if bias else "")
        if bias:
            return HFGroup((name,), [(hf, shape)], lambda: [read(name)])
        return HFGroup((name,), [(hf, (shape[0], shape[2], shape[1]))],
                       lambda: [np.ascontiguousarray(read(name).transpose(0, 2, 1))])
    up = name.replace(".ffn_gate_exps.", ".ffn_up_exps.")
    if up not in shapes or shapes[up] != shape:
        raise BadInput(f"GGUF tensor {name} has no {up} of its shape: gate_up_proj cannot be rebuilt")
    hf = f"{pre}.gate_up_proj" + ("_bias" if bias else "")
    out_shape = (shape[0], 2 * shape[1]) if bias else (shape[0], shape[2], 2 * shape[1])
    return HFGroup((name, up), [(hf, out_shape)], lambda: [join_interleaved(read(name), read(up), bias)])


def _kv_b_group(spec: ArchSpec, n_layer: int, k_name: str, shapes: dict[str, tuple[int, ...]],
                read: Reader) -> HFGroup:
    v_name = k_name.replace(".attn_k_b.", ".attn_v_b.")
    if v_name not in shapes:
        raise BadInput(f"GGUF tensor {k_name} has no {v_name}: kv_b_proj cannot be rebuilt")
    (n, r, dn), (_, dv, _) = shapes[k_name], shapes[v_name]
    hf = f"model.layers.{k_name.split('.')[1]}.self_attn.kv_b_proj.weight"
    if _forward(spec, n_layer, hf) is None:
        raise BadInput(f"GGUF tensor {k_name}: the {spec.name} family has no kv_b_proj")
    return HFGroup((k_name, v_name), [(hf, (n * (dn + dv), r))],
                   lambda: [join_kv_b(read(k_name), read(v_name))])


def _check_unique(groups: list[HFGroup]) -> None:
    seen: set[str] = set()
    for g in groups:
        for hf, _ in g.outputs:
            if hf in seen:
                raise BadInput(f"two GGUF tensors map to {hf}")
            seen.add(hf)


# ---------------------------------------------------------------------------------------------------------
# config.json

def hf_config(spec: ArchSpec, hf_arch: str, model_type: str, kv: GGUFKVs,
              read: Reader) -> tuple[dict, list[str]]:
    """config.json from the KVs (the family's cfg_*), the token ids, the tie and the generated tensors
    read back; with the notes on what the file cannot tell."""
    assert spec.hf_config is not None  # resolve_gguf refused the others
    cfg = spec.hf_config(kv)
    notes: list[str] = []
    embd = kv.tensors.get("token_embd.weight")
    if embd is None:
        raise BadInput("GGUF file has no token_embd.weight")
    cfg.update(architectures=[hf_arch], model_type=model_type, vocab_size=int(embd[0]),
               tie_word_embeddings="output.weight" not in kv.tensors)
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = kv.raw(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            cfg[name] = int(value)
    if ROPE_LONG in kv.tensors:
        rp = cfg["rope_parameters"]
        rp.update(rope_type="longrope", long_factor=[plain_float(x) for x in read(ROPE_LONG)],
                  short_factor=[plain_float(x) for x in read(ROPE_SHORT)])
    if ROPE_FREQS in kv.tensors:
        notes += _llama3_rope(cfg, read(ROPE_FREQS))
    if spec.trim_vocab:
        notes.append("gemma3: token_embd holds the real vocabulary only (padding rows were cut by the GGUF)")
    return cfg, notes


# the Llama 3.x rope settings: (factor, low_freq_factor, high_freq_factor, original context)
_LLAMA3_ROPES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def _llama3_rope(cfg: dict, freqs: np.ndarray) -> list[str]:
    """rope_freqs back to llama3 rope parameters: the known settings whose factors equal the tensor."""
    rp = cfg["rope_parameters"]
    dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    for factor, low, high, ctx in _LLAMA3_ROPES:
        trial = {**rp, "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                 "original_max_position_embeddings": ctx}
        if np.array_equal(llama3_rope_factors(trial, dim), np.asarray(freqs, dtype=np.float32)):
            rp.update(trial, rope_type="llama3")
            return []
    return ["rope_freqs.weight matches no known llama3 rope setting: config.json has plain rope"]

