"""formats.gguf.mixture against llama.cpp (llama-cpp-python 0.3.36's libllama) and reference/gguf.md §3.

Small GGUF models are built here with gguf.GGUFWriter, quantized with `llama_model_quantize` for every
supported file type (and with an imatrix where it changes the rules), and the type llama.cpp wrote for every
tensor, in file order, must be the one `choose_types` predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qconvert.arch.facts import is_70b_model
from qconvert.errors import BadInput
from qconvert.formats.gguf import mixture as gm
from qconvert.formats.gguf.mixture import (
    FILE_TYPE_NAMES,
    MixtureOptions,
    ModelFacts,
    TensorChoice,
    choose_types,
    llama_order,
    load_config,
    parse_file_type,
    requires_imatrix,
)
from tests.oracle.llamacpp import model_quantize

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "gguf"

# ---- llama.cpp (tests/oracle/llamacpp.py: the wheel's libllama through ctypes) ----------------------------


def llama_quantize(src: Path, dst: Path, ftype: int, *, imatrix=None, tensor_types=(), **params) -> None:
    """llama_model_quantize with llama-quantize's options as params fields; raises if llama.cpp fails."""
    fields = {k: int(v) if isinstance(v, T) else v for k, v in params.items()}
    tt = [(pattern, int(t)) for pattern, t in tensor_types] or None
    model_quantize(src, dst, int(ftype), imatrix, nthread=2, tensor_types=tt, **fields)


# ---- tiny models -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 256
    tied: bool = False
    n_expert: int = 0
    bf16: bool = True
    odd_tensor: bool = False  # one extra tensor with ne0 = 40 (not a multiple of 32): the F16 fallback
    # 32 rows per matrix keeps the suite fast: the rules read only names and ne0 (row length), and
    # llama_model_quantize does not check shapes against the hparams
    skinny: bool = True


SPECS = {
    # GQA 4, untied output, BF16 source
    "dense": Spec("dense", 256, 512, 8, 8, 2),
    # GQA 1, tied embeddings, 16 layers (i < n/16 rules), F32 source
    "tied16": Spec("tied16", 256, 256, 16, 4, 4, tied=True, bf16=False),
    # SmolLM2-like width 576 (not a multiple of 256): fallbacks everywhere; GQA 3; tied
    "smol576": Spec("smol576", 576, 256, 8, 9, 3, tied=True, odd_tensor=True),
    # Mixtral-like: 8 experts (3-D ffn_*_exps, router), untied, F32 source
    "moe8": Spec("moe8", 256, 256, 8, 8, 2, n_expert=8, bf16=False),
}
# an 80-layer GQA llama is LLM_TYPE_70B: attn_v Q3_K/Q4_K become Q5_K
ALL_SPECS = {**SPECS, "llama70b": Spec("llama70b", 256, 256, 80, 8, 1, bf16=False)}


def _byte_tokens(n: int) -> list[str]:
    # a gpt2-style vocabulary: the 256 byte symbols, then made-up merged tokens
    byte_syms = [chr(c) if 33 <= c <= 126 else chr(256 + c) for c in range(256)]
    return byte_syms + [f"tok{i}" for i in range(n - 256)]


def _add(
    w: gguf.GGUFWriter, name: str, shape_np: tuple[int, ...], rng: np.random.Generator, bf16: bool
) -> None:
    x = (rng.standard_normal(shape_np, dtype=np.float32) * 0.02).astype(np.float32)
    if bf16 and len(shape_np) > 1:
        w.add_tensor(name, (x.view(np.uint32) >> 16).astype(np.uint16), raw_dtype=T.BF16)
    else:
        w.add_tensor(name, x)  # 1-D tensors are F32, as convert_hf_to_gguf writes them


