"""llama.cpp's per-tensor type choice for a GGUF file type (`src/llama-quant.cpp`, llama-cpp-python 0.3.36).

`choose_types` reproduces what `llama_model_quantize` decides for every tensor: whether it is quantized at
all, the mixture rule of the file type (Q4_K_M gives attn_v/ffn_down more bits on some layers, ...), the
user's overrides and the fallback when a row length does not fit the block. See reference/gguf.md §3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from qconvert.arch.facts import ModelFacts
from qconvert.errors import BadInput, IOFailure
from qconvert.kernels import BLOCK_TYPES, FLOAT_TYPES

T = GGMLQuantizationType
FT = LlamaFileType


@dataclass(frozen=True)
class FileType:
    """A llama-quantize TYPE: its canonical name, the `general.file_type` id and the default tensor type."""

    name: str
    ftype: LlamaFileType
    default: GGMLQuantizationType


_FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", FT.ALL_F32, T.F32),
        FileType("F16", FT.MOSTLY_F16, T.F16),
        FileType("BF16", FT.MOSTLY_BF16, T.BF16),
        FileType("Q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
        FileType("Q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
        FileType("Q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
        FileType("Q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
        FileType("Q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
        FileType("Q2_K", FT.MOSTLY_Q2_K, T.Q2_K),
        FileType("Q2_K_S", FT.MOSTLY_Q2_K_S, T.Q2_K),
        FileType("Q3_K_S", FT.MOSTLY_Q3_K_S, T.Q3_K),
        FileType("Q3_K_M", FT.MOSTLY_Q3_K_M, T.Q3_K),
        FileType("Q3_K_L", FT.MOSTLY_Q3_K_L, T.Q3_K),
        FileType("Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
        FileType("Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
        FileType("Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
        FileType("Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
        FileType("Q6_K", FT.MOSTLY_Q6_K, T.Q6_K),
        FileType("IQ4_NL", FT.MOSTLY_IQ4_NL, T.IQ4_NL),
        FileType("IQ4_XS", FT.MOSTLY_IQ4_XS, T.IQ4_XS),
        FileType("IQ3_XXS", FT.MOSTLY_IQ3_XXS, T.IQ3_XXS),
        FileType("IQ3_XS", FT.MOSTLY_IQ3_XS, T.IQ3_S),
        FileType("IQ3_S", FT.MOSTLY_IQ3_S, T.IQ3_S),
        FileType("IQ3_M", FT.MOSTLY_IQ3_M, T.IQ3_S),
        FileType("IQ2_XXS", FT.MOSTLY_IQ2_XXS, T.IQ2_XXS),
        FileType("IQ2_XS", FT.MOSTLY_IQ2_XS, T.IQ2_XS),
        FileType("IQ2_S", FT.MOSTLY_IQ2_S, T.IQ2_XS),  # sic: llama_ftype_get_default_type
        FileType("IQ2_M", FT.MOSTLY_IQ2_M, T.IQ2_S),
        FileType("IQ1_S", FT.MOSTLY_IQ1_S, T.IQ1_S),
        FileType("IQ1_M", FT.MOSTLY_IQ1_M, T.IQ1_M),
        FileType("TQ1_0", FT.MOSTLY_TQ1_0, T.TQ1_0),
        FileType("TQ2_0", FT.MOSTLY_TQ2_0, T.TQ2_0),
        FileType("MXFP4_MOE", FT.MOSTLY_MXFP4_MOE, T.MXFP4),
        FileType("Q1_0", FT.MOSTLY_Q1_0, T.Q1_0),
        FileType("Q2_0", FT.MOSTLY_Q2_0, T.Q2_0),
        # no NVFP4: llama_ftype_get_default_type has no case for LLAMA_FTYPE_MOSTLY_NVFP4 (39), so
        # llama_model_quantize throws "invalid output file type 39" and llama-quantize does not list it
    )
}
# llama-quantize's QUANT_OPTIONS aliases
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

FILE_TYPE_NAMES: tuple[str, ...] = tuple(_FILE_TYPES)

# types llama.cpp refuses to write without an imatrix (§3.5)
_ALWAYS_NEED_IMATRIX = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)


def parse_file_type(name: str) -> FileType:
    """llama-quantize's TYPE argument: a name (case-insensitive, Q3_K/Q4_K/Q5_K = _M) or a numeric ftype."""
    key = str(name).strip().upper()
    key = _ALIASES.get(key, key)
    if key in _FILE_TYPES:
        return _FILE_TYPES[key]
    if key.isdigit():
        for ft in _FILE_TYPES.values():
            if ft.ftype == int(key):
                return ft
    raise BadInput(f"unknown GGUF file type {name!r}; valid: {', '.join(FILE_TYPE_NAMES + tuple(_ALIASES))}")


