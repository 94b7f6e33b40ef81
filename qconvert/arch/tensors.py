"""Tensors: HF tensor names -> GGUF names (gguf-py's ``get_tensor_name_map``), the converter's transforms
(llama Q/K permutation, gemma norm +1, gemma3 vocabulary trim, dropped lm_head) and the tensor plan.

Nothing outside qconvert/arch names HF tensors: the other stages ask here (``gguf_tensor_name``,
``LM_HEAD``, ``writes_output_tensor``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from qconvert.arch.hparams import find, n_expert, n_layer
from qconvert.arch.shapes import expected_shape
from qconvert.arch.table import ArchSpec, Experts, resolve
from qconvert.errors import BadInput
from qconvert.load.config import text_config

Transform = Callable[[np.ndarray], np.ndarray]
# HF tensors convert_hf_to_gguf.py never writes
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
LM_HEAD = "lm_head"  # the output projection's module name in every supported family (lm_head.weight)
_LM_HEAD_WEIGHT = f"{LM_HEAD}.weight"
# the Linears the packed-format methods quantize: weights inside the decoder layers (every family nests them
# under ``…layers.<i>.``), minus these module prefixes: MoE routers and other modalities' towers
_DECODER_WEIGHT = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\..+)\.weight$")
NOT_QUANTIZED = (r"\.mlp\.gate$", r"\.block_sparse_moe\.gate$", r"\.shared_expert_gate$", r"\.router$",
                 r"(^|\.)(vision|visual|audio|multi_modal)")


# Linears that vLLM loads as one fused layer (QKVParallelLinear, MergedColumnParallelLinear, the MoE w13 of
# each expert, DeepSeek's fused q_a / kv_a): siblings under one parent module. Formats whose per-tensor
# scales must agree across a fused layer (NVFP4's global scale) group them by these (llm-compressor 0.14
# observers/helpers.py FUSED_LAYER_NAMES).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
                  ("q_a_proj", "kv_a_proj_with_mqa"))


def fused_groups(prefixes: Iterable[str]) -> list[tuple[str, ...]]:
    """The fused groups among module prefixes: every FUSED_SIBLINGS tuple whose members all exist under one
    parent (a parent with only some of them is not a fused layer), in the order of their first member."""
    ordered = list(dict.fromkeys(prefixes))
    present = set(ordered)
    groups = []
    for prefix in ordered:
        parent, _, leaf = prefix.rpartition(".")
        for names in FUSED_SIBLINGS:
            if leaf == names[0]:
                members = tuple(f"{parent}.{n}" if parent else n for n in names)
                if all(m in present for m in members):
                    groups.append(members)
    return groups


def linear_module(name: str) -> tuple[str, int | None] | None:
    """(module prefix, decoder layer) of a weight a quantize method may take: a decoder layer's, or lm_head's
    (layer None); None for every other tensor."""
    m = _DECODER_WEIGHT.match(name)
    if m:
        return m["prefix"], int(m["layer"])
    return (LM_HEAD, None) if name == _LM_HEAD_WEIGHT else None


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from and how to make it (read() returns float32, numpy order)."""

    name: str                       # gguf name
    shape: tuple[int, ...]          # numpy order, after the transform
    source: str | None              # HF tensor name (None for generated tensors)
    read: Callable[[], np.ndarray] = field(repr=False)
    dtype: str = "F32"              # source dtype name ("BF16", "F16", "F32", or a GGML type for GGUF input)
    # a tensor the checkpoint already holds as GGML blocks (gpt-oss's MXFP4 experts; dtype names the type):
    # those bytes, uint8 [rows, row bytes], copied as they are when the output keeps the type
    raw: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    # the family's own transform changed the values (Falcon-H1's folded multipliers): a quantized output
    # starts from them rounded to the source's 16-bit type, as llama-quantize starts from the converter's
    # BF16 / F16 file
    rescaled: bool = False

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml order: ne[0] is the row length."""
        return tuple(reversed(self.shape))


@functools.lru_cache(maxsize=8)
def name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    """gguf-py's name map (building one takes ~0.1 s, so once per architecture)."""
    return gguf.get_tensor_name_map(arch, n_blocks)


def n_blocks(spec: ArchSpec, cfg: dict) -> int:
    """The GGUF block count: the decoder layers, plus the MTP layers a family keeps (glm4moe)."""
    return n_layer(cfg) + (spec.mtp_layers(cfg) if spec.mtp_layers else 0)


def gguf_tensor_name(config: dict, hf_name: str) -> str | None:
    """GGUF tensor name that `convert --to gguf` writes for an HF tensor name (None if it has none)."""
    spec = resolve(config)
    tmap = name_map(spec.arch, n_blocks(spec, text_config(config)))
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def input_order(config: dict, hf_name: str) -> np.ndarray | None:
    """The HF input column of each column of the GGUF tensor, where the converter reorders them (None: in
    order)."""
    spec = resolve(config)
    return spec.input_order(text_config(config), hf_name) if spec.input_order else None