def _tensors(s: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in the lexicographic order convert_hf_to_gguf uses (blk.1, blk.10, ...)."""
    rows = (lambda n: 32) if s.skinny else (lambda n: n)
    hd = s.n_embd // s.n_head
    out = [("token_embd.weight", (s.n_vocab, s.n_embd)), ("output_norm.weight", (s.n_embd,))]
    if not s.tied:
        out.append(("output.weight", (s.n_vocab, s.n_embd)))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (s.n_embd,)),
            (p + "ffn_norm.weight", (s.n_embd,)),
            (p + "attn_q.weight", (rows(s.n_embd), s.n_embd)),
            (p + "attn_k.weight", (rows(hd * s.n_head_kv), s.n_embd)),
            (p + "attn_v.weight", (rows(hd * s.n_head_kv), s.n_embd)),
            (p + "attn_output.weight", (rows(s.n_embd), s.n_embd)),
        ]
        if s.n_expert:
            e = s.n_expert
            out += [
                (p + "ffn_gate_inp.weight", (e, s.n_embd)),
                (p + "ffn_gate_exps.weight", (e, rows(s.n_ff), s.n_embd)),
                (p + "ffn_up_exps.weight", (e, rows(s.n_ff), s.n_embd)),
                (p + "ffn_down_exps.weight", (e, rows(s.n_embd), s.n_ff)),
            ]
        else:
            out += [
                (p + "ffn_gate.weight", (rows(s.n_ff), s.n_embd)),
                (p + "ffn_up.weight", (rows(s.n_ff), s.n_embd)),
                (p + "ffn_down.weight", (rows(s.n_embd), s.n_ff)),
            ]
    if s.odd_tensor:
        out.append(("blk.1.odd_proj.weight", (8, 40)))
    return sorted(out)


def build_model(s: Spec, path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(s.name)
    w.add_context_length(2048)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if s.bf16 else gguf.LlamaFileType.ALL_F32)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(2)
    w.add_vocab_size(s.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_tokens(s.n_vocab))
    w.add_token_types([1] * s.n_vocab)
    w.add_token_merges([f"{a} {b}" for a, b in zip("tok", "ok1", strict=True)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(len(s.name))
    for name, shape in _tensors(s):
        _add(w, name, shape, rng, s.bf16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_types(path: Path) -> list[tuple[str, T, tuple[int, ...]]]:
    r = gguf.GGUFReader(path)
    return [(t.name, T(t.tensor_type), tuple(int(d) for d in t.shape)) for t in r.tensors]


def facts_for(s: Spec) -> ModelFacts:
    return ModelFacts(
        "llama",
        s.n_layer,
        s.n_head,
        s.n_head_kv,
        s.n_expert,
        is_70b_model("llama", s.n_layer, s.n_head, s.n_head_kv),
    )


def make_imatrix(src_types: list[tuple[str, T, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Positive weights [n_mat * ne0] for every matmul weight, as llama-imatrix collects (no token_embd)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, _, ne in src_types:
        if len(ne) < 2 or "norm" in name or name == "token_embd.weight" or "gate_inp" in name:
            continue
        n_mat = ne[2] if len(ne) > 2 else 1
        out[name] = rng.uniform(0.01, 2.0, size=n_mat * ne[0]).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mixture_models")
    return {k: build_model(s, d / f"{k}.gguf") for k, s in ALL_SPECS.items()}


def _check(models, tmp_path, key: str, opts: MixtureOptions, **llama_kw) -> list[TensorChoice]:
    src = models[key]
    src_types = read_types(src)
    dst = tmp_path / f"{key}-{opts.file_type.name}.gguf"
    llama_quantize(src, dst, opts.file_type.ftype, **llama_kw)
    ours = choose_types([(n, ne, t) for n, t, ne in src_types], facts_for(ALL_SPECS[key]), opts)
    theirs = [(n, t) for n, t, _ in read_types(dst)]
    assert [(c.name, c.qtype) for c in ours] == theirs
    return ours


# ---- parity with llama.cpp: every file type on every model -------------------------------------------------

# without an imatrix llama.cpp refuses these: Q2_K_S (its Q2_K tensors), the IQ1/IQ2 mixes and IQ3_XXS/IQ3_XS
# (their IQ3_XXS / IQ2_* tensors require one)
NEED_IMATRIX = ["Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"]
_NO_IMATRIX = [ft for ft in FILE_TYPE_NAMES if ft not in NEED_IMATRIX]
# Q1_0 has no fallback: rows of 576 are refused by both (test_q1_0_without_a_fallback_is_refused_by_both)
_REFUSED = {("Q1_0", "smol576")}


@pytest.mark.parametrize(
    "ft,key", [(ft, key) for ft in _NO_IMATRIX for key in SPECS if (ft, key) not in _REFUSED]
)
def test_types_match_llama(models, tmp_path, key, ft):
    _check(models, tmp_path, key, MixtureOptions(parse_file_type(ft)))


# file types whose rules read has_imatrix (Q4_0/Q5_0/IQ4 ffn_down, IQ3_XXS attn_v/ffn_down) or that need one
@pytest.mark.parametrize("key", list(SPECS))
@pytest.mark.parametrize("ft", ["Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS", *NEED_IMATRIX])
def test_types_match_llama_with_imatrix(models, tmp_path, key, ft):
    imatrix = make_imatrix(read_types(models[key]))
    _check(models, tmp_path, key, MixtureOptions(parse_file_type(ft), has_imatrix=True), imatrix=imatrix)


def test_q2_k_s_without_imatrix_is_refused_by_both(models, tmp_path):
    src_types = read_types(models["dense"])
    opts = MixtureOptions(parse_file_type("Q2_K_S"))
    ours = choose_types([(n, ne, t) for n, t, ne in src_types], facts_for(SPECS["dense"]), opts)
    assert any(requires_imatrix(c, opts) for c in ours)
    with pytest.raises(RuntimeError, match="failed"):
        llama_quantize(models["dense"], tmp_path / "x.gguf", opts.file_type.ftype)


@pytest.mark.parametrize("ft", NEED_IMATRIX[1:])
def test_lowbit_without_imatrix_is_refused_by_both(models, tmp_path, ft):
    src_types = read_types(models["dense"])
    opts = MixtureOptions(parse_file_type(ft))
    ours = choose_types([(n, ne, t) for n, t, ne in src_types], facts_for(SPECS["dense"]), opts)
    assert any(requires_imatrix(c, opts) for c in ours)
    with pytest.raises(RuntimeError, match="failed"):
        llama_quantize(models["dense"], tmp_path / "x.gguf", opts.file_type.ftype)


def test_q1_0_without_a_fallback_is_refused_by_both(models, tmp_path):
    src_types = read_types(models["smol576"])
    opts = MixtureOptions(parse_file_type("Q1_0"))
    with pytest.raises(BadInput, match="no tensor type fallback is defined for type Q1_0"):
        choose_types([(n, ne, t) for n, t, ne in src_types], facts_for(SPECS["smol576"]), opts)
    with pytest.raises(RuntimeError, match="failed"):
        llama_quantize(models["smol576"], tmp_path / "x.gguf", opts.file_type.ftype)


def test_nvfp4_is_not_a_file_type_of_llama_quantize(models, tmp_path):
    # LLAMA_FTYPE_MOSTLY_NVFP4 (39) is in the enum but has no default type: llama_model_quantize throws
    with pytest.raises(RuntimeError, match="failed"):
        llama_quantize(models["dense"], tmp_path / "x.gguf", 39)
    with pytest.raises(BadInput, match="unknown GGUF file type"):
        parse_file_type("NVFP4")
    with pytest.raises(BadInput, match="unknown GGUF file type"):
        parse_file_type("39")


@pytest.mark.parametrize("ft", ["Q3_K_M", "Q4_K_S", "Q2_K", "Q4_K_M", "IQ3_M", "IQ3_S"])
def test_70b_rule_matches_llama(models, tmp_path, ft):
    ours = _check(models, tmp_path, "llama70b", MixtureOptions(parse_file_type(ft)))
    v = [c.qtype for c in ours if c.name.endswith("attn_v.weight")]
    assert T.Q5_K in v and T.Q3_K not in v and (ft == "Q4_K_M" or T.Q4_K not in v)


# ---- parity with llama.cpp: the overrides ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["dense", "smol576", "moe8"])
@pytest.mark.parametrize("ft", ["Q4_K_M", "Q3_K_M", "IQ4_XS"])
def test_pure_matches_llama(models, tmp_path, key, ft):
    ours = _check(models, tmp_path, key, MixtureOptions(parse_file_type(ft), pure=True), pure=True)
    assert {c.reason.split(";")[0] for c in ours if c.quantized} == {"--pure"}


@pytest.mark.parametrize("key", ["dense", "smol576", "tied16"])
@pytest.mark.parametrize("ft", ["Q4_K_M", "Q8_0", "F16"])
def test_output_and_embedding_types_match_llama(models, tmp_path, key, ft):
    opts = MixtureOptions(parse_file_type(ft), output_tensor_type=T.Q5_0, token_embedding_type=T.Q4_1)
    _check(models, tmp_path, key, opts, output_tensor_type=T.Q5_0, token_embedding_type=T.Q4_1)
    # output type alone: a tied token_embd follows it, through the fallback
    opts = MixtureOptions(parse_file_type(ft), output_tensor_type=T.Q8_0)
    _check(models, tmp_path, key, opts, output_tensor_type=T.Q8_0)


@pytest.mark.parametrize("key", ["dense", "tied16"])
def test_leave_output_tensor_matches_llama(models, tmp_path, key):
    opts = MixtureOptions(parse_file_type("Q4_K_M"), leave_output_tensor=True)
    ours = _check(models, tmp_path, key, opts, quantize_output_tensor=False)
    if not SPECS[key].tied:
        out = next(c for c in ours if c.name == "output.weight")
        assert not out.quantized and out.qtype == T.BF16


@pytest.mark.parametrize("key", ["dense", "moe8", "smol576"])
@pytest.mark.parametrize("ft", ["Q4_K_M", "Q3_K_M", "Q4_0"])
def test_tensor_types_match_llama(models, tmp_path, key, ft):
    # manual tensors skip the rules and do not advance the attn_v / ffn_down counters
    tt = [
        (r"blk\.[0-2]\.attn_v", T.Q8_0),
        (r"ffn_down", T.Q5_K),
        (r"blk\.3\.", T.IQ4_XS),
        (r"^output\.", T.Q4_K),
    ]
    opts = MixtureOptions(parse_file_type(ft), tensor_types=tt)
    ours = _check(models, tmp_path, key, opts, tensor_types=tt)
    assert any(c.reason.startswith("--tensor-type") for c in ours)
    # the same patterns under --pure
    _check(models, tmp_path, key, replace(opts, pure=True), tensor_types=tt, pure=True)


# ---- rules and helpers without llama.cpp -------------------------------------------------------------------


def test_parse_file_type_names_aliases_and_ids():
    assert parse_file_type("q4_k_m").name == "Q4_K_M"
    assert parse_file_type("Q4_K") == parse_file_type("Q4_K_M")
    assert parse_file_type("q3_k").name == "Q3_K_M" and parse_file_type("Q5_K").name == "Q5_K_M"
    assert parse_file_type("15").name == "Q4_K_M"
    assert parse_file_type("Q2_K_S").ftype == 21 and parse_file_type("Q2_K_S").default == T.Q2_K
    assert parse_file_type("bf16").default == T.BF16 and parse_file_type("IQ4_XS").ftype == 30
    assert len(FILE_TYPE_NAMES) == 35
    # llama_ftype_get_default_type: IQ2_S writes IQ2_XS, IQ2_M IQ2_S, IQ3_XS/IQ3_M IQ3_S
    assert parse_file_type("iq2_s").default == T.IQ2_XS and parse_file_type("IQ2_M").default == T.IQ2_S
    assert parse_file_type("IQ3_XS").default == T.IQ3_S and parse_file_type("IQ3_M").default == T.IQ3_S
    assert parse_file_type("MXFP4_MOE").default == T.MXFP4 and parse_file_type("38").name == "MXFP4_MOE"
    assert parse_file_type("Q2_0").ftype == 41 and parse_file_type("Q1_0").default == T.Q1_0


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(BadInput, match="Q4_K_M") as e:
        parse_file_type("Q4_K_X")
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="iq4_xs"):
        gm.parse_tensor_type("q9_k")
    assert gm.parse_tensor_type("q6_K") == T.Q6_K and gm.parse_tensor_type("F16") == T.F16


def test_llama_order_is_weights_map_order():
    names = [
        "blk.10.attn_k.weight",
        "blk.2.ffn_up.weight",
        "token_embd.weight",
        "blk.1.attn_norm.weight",
        "output_norm.weight",
        "blk.2.attn_k.weight",
        "blk.1.attn_k.weight",
    ]
    assert llama_order(names) == [
        "output_norm.weight",
        "token_embd.weight",
        "blk.1.attn_k.weight",
        "blk.1.attn_norm.weight",
        "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_k.weight",
    ]


def test_use_more_bits_for_32_layers():
    got = [i for i in range(32) if gm.use_more_bits(i, 32)]
    assert got == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_fallback_table():
    assert gm.fallback_type(T.Q4_K, 576) == (T.Q5_0, True)
    assert gm.fallback_type(T.Q6_K, 576) == (T.Q8_0, True)
    assert gm.fallback_type(T.IQ4_XS, 576) == (T.IQ4_NL, True)
    assert gm.fallback_type(T.Q3_K, 576) == (T.Q4_0, True)
    assert gm.fallback_type(T.Q5_K, 576) == (T.Q5_1, True)
    assert gm.fallback_type(T.Q4_K, 40) == (T.F16, True)
    assert gm.fallback_type(T.Q8_0, 40) == (T.F16, True)
    assert gm.fallback_type(T.Q4_K, 512) == (T.Q4_K, False)
    assert gm.fallback_type(T.Q2_0, 544) == (T.Q4_0, True)  # 576 = 9·64 fits Q2_0
    assert gm.fallback_type(T.TQ1_0, 576) == (T.Q4_0, True)
    assert gm.fallback_type(T.MXFP4, 40) == (T.F16, True)
    for t in (T.Q1_0, T.NVFP4):  # tensor_type_fallback throws for these
        assert gm.fallback_type(t, 1536) == (t, False)
        with pytest.raises(BadInput, match=f"no tensor type fallback is defined for type {t.name}"):
            gm.fallback_type(t, 544)


def test_categories():
    assert gm.category("blk.0.attn_qkv.weight") == gm.ATTN_QKV
    assert gm.category("blk.3.ffn_down_exps.weight") == gm.FFN_DOWN
    assert gm.category("blk.3.ffn_gate_shexp.weight") == gm.FFN_GATE
    assert gm.category("output.weight") == gm.OUTPUT and gm.category("x.output.weight") == gm.OTHER
    assert gm.category("per_layer_token_embd.weight") == gm.TOKEN_EMBD


def _toy(n_layer=8, width=256, tied=False):
    t = [("token_embd.weight", (width, 100)), ("output_norm.weight", (width,))]
    if not tied:
        t.append(("output.weight", (width, 100)))
    for i in range(n_layer):
        t += [
            (f"blk.{i}.attn_v.weight", (width, 64)),
            (f"blk.{i}.ffn_down.weight", (512, width)),
            (f"blk.{i}.attn_qkv.weight", (width, 384)),
            (f"blk.{i}.attn_norm.weight", (width,)),
        ]
    return t


def test_phi3_qkv_follows_attn_v_rules_and_counts():
    ch = {
        c.name: c
        for c in choose_types(_toy(), ModelFacts("phi3", 8, 8, 8), MixtureOptions(parse_file_type("Q3_K_M")))
    }
    # attn_qkv sorts before attn_v in each block: the first two attn_v-like tensors of blk.0 get Q5_K
    assert ch["blk.0.attn_qkv.weight"].qtype == T.Q5_K and ch["blk.0.attn_v.weight"].qtype == T.Q5_K
    assert ch["blk.1.attn_qkv.weight"].qtype == T.Q4_K
    assert not ch["blk.0.attn_norm.weight"].quantized and ch["blk.0.attn_norm.weight"].qtype == T.F32


def test_output_override_that_does_not_fit_is_bad_input():
    opts = MixtureOptions(parse_file_type("Q4_K_M"), output_tensor_type=T.Q6_K)
    with pytest.raises(BadInput, match="output.weight"):
        choose_types(_toy(width=576), ModelFacts("llama", 8, 9, 3), opts)


def test_requires_imatrix():
    opts = MixtureOptions(parse_file_type("Q2_K_S"))
    q = TensorChoice("blk.0.attn_q.weight", T.Q2_K, True, False, "")
    assert requires_imatrix(q, opts)
    assert not requires_imatrix(replace(q, name="token_embd.weight"), opts)
    assert not requires_imatrix(replace(q, name="output.weight"), opts)
    assert not requires_imatrix(q, MixtureOptions(parse_file_type("Q2_K")))
    assert not requires_imatrix(replace(q, qtype=T.Q4_K), opts)


def test_falcon_rules():
    facts = ModelFacts("falcon", 32, 8, 8)
    t = [("output.weight", (256, 100))] + [(f"blk.{i}.ffn_down.weight", (256, 64)) for i in range(32)]
    ch = {c.name: c.qtype for c in choose_types(t, facts, MixtureOptions(parse_file_type("Q4_K_M")))}
    assert ch["output.weight"] == T.Q8_0
    assert ch["blk.0.ffn_down.weight"] == T.Q6_K and ch["blk.2.ffn_down.weight"] == T.Q5_K
    assert ch["blk.4.ffn_down.weight"] == T.Q4_K


def test_expert_layer_comes_from_the_name():
    facts = ModelFacts("llama", 8, 8, 2, n_expert=8)
    with pytest.raises(BadInput, match="layer"):
        choose_types(
            [("blk.9.ffn_down_exps.weight", (256, 64, 8))], facts, MixtureOptions(parse_file_type("Q4_K_M"))
        )


# ---- YAML presets ------------------------------------------------------------------------------------------


def test_presets_load():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS"} <= set(names)
    for p in CONFIGS.glob("*.yaml"):
        opts = load_config(p)
        if p.stem in FILE_TYPE_NAMES:
            assert opts == MixtureOptions(parse_file_type(p.stem))
    assert gm.preset_path("Q4_K_M") == CONFIGS / "Q4_K_M.yaml"


def test_example_recipe():
    opts = load_config(CONFIGS / "example-recipe.yaml", has_imatrix=True)
    assert opts.file_type.name == "Q4_K_M" and opts.has_imatrix
    assert opts.output_tensor_type == T.Q8_0 and opts.token_embedding_type == T.Q8_0
    assert opts.tensor_types == [(r"attn_v\.weight$", T.Q6_K), (r"^blk\.(0|1)\.ffn_down", T.Q8_0)]
    ch = {c.name: c.qtype for c in choose_types(_toy(), ModelFacts("llama", 8, 8, 2), opts)}
    assert ch["blk.5.attn_v.weight"] == T.Q6_K and ch["blk.1.ffn_down.weight"] == T.Q8_0


@pytest.mark.parametrize(
    "text, match",
    [
        ("type: Q4_K_X\n", "type"),
        ("pure: true\n", "missing key 'type'"),
        ("type: Q4_K_M\nbogus: 1\n", "bogus"),
        ("type: Q4_K_M\npure: maybe\n", "pure"),
        ("type: Q4_K_M\noutput_tensor_type: q7\n", "output_tensor_type"),
        ("type: Q4_K_M\ntensor_types: [{pattern: '(', type: q8_0}]\n", r"tensor_types\[0\]"),
        ("type: Q4_K_M\ntensor_types: [{pattern: 'a', type: q9}]\n", r"tensor_types\[0\]"),
        ("type: Q4_K_M\ntensor_types: [{pattern: 'a'}]\n", r"tensor_types\[0\]"),
        ("- just a list\n", "mapping"),
        ("type: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_configs(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(BadInput, match=match) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


def test_missing_config(tmp_path):
    with pytest.raises(BadInput, match="no such config"):
        load_config(tmp_path / "nope.yaml")