def parse_tensor_type(name: str) -> GGMLQuantizationType:
    """A ggml type name as llama-quantize's parse_ggml_type reads it (q8_0, Q6_K, f16, bf16, iq4_xs...)."""
    key = str(name).strip().upper()
    for t in BLOCK_TYPES:  # the tensor types our kernels can write
        if t.name == key:
            return t
    raise BadInput(f"unknown tensor type {name!r}; valid: {', '.join(t.name.lower() for t in BLOCK_TYPES)}")


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def is_quantized(t: GGMLQuantizationType) -> bool:
    """ggml_is_quantized: every type but the float ones (and the integer ones we never meet)."""
    return t not in FLOAT_TYPES


@dataclass
class MixtureOptions:
    """What llama_model_quantize_params says about type choice (llama-quantize's CLI options)."""

    file_type: FileType
    has_imatrix: bool = False
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: GGMLQuantizationType | None = None
    token_embedding_type: GGMLQuantizationType | None = None
    # (regex, type): the first `re.search` match wins; patterns are used as given
    # (llama-quantize's CLI lower-cases them, the library does not)
    tensor_types: list[tuple[str, GGMLQuantizationType]] = field(default_factory=list)


@dataclass(frozen=True)
class TensorChoice:
    name: str
    qtype: GGMLQuantizationType
    quantized: bool  # False: copied unchanged (1-D, norms, router...), qtype is then the source type
    fallback: bool  # the rule's type did not fit ne0 and was replaced (§3.3)
    reason: str


# ---- names, order, categories ------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"blk\.\s*([+-]?\d+)")


def _layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &i): the number after a leading "blk.", if any."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def llama_order(names: Iterable[str]) -> list[str]:
    """weights_map order: non-block tensors (layer -1) first, then by block number, then by name (bytes)."""

    def key(n: str) -> tuple[int, bytes]:
        layer = _layer_of(n)
        return (-1 if layer is None else layer, n.encode())

    return sorted(set(names), key=key)


OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "OUTPUT",
    "TOKEN_EMBD",
    "ATTN_QKV",
    "ATTN_KV_B",
    "ATTN_V",
    "ATTN_K",
    "ATTN_Q",
    "ATTN_OUTPUT",
)
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "FFN_UP", "FFN_GATE", "FFN_DOWN", "OTHER"

# substring -> category, checked in this order (tensor_get_category)
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", ATTN_QKV),
    ("attn_kv_b.weight", ATTN_KV_B),
    ("attn_v.weight", ATTN_V),
    ("attn_k.weight", ATTN_K),
    ("attn_q.weight", ATTN_Q),
    ("attn_output.weight", ATTN_OUTPUT),
    ("ffn_up", FFN_UP),
    ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)
_ATTN_V_LIKE = (ATTN_V, ATTN_QKV, ATTN_KV_B)  # category_is_attn_v: the ATTN_QKV branch itself is unreachable


def category(name: str) -> str:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return OTHER


def _n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


# substrings that keep a tensor unquantized (tensor_allows_quantization), besides the checks in _copy_reason
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def _copy_reason(name: str, ne: Sequence[int], opts: MixtureOptions) -> str | None:
    """Why llama-quantize copies this tensor unchanged, or None if it may be quantized (§3.1.1)."""
    if _n_dims(ne) < 2:
        return "1-D"
    if not name.endswith("weight"):
        return "not a weight"
    if name == "output.weight" and opts.leave_output_tensor:
        return "--leave-output-tensor"
    if name in ("position_embd.weight", "token_types.weight"):
        return "positional/token-type embedding"
    for sub in _NEVER_QUANTIZED:
        if sub in name:
            return f"never quantized ({sub})"
    return None