# besides 1-D tensors and norms, the converter writes these as F32 whatever --outtype says: the MoE routers
# and the depthwise convolutions
_F32_STEMS = tuple(gguf.TENSOR_NAMES[t].replace("{bid}", "") for t in
                   (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
                    gguf.MODEL_TENSOR.SSM_CONV1D, gguf.MODEL_TENSOR.SHORTCONV_CONV))
_BLOCK_PREFIX = re.compile(r"^blk\.\d+\.")


def written_as_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Whether convert_hf_to_gguf.py writes this GGUF tensor as F32 (its forced-type rules, base.py)."""
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return True
    return _BLOCK_PREFIX.sub("blk..", name.removesuffix(".weight")) in _F32_STEMS


def writes_output_tensor(config: dict, tensor_names: Iterable[str]) -> bool:
    """Whether `convert --to gguf` writes output.weight (an untied lm_head the family keeps)."""
    return _LM_HEAD_WEIGHT in tensor_names and not resolve(config).drop_lm_head


def check_shapes(ckpt: Any, spec: ArchSpec, cfg: dict) -> None:
    """Refuse the first checkpoint tensor whose shape disagrees with what config.json implies (naming both
    shapes and its file): every command reads weights through here or calib.model.materialise."""
    tmap = name_map(spec.arch, n_blocks(spec, cfg))
    for raw, info in ckpt.tensors.items():
        name = tmap.get_name(_hf_name(raw), try_suffixes=(".weight", ".bias"))
        want = expected_shape(spec, cfg, name) if name else None
        if want is not None and tuple(info.shape) != want:
            raise BadInput(f"tensor {raw} has shape {tuple(info.shape)}, config.json implies {want}",
                           getattr(info, "file", None) or ckpt.path)


def check_checkpoint_shapes(ckpt: Any) -> str | None:
    """check_shapes for a checkpoint whose family may be unknown (data-free quantize works on any): None
    when checked, else the one-line note of why the shapes could not be checked."""
    if not ckpt.config:
        return "no config.json: tensor shapes were not checked"
    try:
        spec = resolve(ckpt.config, ckpt.path)
    except BadInput:
        found = ", ".join(ckpt.config.get("architectures") or []) or ckpt.config.get("model_type") or "none"
        return f"architecture {found} is not in the table: tensor shapes were not checked"
    check_shapes(ckpt, spec, text_config(ckpt.config))
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores rotary halves split per head; llama.cpp (normal rope) wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lora_b_transform(spec: ArchSpec, cfg: dict, hf_name: str) -> Transform | None:
    """What _transform does to a Linear weight, as it acts on a LoRA adapter's B [out, r] (W = B @ A: a row
    permutation of W permutes B's rows and leaves A alone, as convert_lora_to_gguf.py's LoraTorchTensor
    does); BadInput for a weight whose forward transform is no row permutation (nothing else reaches a
    Linear of a dense family)."""
    if spec.mla and hf_name.endswith("kv_b_proj.weight"):
        raise BadInput(f"LoRA target {hf_name}: deepseek2 splits kv_b_proj into attn_k_b / attn_v_b, which "
                       "a LoRA adapter GGUF cannot express")
    if spec.drop_lm_head and hf_name == _LM_HEAD_WEIGHT:
        raise BadInput(f"LoRA target {hf_name}: {spec.name} writes no output.weight (tied to the embedding)")
    return _transform(spec, cfg, hf_name, None)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows: llama.cpp's interleaved rotary rows back to HF's split halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def is_shifted_norm(spec: ArchSpec, hf_name: str) -> bool:
    """Whether _transform adds spec.norm_shift to this tensor (gemma's (1 + w) RMSNorms)."""
    return (bool(spec.norm_shift) and hf_name.endswith("norm.weight")
            and not hf_name.endswith(spec.unshifted_norms))


def unshift_norm(x: np.ndarray, spec: ArchSpec) -> np.ndarray:
    """The inverse of the norm shift, in float32 as the shift was made."""
    return x - np.float32(spec.norm_shift)


def inverse_transform(spec: ArchSpec, cfg: dict, hf_name: str) -> Transform | None:
    """The inverse of _transform for one HF tensor (the vocabulary trim is not undone: the cut rows are
    gone); cfg is the rebuilt config.json."""
    steps: list[Transform] = []
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        steps.append(lambda x, n=int(cfg["num_attention_heads"]): unpermute_rows(x, n))
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        n_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        steps.append(lambda x, n=n_kv: unpermute_rows(x, n))
    if is_shifted_norm(spec, hf_name):
        steps.append(lambda x: unshift_norm(x, spec))
    if is_depthwise_conv(hf_name):
        steps.append(lambda x: x[:, None, :])
    if not steps:
        return None

    def apply(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return np.ascontiguousarray(x, dtype=np.float32)
    return apply


def _transform(spec: ArchSpec, cfg: dict, hf_name: str, n_vocab_real: int | None,
               new_shape: tuple[int, ...] | None = None) -> Transform | None:
    steps: list[Transform] = []
    if spec.weight_transform is not None and (fn := spec.weight_transform(cfg, hf_name)) is not None:
        steps.append(fn)
    if hf_name.endswith(".A_log"):  # Mamba2Model: the state decay as A = -exp(A_log)
        steps.append(_minus_exp)
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        n = int(cfg["num_attention_heads"])
        steps.append(lambda x, n=n: permute_rows(x, n))
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        n = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        steps.append(lambda x, n=n: permute_rows(x, n))
    if spec.trim_vocab and n_vocab_real is not None and hf_name.endswith("embed_tokens.weight"):
        steps.append(lambda x, n=n_vocab_real: x[:n])
    if is_shifted_norm(spec, hf_name):
        steps.append(lambda x, s=spec.norm_shift: x + np.float32(s))  # in float32, as the converter does
    if new_shape is not None:
        steps.append(lambda x, shape=new_shape: x.reshape(shape))
    if not steps:
        return None

    def apply(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return np.ascontiguousarray(x, dtype=np.float32)
    return apply


# depthwise convolutions (LFM2's short conv, Mamba's conv1d) are nn.Conv1d weights [channels, 1, kernel];
# llama.cpp's ssm_conv op takes them 2-D, so the converter squeezes the middle axis
_DEPTHWISE_CONV = ("conv.conv.weight", "conv1d.weight")


def is_depthwise_conv(hf_name: str) -> bool:
    return hf_name.endswith(_DEPTHWISE_CONV)


def _minus_exp(x: np.ndarray) -> np.ndarray:
    # torch's float32 exp, as the converter computes it (numpy's differs in the last bit for some inputs)
    import torch

    return -torch.exp(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _reshaped(spec: ArchSpec, cfg: dict, raw: str, hf: str, name: str, shape: tuple[int, ...],
              ckpt: Any) -> tuple[int, ...] | None:
    """The shape llama.cpp's ops want where the converter reshapes (None: as stored). Depthwise convs are
    squeezed to [channels, kernel]; Mamba-2's A and D become [n_head, 1] (Mamba2Model, Mamba-1's layout);
    its grouped norm [n_group, d_inner / n_group]."""
    if is_depthwise_conv(hf):
        if len(shape) != 3 or shape[1] != 1:
            raise BadInput(f"{raw} has shape {list(shape)}, expected a depthwise convolution "
                           f"[channels, 1, kernel]", ckpt.path)
        return (shape[0], shape[2])
    if not spec.mamba2:
        return None
    if _BLOCK_PREFIX.sub("", name) in ("ssm_a", "ssm_d"):
        return (*shape, 1)
    if name.endswith(".ssm_norm.weight"):
        n_group = int(find(cfg, ["n_groups", "mamba_n_groups"], 1))
        return (n_group, shape[0] // n_group)
    return None


def _hf_name(name: str) -> str:
    # SmolVLM-style text towers are stored under text_model.
    name = name.replace("text_model.", "") if "text_model." in name else name
    # GptOssModel.filter_tensors: the attention sinks are a parameter of their own (attn_sinks.weight)
    if name.endswith(".self_attn.sinks"):
        return name + ".weight"
    # Mamba2Model.filter_tensors: the time-step bias is dt_proj's
    if name.endswith(".dt_bias"):
        return name.removesuffix(".dt_bias") + ".dt_proj.bias"
    # ModelBase.filter_tensors: DeepSeek/GLM's router correction bias is a .bias of its own module
    return name.replace("e_score_correction_bias", "e_score_correction.bias")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _skipped(spec: ArchSpec, cfg: dict, hf: str) -> bool:
    """Tensors the family's converter drops: deepseek2's MTP layers and tied lm_head."""
    if not spec.mla:
        return False
    if hf == _LM_HEAD_WEIGHT and cfg.get("tie_word_embeddings"):
        return True
    m = _LAYER.search(hf)
    return m is not None and int(m[1]) >= n_layer(cfg)


def _split_kv_b(ckpt: Any, spec: ArchSpec, cfg: dict, tmap: gguf.TensorNameMap, raw: str,
                hf: str) -> list[PlannedTensor]:
    """MLA kv_b_proj [n_head*(dn+dv), r] -> attn_k_b [n_head, r, dn] (transposed) and attn_v_b
    [n_head, dv, r], as DeepseekV2Model splits it for the absorption optimisation."""
    info = ckpt.tensors[raw]
    n, dn, dv = int(cfg["num_key_value_heads"]), int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    if len(info.shape) != 2 or info.shape[0] != n * (dn + dv):
        raise BadInput(f"{raw} has shape {list(info.shape)}, expected [{n * (dn + dv)}, kv_lora_rank] "
                       f"(num_key_value_heads * (qk_nope_head_dim + v_head_dim))", ckpt.path)
    r = int(info.shape[1])
    dtype = str(info.dtype).upper()

    def heads() -> np.ndarray:
        return np.asarray(ckpt.read_numpy(raw), dtype=np.float32).reshape(n, dn + dv, r)

    names = [tmap.get_name(hf.replace("kv_b_proj", part), try_suffixes=(".weight",)) for part in ("k_b_proj",
                                                                                                    "v_b_proj")]
    if None in names:
        raise BadInput(f"cannot map tensor {raw!r} to {spec.name} attn_k_b / attn_v_b", ckpt.path)
    return [PlannedTensor(str(names[0]), (n, r, dn), raw,
                          lambda: np.ascontiguousarray(heads()[:, :dn, :].transpose(0, 2, 1)), dtype),
            PlannedTensor(str(names[1]), (n, dv, r), raw,
                          lambda: np.ascontiguousarray(heads()[:, dn:, :]), dtype)]


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of _split_kv_b: attn_k_b [n_head, r, dn] and attn_v_b [n_head, dv, r] back to kv_b_proj
    [n_head*(dn+dv), r]."""
    heads = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return np.ascontiguousarray(heads.reshape(-1, heads.shape[-1]))


def plan_tensors(ckpt: Any, spec: ArchSpec, cfg: dict,
                 n_vocab_real: int | None = None) -> list[PlannedTensor]:
    """Every GGUF tensor of the checkpoint, with its reader. Unknown names → BadInput (like the converter)."""
    if spec.check is not None:
        try:
            spec.check(cfg, spec.name)
        except BadInput as e:
            raise BadInput(str(e), ckpt.path) from None
    check_shapes(ckpt, spec, cfg)
    tmap = name_map(spec.arch, n_blocks(spec, cfg))
    planned = [PlannedTensor(name, data.shape, None, lambda f=data: f)
               for name, data in (spec.extra_tensors(cfg) if spec.extra_tensors else [])]
    stacked, consumed = plan_experts(ckpt, spec, cfg, tmap) if spec.experts else ([], set())
    planned += stacked
    for raw in ckpt.tensors:
        if raw in consumed:
            continue
        hf = _hf_name(raw)
        if hf.endswith(_SKIPPED_SUFFIXES) or (spec.drop_lm_head and hf == _LM_HEAD_WEIGHT) or \
                hf.startswith(spec.drop_prefixes) or _skipped(spec, cfg, hf):
            continue
        if spec.mla and hf.endswith("self_attn.kv_b_proj.weight"):
            planned += _split_kv_b(ckpt, spec, cfg, tmap, raw, hf)
            continue
        if spec.zero_biases and hf.endswith(".bias"):
            _check_zero_bias(ckpt, spec, raw)
            continue
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInput(f"cannot map tensor {raw!r} to a {spec.name} GGUF tensor", ckpt.path)
        info = ckpt.tensors[raw]
        shape = tuple(info.shape)
        if spec.trim_vocab and n_vocab_real is not None and hf.endswith("embed_tokens.weight"):
            shape = (min(n_vocab_real, shape[0]), *shape[1:])
        new_shape = _reshaped(spec, cfg, raw, hf, name, shape, ckpt)
        fn = _transform(spec, cfg, hf, n_vocab_real, new_shape)
        shape = new_shape or shape
        rescaled = spec.weight_transform is not None and spec.weight_transform(cfg, hf) is not None
        planned.append(PlannedTensor(name, shape, raw, _reader(ckpt, raw, fn), str(info.dtype).upper(),
                                     rescaled=rescaled))
    _check_unique(planned, ckpt)
    _check_layer_tensors(planned, spec, cfg, ckpt)
    return planned


def _check_layer_tensors(planned: list[PlannedTensor], spec: ArchSpec, cfg: dict, ckpt: Any) -> None:
    """Hybrid families: every layer has the tensors of its layer_types entry (a checkpoint missing one
    layer's linear-attention or convolution weights would otherwise convert to a file llama.cpp refuses)."""
    if spec.layer_tensors is None:
        return
    names = {p.name for p in planned}
    kinds = cfg.get("layer_types") or ["*"] * n_layer(cfg)
    for i, kind in enumerate(kinds):
        for tensor in spec.layer_tensors.get(kind, ()):
            if f"blk.{i}.{tensor}" not in names:
                what = "" if kind == "*" else f" ({kind})"
                raise BadInput(f"{spec.name} layer {i}{what} has no blk.{i}.{tensor}: the checkpoint lacks "
                               f"that tensor of model.layers.{i}", ckpt.path)


def _check_zero_bias(ckpt: Any, spec: ArchSpec, raw: str) -> None:
    """A bias the family's converter drops (its llama.cpp graph has none): only all-zero ones, as the
    converter checks (it raises on any other)."""
    if np.any(np.asarray(ckpt.read_numpy(raw), dtype=np.float32) != 0):
        raise BadInput(f"bias tensor {raw} is not zero: llama.cpp's {spec.name} has no biases", ckpt.path)


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


# ---------------------------------------------------------------------------------------------------------
# MoE: per-expert Linears (or transformers 5's fused parameters) -> one 3-D stack per layer and projection

def _expert_patterns(ex: Experts) -> tuple[re.Pattern[str], re.Pattern[str]]:
    layer = r"^(?P<pre>(?:.*\.)?layers\.(?P<bid>\d+)\." + re.escape(ex.module) + ")"
    per_expert = re.compile(layer + r"\.(?P<x>\d+)\.(?P<proj>[^.]+)\.weight$")
    fused = re.compile(layer + r"\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")
    return per_expert, fused


def plan_experts(ckpt: Any, spec: ArchSpec, cfg: dict,
                 tmap: gguf.TensorNameMap) -> tuple[list[PlannedTensor], set[str]]:
    """The stacked expert tensors [E, rows, cols] (expert e = slice e, as the converter stacks them) and the
    checkpoint names they consume. A missing expert, experts of different shapes or a fused tensor of the
    wrong shape is a BadInput before anything is read."""
    ex = spec.experts
    assert ex is not None
    n = n_expert(cfg)
    if not n:
        raise BadInput(f"{spec.name}: config.json names no expert count (num_experts / num_local_experts)",
                       ckpt.path)
    if ex.interleaved:
        return plan_interleaved_experts(ckpt, spec, cfg, tmap, n)
    per_expert, fused = _expert_patterns(ex)
    groups: dict[tuple[str, str], dict[int, str]] = {}
    planned: list[PlannedTensor] = []
    consumed: set[str] = set()
    for raw in ckpt.tensors:
        hf = _hf_name(raw)
        if _skipped(spec, cfg, hf):
            consumed.add(raw)
            continue
        if (m := per_expert.match(hf)) is not None:
            groups.setdefault((m["pre"], m["proj"]), {})[int(m["x"])] = raw
            consumed.add(raw)
        elif ex.fused and (m := fused.match(hf)) is not None:
            planned += _fused(ckpt, spec, cfg, tmap, raw, m["pre"], m["proj"], n)
            consumed.add(raw)
    for (pre, proj), members in sorted(groups.items()):
        planned.append(_stack(ckpt, spec, tmap, pre, proj, members, n))
    _check_expert_shapes(planned, ckpt)
    return planned, consumed


def _merged_name(spec: ArchSpec, tmap: gguf.TensorNameMap, hf_merged: str, ckpt: Any) -> str:
    name = tmap.get_name(hf_merged, try_suffixes=(".weight",))
    if name is None:
        raise BadInput(f"cannot map expert tensor {hf_merged!r} to a {spec.name} GGUF tensor", ckpt.path)
    return name


def _stack(ckpt: Any, spec: ArchSpec, tmap: gguf.TensorNameMap, pre: str, proj: str,
           members: dict[int, str], n: int) -> PlannedTensor:
    ex = spec.experts
    assert ex is not None
    if proj not in (ex.gate, ex.up, ex.down):
        raise BadInput(f"cannot map expert tensor {members[min(members)]!r} to a {spec.name} GGUF tensor "
                       f"(expected {ex.gate}, {ex.up} or {ex.down})", ckpt.path)
    if (extra := sorted(x for x in members if x >= n)):
        raise BadInput(f"{pre}.{extra[0]}.{proj}.weight: expert {extra[0]} is outside the {n} experts "
                       "config.json names", ckpt.path)
    if (missing := [x for x in range(n) if x not in members]):
        raise BadInput(f"{pre}.{missing[0]}.{proj}.weight is missing ({len(missing)} of the {n} experts' "
                       f"{proj} are absent from the checkpoint)", ckpt.path)
    raws = [members[x] for x in range(n)]
    info0 = ckpt.tensors[raws[0]]
    for raw in raws[1:]:
        info = ckpt.tensors[raw]
        if tuple(info.shape) != tuple(info0.shape) or info.dtype != info0.dtype:
            raise BadInput(f"{raw} is {info.dtype} {list(info.shape)} but {raws[0]} is {info0.dtype} "
                           f"{list(info0.shape)}: the experts of a layer must agree", ckpt.path)
    if len(info0.shape) != 2:
        raise BadInput(f"{raws[0]} has shape {list(info0.shape)}, expected a 2-D Linear weight", ckpt.path)

    def read() -> np.ndarray:
        # one projection of one layer at a time: E slices read into one float32 stack
        out = np.empty((n, *info0.shape), dtype=np.float32)
        for x, raw in enumerate(raws):
            out[x] = ckpt.read_numpy(raw)
        return out

    name = _merged_name(spec, tmap, f"{pre}.{proj}.weight", ckpt)
    return PlannedTensor(name, (n, *info0.shape), raws[-1], read, str(info0.dtype).upper())


def _fused(ckpt: Any, spec: ArchSpec, cfg: dict, tmap: gguf.TensorNameMap, raw: str, pre: str, proj: str,
           n: int) -> list[PlannedTensor]:
    ex = spec.experts
    assert ex is not None
    info = ckpt.tensors[raw]
    shape = tuple(info.shape)
    hidden = cfg.get("hidden_size")
    rows_ok = len(shape) == 3 and shape[0] == n and (hidden is None or shape[1 if proj == "down_proj" else 2]
                                                        == hidden)
    if not rows_ok or (proj == "gate_up_proj" and shape[1] % 2):
        want = "[E, H, I]" if proj == "down_proj" else "[E, 2*I, H]"
        raise BadInput(f"fused expert tensor {raw} has shape {list(shape)}, expected {want} with E={n}"
                       + (f", H={hidden}" if hidden is not None else ""), ckpt.path)
    dtype = str(info.dtype).upper()

    def part(lo: int, hi: int) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(np.asarray(ckpt.read_numpy(raw), dtype=np.float32)[:, lo:hi])

    if proj == "down_proj":
        name = _merged_name(spec, tmap, f"{pre}.{ex.down}.weight", ckpt)
        return [PlannedTensor(name, shape, raw, part(0, shape[1]), dtype)]
    i = shape[1] // 2  # gate = the first I rows, up = the last I (Qwen2MoeModel's split)
    return [PlannedTensor(_merged_name(spec, tmap, f"{pre}.{ex.gate}.weight", ckpt), (n, i, shape[2]), raw,
                          part(0, i), dtype),
            PlannedTensor(_merged_name(spec, tmap, f"{pre}.{ex.up}.weight", ckpt), (n, i, shape[2]), raw,
                          part(i, 2 * i), dtype)]


def _check_expert_shapes(planned: list[PlannedTensor], ckpt: Any) -> None:
    """gate and up [E, I, H] and down [E, H, I] of a layer must fit together (llama.cpp's loader needs it)."""
    by_name = {t.name: t for t in planned}
    for t in planned:
        if not t.name.endswith("ffn_down_exps.weight"):
            continue
        for other in ("ffn_gate_exps", "ffn_up_exps"):
            o = by_name.get(t.name.replace("ffn_down_exps", other))
            if o is not None and o.shape != (t.shape[0], t.shape[2], t.shape[1]):
                raise BadInput(f"{o.source} gives {other} {list(o.shape)} but {t.source} gives ffn_down_exps "
                               f"{list(t.shape)}: expected [E, I, H] against [E, H, I]", ckpt.path)


# ---------------------------------------------------------------------------------------------------------
# gpt-oss: fused x@W experts with gate/up interleaved, their biases, or MXFP4 blocks (GptOssModel)

_PARTS = ("", "_bias", "_blocks", "_scales")


def _interleaved_pattern(ex: Experts) -> re.Pattern[str]:
    return re.compile(r"^(?P<pre>(?:.*\.)?layers\.\d+\." + re.escape(ex.module) +
                      r")\.(?P<proj>gate_up_proj|down_proj)(?P<part>_bias|_blocks|_scales)?$")


def plan_interleaved_experts(ckpt: Any, spec: ArchSpec, cfg: dict, tmap: gguf.TensorNameMap,
                             n: int) -> tuple[list[PlannedTensor], set[str]]:
    """gpt-oss's experts as GptOssModel writes them: gate_up_proj [E, H, 2I] transposed and split into the
    even (gate) and odd (up) rows, down_proj [E, I, H] transposed, the biases split alike; MXFP4 blocks and
    scales repacked into ggml MXFP4 tensors without touching a value. Checked before anything is read."""
    pattern = _interleaved_pattern(spec.experts)  # type: ignore[arg-type]
    layers: dict[str, dict[tuple[str, str], str]] = {}
    for raw in ckpt.tensors:
        if (m := pattern.match(_hf_name(raw))) is not None:
            layers.setdefault(m["pre"], {})[(m["proj"], m["part"] or "")] = raw
    planned: list[PlannedTensor] = []
    for pre, parts in layers.items():
        for proj in ("gate_up_proj", "down_proj"):
            planned += _interleaved(ckpt, spec, cfg, tmap, pre, proj, parts, n)
    _check_expert_shapes(planned, ckpt)
    return planned, {raw for parts in layers.values() for raw in parts.values()}


def _gguf_name(spec: ArchSpec, tmap: gguf.TensorNameMap, pre: str, proj: str, part: str, ckpt: Any) -> str:
    ex = spec.experts
    assert ex is not None
    hf_proj = {"gate": ex.gate, "up": ex.up, "down": ex.down}[proj]
    name = tmap.get_name(f"{pre}.{hf_proj}.{part}", try_suffixes=(".weight", ".bias"))
    if name is None:
        raise BadInput(f"cannot map expert tensor {pre}.{hf_proj}.{part} to a {spec.name} GGUF tensor",
                       ckpt.path)
    return name


def _interleaved(ckpt: Any, spec: ArchSpec, cfg: dict, tmap: gguf.TensorNameMap, pre: str, proj: str,
                 parts: dict[tuple[str, str], str], n: int) -> list[PlannedTensor]:
    have = {part: parts[(proj, part)] for part in _PARTS if (proj, part) in parts}
    where = f"{pre}.{proj}"
    if "" in have and ("_blocks" in have or "_scales" in have):
        raise BadInput(f"{where} is there both as a tensor and as MXFP4 blocks/scales", ckpt.path)
    if ("_blocks" in have) != ("_scales" in have):
        missing = "_scales" if "_blocks" in have else "_blocks"
        raise BadInput(f"{where}{missing} is missing (MXFP4 experts need both _blocks and _scales)",
                       ckpt.path)
    if "" not in have and "_blocks" not in have:
        raise BadInput(f"{where} is missing (neither the tensor nor its MXFP4 _blocks/_scales)", ckpt.path)
    hidden = int(cfg["hidden_size"])
    out = _mxfp4_experts(ckpt, spec, tmap, pre, proj, have, n, hidden) if "_blocks" in have else \
        _dense_experts(ckpt, spec, tmap, pre, proj, have[""], n, hidden)
    if "_bias" in have:
        out += _expert_biases(ckpt, spec, tmap, pre, proj, have["_bias"], n, hidden)
    return out


def join_interleaved(gate: np.ndarray, up: np.ndarray, bias: bool) -> np.ndarray:
    """The inverse of _dense_experts / _expert_biases for gate_up_proj: gate [E, I, H] and up back into
    [E, H, 2I] (gate the even columns, up the odd), or biases [E, I] into [E, 2I]."""
    if bias:
        out = np.empty((gate.shape[0], 2 * gate.shape[1]), dtype=np.float32)
        out[:, 0::2], out[:, 1::2] = gate, up
        return out
    rows = np.empty((gate.shape[0], 2 * gate.shape[1], gate.shape[2]), dtype=np.float32)
    rows[:, 0::2], rows[:, 1::2] = gate, up
    return np.ascontiguousarray(rows.transpose(0, 2, 1))


def _halves(proj: str) -> list[tuple[str, slice]]:
    """The GGUF projections a fused gpt-oss tensor holds, with their rows: gate even, up odd."""
    return [("down", slice(None))] if proj == "down_proj" else [("gate", slice(0, None, 2)),
                                                                ("up", slice(1, None, 2))]


def _dense_experts(ckpt: Any, spec: ArchSpec, tmap: gguf.TensorNameMap, pre: str, proj: str, raw: str, n: int,
                   hidden: int) -> list[PlannedTensor]:
    info = ckpt.tensors[raw]
    shape = tuple(info.shape)
    gate_up = proj == "gate_up_proj"
    ok = len(shape) == 3 and shape[0] == n and shape[1 if gate_up else 2] == hidden and \
        (not gate_up or shape[2] % 2 == 0)
    if not ok:
        want = "[E, H, 2*I]" if gate_up else "[E, I, H]"
        raise BadInput(f"fused expert tensor {raw} has shape {list(shape)}, expected {want} with E={n}, "
                       f"H={hidden}", ckpt.path)
    rows = shape[2] // 2 if gate_up else shape[2]  # [out, in] after the transpose

    def part(sel: slice) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(
            np.asarray(ckpt.read_numpy(raw), dtype=np.float32).transpose(0, 2, 1)[:, sel, :])

    return [PlannedTensor(_gguf_name(spec, tmap, pre, p, "weight", ckpt), (n, rows, shape[1]), raw, part(sel),
                          str(info.dtype).upper()) for p, sel in _halves(proj)]


def _expert_biases(ckpt: Any, spec: ArchSpec, tmap: gguf.TensorNameMap, pre: str, proj: str, raw: str, n: int,
                   hidden: int) -> list[PlannedTensor]:
    info = ckpt.tensors[raw]
    shape = tuple(info.shape)
    gate_up = proj == "gate_up_proj"
    if len(shape) != 2 or shape[0] != n or (shape[1] % 2 if gate_up else shape[1] != hidden):
        want = "[E, 2*I]" if gate_up else "[E, H]"
        raise BadInput(f"expert bias {raw} has shape {list(shape)}, expected {want} with E={n}, H={hidden}",
                       ckpt.path)
    width = shape[1] // 2 if gate_up else shape[1]

    def part(sel: slice) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(np.asarray(ckpt.read_numpy(raw), dtype=np.float32)[:, sel])

    return [PlannedTensor(_gguf_name(spec, tmap, pre, p, "bias", ckpt), (n, width), raw, part(sel),
                          str(info.dtype).upper()) for p, sel in _halves(proj)]


def _mxfp4_experts(ckpt: Any, spec: ArchSpec, tmap: gguf.TensorNameMap, pre: str, proj: str,
                   have: dict[str, str], n: int, hidden: int) -> list[PlannedTensor]:
    """MXFP4 ``_blocks`` uint8 [E, out, in/32, 16] and ``_scales`` uint8 [E, out, in/32] ([out, in]
    orientation, gate/up rows interleaved) -> ggml MXFP4 [E, rows, in] per projection."""
    from qconvert.kernels.ggml.fp4_blocks import from_hf_mxfp4
    from qconvert.kernels.registry import dequantize

    braw, sraw = have["_blocks"], have["_scales"]
    b, s = ckpt.tensors[braw], ckpt.tensors[sraw]
    bshape, sshape = tuple(b.shape), tuple(s.shape)
    gate_up = proj == "gate_up_proj"
    for raw, info in ((braw, b), (sraw, s)):
        if str(info.dtype).upper() != "U8":
            raise BadInput(f"MXFP4 tensor {raw} is {info.dtype}, expected U8", ckpt.path)
    ok = len(bshape) == 4 and bshape[-1] == 16 and bshape[0] == n and bshape[:3] == sshape and \
        (bshape[2] * 32 == hidden if gate_up else bshape[1] == hidden) and (not gate_up or bshape[1] % 2 == 0)
    if not ok:
        want = "[E, 2*I, H/32, 16]" if gate_up else "[E, H, I/32, 16]"
        raise BadInput(f"MXFP4 experts {braw} {list(bshape)} / {sraw} {list(sshape)}: expected blocks {want} "
                       f"and scales of the blocks' first three dimensions, with E={n}, H={hidden}", ckpt.path)
    cols = bshape[2] * 32

    def raw_part(sel: slice) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            q = from_hf_mxfp4(np.asarray(ckpt.read_numpy(braw))[:, sel],
                              np.asarray(ckpt.read_numpy(sraw))[:, sel])
            return q.reshape(-1, q.shape[-2] * 17)
        return read

    def values(raw: Callable[[], np.ndarray], shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        # exact in float32 (E2M1 x 2^k): what llama-quantize dequantizes before requantizing
        return lambda: dequantize(raw(), gguf.GGMLQuantizationType.MXFP4).reshape(shape)

    out = []
    shape = (n, bshape[1] // 2 if gate_up else bshape[1], cols)
    for p, sel in _halves(proj):
        raw = raw_part(sel)
        name = _gguf_name(spec, tmap, pre, p, "weight", ckpt)
        out.append(PlannedTensor(name, shape, braw, values(raw, shape), "MXFP4", raw))
    return out


def expert_slot(config: dict, hf_module: str) -> tuple[str, int, int] | None:
    """(GGUF name of the stacked tensor, expert index, expert count) of one per-expert Linear module, e.g.
    model.layers.1.mlp.experts.3.down_proj -> ("blk.1.ffn_down_exps.weight", 3, 8); None for any other."""
    spec = resolve(config)
    if spec.experts is None:
        return None
    per_expert, _ = _expert_patterns(spec.experts)
    m = per_expert.match(_hf_name(f"{hf_module}.weight"))
    if m is None:
        return None
    cfg = text_config(config)
    merged = f"{m['pre']}.{m['proj']}.weight"
    name = name_map(spec.arch, n_blocks(spec, cfg)).get_name(merged, try_suffixes=(".weight",))
    if name is None:
        raise BadInput(f"cannot map expert Linear {hf_module!r} to a {spec.name} GGUF tensor")
    return name, int(m["x"]), int(n_expert(cfg) or 0)