# ---- the mixture rules -------------------------------------------------------------------------------------


@dataclass
class _State:
    """quantize_state_impl: counters advance only when the rules run for a tensor."""

    n_wv: int
    tied: bool
    i_wv: int = 0
    i_down: int = 0
    i_gate: int = 0
    i_up: int = 0


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_for_ffn(name: str, counter: int, facts: ModelFacts) -> int:
    """layer_info: the counter, except with experts where the layer is read from the name."""
    if max(1, facts.n_expert) <= 1:
        return counter
    layer = _layer_of(name)
    if layer is None:
        raise BadInput(f"cannot determine the layer of tensor {name!r} (expected blk.N.)")
    if not 0 <= layer < facts.n_layer:
        raise BadInput(f"tensor {name!r} has layer {layer}, outside [0, {facts.n_layer})")
    return layer


_E8_ATTN_OUTPUT_Q5K = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"
)
# file types whose output (and tied token_embd) is Q5_K rather than Q6_K
_OUTPUT_Q5K = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS")
# untied token_embd by file type (the others keep the default)
_TOKEN_EMBD_TYPES = {
    "IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K, "IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K,
    "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S,
    "TQ1_0": T.Q4_K, "TQ2_0": T.Q4_K, "Q2_0": T.Q4_K,  # not Q1_0: it keeps Q1_0
}
# the low-bit branch: its own rules instead of the per-category chain (no 70B, no E8 -> Q8_0, no Falcon case)
_LOWBIT = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
# attn_output without 8 experts (not Falcon)
_ATTN_OUTPUT_TYPES = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_XXS": T.IQ3_S, "IQ3_M": T.Q4_K}
# attn_q, and attn_k without 8 experts, of the IQ3 mixes
_ATTN_QK = {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}


def _output_rule(ft: str, t: T, ne0: int, facts: ModelFacts) -> T:
    """output.weight, and token_embd when tied (no --output-tensor-type): t is the file type's default."""
    if ft == "MXFP4_MOE" or facts.falcon or ne0 % block_size(t) != 0:
        return T.Q8_0
    if ft in _OUTPUT_Q5K:
        return T.Q5_K
    return t if t == T.Q8_0 else T.Q6_K


def _mxfp4_moe_rule(cat: str, ne: Sequence[int], facts: ModelFacts) -> T:
    """MXFP4_MOE: expert stacks (ne2 > 1) are MXFP4, everything else Q8_0; bailingmoe3's MLA projections are
    3-D too, so there only the ffn tensors count as experts."""
    stacked = len(ne) > 2 and ne[2] > 1
    if stacked and (facts.arch != "bailingmoe3" or cat in (FFN_UP, FFN_GATE, FFN_DOWN)):
        return T.MXFP4
    return T.Q8_0


def _lowbit_rule(ft: str, cat: str, t: T, st: _State, facts: ModelFacts) -> T:
    """IQ2_XXS/XS/S/M and IQ1_S/M: only attn_v, attn_k (8 experts), ffn_down and attn_output change."""
    small = T.IQ3_S if ft in ("IQ2_S", "IQ2_M") else T.Q2_K  # what the first ffn_down and attn_v get
    if cat in _ATTN_V_LIKE:
        st.i_wv += 1
        return T.Q4_K if facts.n_gqa >= 4 or facts.n_expert >= 4 else small
    if cat == ATTN_K and facts.n_expert == 8:
        return T.Q4_K
    if cat == FFN_DOWN:
        # the running counter, never the name's layer, even with experts
        first = st.i_down < facts.n_layer // 8
        st.i_down += 1
        return small if first else t
    if cat == ATTN_OUTPUT:
        if facts.n_expert == 8:
            return T.Q5_K
        if ft in ("IQ1_S", "IQ1_M"):
            return T.IQ2_XXS
        if ft in ("IQ2_S", "IQ2_M"):
            return T.IQ3_S
    return t


def _attn_v_rule(ft: str, t: T, st: _State, facts: ModelFacts, has_imatrix: bool) -> T:
    gqa = facts.n_gqa
    if ft == "Q2_K":
        t = T.Q4_K if gqa >= 4 else T.Q3_K
    elif ft == "Q2_K_S" and gqa >= 4:
        t = T.Q4_K
    elif ft == "IQ3_XXS":
        t = T.Q4_K if gqa >= 4 else (T.IQ3_XXS if has_imatrix else T.IQ3_S)
    elif ft in ("IQ3_XS", "IQ3_S") and gqa >= 4:
        t = T.Q4_K
    elif ft == "IQ3_M":
        t = T.Q4_K
    elif ft == "Q3_K_M":
        t = T.Q5_K if st.i_wv < 2 else T.Q4_K
    elif ft == "Q3_K_L":
        t = T.Q5_K
    elif ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
        t = T.Q5_K
    elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(st.i_wv, st.n_wv):
        t = T.Q6_K
    elif ft == "Q4_K_S" and st.i_wv < 4:
        t = T.Q5_K
    if facts.is_70b and t in (T.Q3_K, T.Q4_K):
        t = T.Q5_K  # 8 heads share attn_v: more bits cost little
    if facts.n_expert == 8:
        t = T.Q8_0
    st.i_wv += 1
    return t


def _ffn_down_rule(ft: str, t: T, i: int, facts: ModelFacts, has_imatrix: bool) -> T:
    n, falcon = facts.n_layer, facts.falcon
    if ft == "Q2_K":
        return T.Q3_K
    if ft == "Q2_K_S":
        return T.Q4_K if i < n // 8 else t
    if ft == "IQ3_XXS" and not has_imatrix:
        return T.Q4_K if i < n // 8 else T.Q3_K
    if ft == "IQ3_M":
        more = i < n // 8 or (facts.n_expert == 8 and use_more_bits(i, n))
        return T.Q4_K if more else t
    if ft == "Q3_K_M":
        if i < n // 16:
            return T.Q5_K
        return T.Q4_K if not falcon or use_more_bits(i, n) else T.Q3_K
    if ft == "Q3_K_L":
        return T.Q4_K if falcon else T.Q5_K
    if ft == "Q4_K_M":
        if falcon:
            return T.Q6_K if i < n // 16 else (T.Q5_K if use_more_bits(i, n) else T.Q4_K)
        return T.Q6_K if use_more_bits(i, n) else t
    if i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
        return T.Q5_K
    if ft == "Q5_K_M" and use_more_bits(i, n):
        return T.Q6_K
    if ft == "Q4_K_S" and not falcon and i < n // 8:
        return T.Q5_K
    if ft in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        # llama.cpp guards the first ffn_down layers only when an imatrix is given
        return T.Q4_1 if ft == "Q4_0" else T.Q5_1
    return t


def _attn_output_rule(ft: str, t: T, facts: ModelFacts) -> T:
    if facts.falcon:
        return T.Q4_K if ft == "Q3_K_L" else t
    if facts.n_expert == 8:
        return T.Q5_K if ft in _E8_ATTN_OUTPUT_Q5K else t
    return _ATTN_OUTPUT_TYPES.get(ft, t)


def _ffn_gate_up_rule(ft: str, t: T, i: int, n: int) -> T:
    return T.IQ3_XXS if ft == "IQ3_XS" and n // 8 <= i < 7 * n // 8 else t


def _rules(name: str, cat: str, t: T, ne: Sequence[int], st: _State, facts: ModelFacts,
           opts: MixtureOptions) -> T:
    """llama_tensor_get_type_impl for the supported file types; t is the file type's default."""
    ft = opts.file_type.name
    if cat == OUTPUT or (st.tied and cat == TOKEN_EMBD):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type  # a tied token_embd lands here: the fallback still follows
        return _output_rule(ft, t, ne[0], facts)
    if ft == "MXFP4_MOE":
        return _mxfp4_moe_rule(cat, ne, facts)
    if cat == TOKEN_EMBD:
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        return _TOKEN_EMBD_TYPES.get(ft, t)
    if ft in _LOWBIT:
        return _lowbit_rule(ft, cat, t, st, facts)
    if cat in _ATTN_V_LIKE:
        return _attn_v_rule(ft, t, st, facts, opts.has_imatrix)
    if cat == ATTN_K:
        return T.Q8_0 if facts.n_expert == 8 else _ATTN_QK.get(ft, t)
    if cat == ATTN_Q:
        return _ATTN_QK.get(ft, t)
    if cat == FFN_DOWN:
        i = _layer_for_ffn(name, st.i_down, facts)
        st.i_down += 1
        return _ffn_down_rule(ft, t, i, facts, opts.has_imatrix)
    if cat == ATTN_OUTPUT:
        return _attn_output_rule(ft, t, facts)
    if cat == FFN_GATE:
        i = _layer_for_ffn(name, st.i_gate, facts)
        st.i_gate += 1
        return _ffn_gate_up_rule(ft, t, i, facts.n_layer)
    if cat == FFN_UP:
        i = _layer_for_ffn(name, st.i_up, facts)
        st.i_up += 1
        return _ffn_gate_up_rule(ft, t, i, facts.n_layer)
    return t


_FALLBACK = {
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.IQ1_S: T.IQ4_NL,
    T.IQ1_M: T.IQ4_NL,
    T.IQ2_XXS: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL,
    T.IQ3_S: T.IQ4_NL,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
    T.Q2_0: T.Q4_0,
}


def fallback_type(t: T, ne0: int) -> tuple[T, bool]:
    """tensor_type_fallback (§3.3): a smaller-block type when ne0 does not fit, F16 if even that fails."""
    if ne0 % block_size(t) == 0:
        return t, False
    if t not in _FALLBACK and block_size(t) > 32:  # Q1_0, NVFP4: llama-quantize throws (gguf-lowbit.md §8.4)
        raise BadInput(f"no tensor type fallback is defined for type {t.name} (rows of {ne0} are not a "
                       f"multiple of {block_size(t)})")
    alt = _FALLBACK.get(t, t)  # 32-block types have nothing smaller: they go straight to the F16 check
    return (alt if ne0 % block_size(alt) == 0 else T.F16), True


def _first_match(name: str, opts: MixtureOptions) -> T | None:
    for pattern, qtype in opts.tensor_types:
        if re.search(pattern, name):
            return qtype
    return None


def _check_fits(name: str, ne0: int, t: T, what: str) -> T:
    # llama.cpp applies these overrides without a fallback and then fails inside ggml: say it up front
    if ne0 % block_size(t) != 0:
        raise BadInput(
            f"{what} {t.name} needs rows that are a multiple of {block_size(t)}; {name} has rows of {ne0}"
        )
    return t


def _choose(
    name: str, ne: Sequence[int], st: _State, facts: ModelFacts, opts: MixtureOptions
) -> TensorChoice:
    """llama_tensor_get_type for one quantizable tensor."""
    cat = category(name)
    ne0 = ne[0]
    if opts.token_embedding_type is not None and cat == TOKEN_EMBD:
        # per_layer_token_embd may instead be named by a --tensor-type pattern
        if name != "per_layer_token_embd.weight" or _first_match(name, opts) is None:
            t = _check_fits(name, ne0, opts.token_embedding_type, "--token-embedding-type")
            return TensorChoice(name, t, True, False, "--token-embedding-type")
    if opts.output_tensor_type is not None and cat == OUTPUT:
        t = _check_fits(name, ne0, opts.output_tensor_type, "--output-tensor-type")
        return TensorChoice(name, t, True, False, "--output-tensor-type")
    t = opts.file_type.default
    if not is_quantized(t):
        return TensorChoice(name, t, True, False, f"{opts.file_type.name} default")
    manual = _first_match(name, opts)
    if manual is not None:
        t, reason = manual, "--tensor-type"
    elif opts.pure:
        reason = "--pure"
    else:
        t = _rules(name, cat, t, ne, st, facts, opts)
        reason = f"{opts.file_type.name} rule ({cat.lower()})"
    t2, fell = fallback_type(t, ne0)
    if fell:
        reason += f"; ne0={ne0} does not fit {t.name}: fallback"
    return TensorChoice(name, t2, True, fell, reason)


def choose_types(
    tensors: Sequence[tuple[str, tuple[int, ...]]] | Sequence[tuple[str, tuple[int, ...], T]],
    facts: ModelFacts,
    opts: MixtureOptions,
) -> list[TensorChoice]:
    """Per-tensor types as llama_model_quantize picks them, in llama_order.

    Each item is (gguf name, ggml ne) or (gguf name, ggml ne, source type); a tensor that is copied unchanged
    reports its source type (F32 when not given)."""
    by_name = {t[0]: t for t in tensors}
    if len(by_name) != len(tensors):
        raise BadInput("duplicate tensor names in the model")
    names = llama_order(by_name)
    st = _State(n_wv=sum(category(n) in _ATTN_V_LIKE for n in names), tied="output.weight" not in by_name)
    out = []
    for name in names:
        item = by_name[name]
        ne = tuple(int(d) for d in item[1])
        why = _copy_reason(name, ne, opts)
        if why is not None:
            src = item[2] if len(item) > 2 else T.F32
            out.append(TensorChoice(name, src, False, False, f"kept: {why}"))
        else:
            out.append(_choose(name, ne, st, facts, opts))
    return out


def requires_imatrix(choice: TensorChoice, opts: MixtureOptions) -> bool:
    """tensor_requires_imatrix (§3.5): llama-quantize refuses these without imatrix data."""
    if not choice.quantized or choice.name in (
        "token_embd.weight",
        "per_layer_token_embd.weight",
        "output.weight",
    ):
        return False
    if choice.qtype in _ALWAYS_NEED_IMATRIX:
        return True
    return choice.qtype == T.Q2_K and opts.file_type.name == "Q2_K_S"


# ---- YAML presets (configs/gguf/*.yaml) --------------------------------------------------------------------

_CONFIG_KEYS = (
    "type",
    "pure",
    "leave_output_tensor",
    "output_tensor_type",
    "token_embedding_type",
    "tensor_types",
)


def _config_bool(data: dict, key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise BadInput(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _config_type(data: dict, key: str, where: str) -> T | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        return parse_tensor_type(str(value))
    except BadInput as e:
        raise BadInput(f"{where}: {key}: {e}") from None


def _config_tensor_types(data: dict, where: str) -> list[tuple[str, T]]:
    items = data.get("tensor_types") or []
    if not isinstance(items, list):
        raise BadInput(f"{where}: tensor_types must be a list of {{pattern, type}}")
    out = []
    for i, item in enumerate(items):
        at = f"{where}: tensor_types[{i}]"
        if not isinstance(item, dict) or set(item) != {"pattern", "type"}:
            raise BadInput(f"{at} must have exactly the keys pattern and type")
        pattern = str(item["pattern"])
        try:
            re.compile(pattern)
        except re.error as e:
            raise BadInput(f"{at}: bad regex {pattern!r}: {e}") from None
        try:
            out.append((pattern, parse_tensor_type(str(item["type"]))))
        except BadInput as e:
            raise BadInput(f"{at}: {e}") from None
    return out


def options_from_dict(data: object, where: str = "config", *, has_imatrix: bool = False) -> MixtureOptions:
    """MixtureOptions from a parsed config mapping; errors name `where` and the key."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping with keys {', '.join(_CONFIG_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(_CONFIG_KEYS))
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(_CONFIG_KEYS)}")
    if data.get("type") is None:
        raise BadInput(f"{where}: missing key 'type'")
    try:
        file_type = parse_file_type(str(data["type"]))
    except BadInput as e:
        raise BadInput(f"{where}: type: {e}") from None
    return MixtureOptions(
        file_type=file_type,
        has_imatrix=has_imatrix,
        pure=_config_bool(data, "pure", where),
        leave_output_tensor=_config_bool(data, "leave_output_tensor", where),
        output_tensor_type=_config_type(data, "output_tensor_type", where),
        token_embedding_type=_config_type(data, "token_embedding_type", where),
        tensor_types=_config_tensor_types(data, where),
    )


def load_config(path: str | Path, *, has_imatrix: bool = False) -> MixtureOptions:
    """Read a configs/gguf/*.yaml preset or recipe into MixtureOptions."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("no such config file", path) from None
    except UnicodeDecodeError:
        raise BadInput("config is not UTF-8 text", path) from None
    except OSError as e:
        raise IOFailure(f"cannot read config: {e.strerror}", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"invalid YAML{at}", path) from None
    return options_from_dict(data, str(path), has_imatrix=has_imatrix)


def preset_path(name: str) -> Path:
    """configs/gguf/<NAME>.yaml shipped with the repository."""
    return Path(__file__).resolve().parents[3] / "configs" / "gguf" / f"{name}.yaml"
