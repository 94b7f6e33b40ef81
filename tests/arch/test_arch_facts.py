"""arch.facts: one ModelFacts builder for every input, and llama.cpp's 70B rule (models/<arch>.cpp).

The oracle tests run the whole type choice of `convert` (HF checkpoint or GGUF input, dry run) on 80-layer
models made tiny, for every file type, and hold it equal to what `llama_model_quantize` writes: the 70B rule
(attn_v Q3_K/Q4_K -> Q5_K) is the only rule that reads the model size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qconvert.arch.facts import ModelFacts, facts_from_kv, is_70b_model
from qconvert.formats.gguf.imatrix import Imatrix, write_imatrix_gguf
from qconvert.formats.gguf.mixture import FILE_TYPE_NAMES, parse_file_type
from qconvert.pipelines.convert import ConvertOptions, convert
from tests.oracle.llamacpp import model_quantize

# ---- the rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,n_layer,n_head,n_head_kv,n_expert,want",
    [
        ("llama", 80, 64, 8, 0, True),  # Llama 2/3 70B
        ("llama", 80, 64, 64, 0, False),  # no GQA: LLM_TYPE_65B
        ("llama", 80, 64, 8, 8, False),  # 8 experts: the 8x7B/8x22B switch, 80 layers is unknown there
        ("llama-embed", 80, 64, 8, 0, True),  # reuses llama's load_arch_hparams
        ("qwen2", 80, 64, 64, 0, True),
        ("olmo", 80, 64, 64, 0, True),
        ("deci", 80, 64, 8, 0, True),
        ("jais2", 68, 64, 8, 0, True),
        ("jais2", 80, 64, 8, 0, False),
        ("qwen3", 80, 64, 8, 0, False),  # no LLM_TYPE_70B case in models/qwen3.cpp
        ("gemma2", 80, 64, 8, 0, False),
        ("llama", 79, 64, 8, 0, False),
    ],
)
def test_is_70b_model_is_llama_cpps(arch, n_layer, n_head, n_head_kv, n_expert, want):
    assert is_70b_model(arch, n_layer, n_head, n_head_kv, n_expert) is want


def test_facts_from_kv_reads_what_load_hparams_reads():
    kv = {"olmo.block_count": 80, "olmo.attention.head_count": [8] * 80}
    assert facts_from_kv("olmo", kv) == ModelFacts("olmo", 80, 8, 8, 0, True)  # head_count_kv = head_count
    kv = {"llama.block_count": 80, "llama.attention.head_count": 8, "llama.attention.head_count_kv": 2,
          "llama.expert_count": 8}
    assert facts_from_kv("llama", kv) == ModelFacts("llama", 80, 8, 2, 8, False)
    # MTP layers are in block_count but not in hparams.n_layer(), which decides the model size
    kv = {"qwen2.block_count": 81, "qwen2.nextn_predict_layers": 1, "qwen2.attention.head_count": 8}
    facts = facts_from_kv("qwen2", kv)
    assert facts.is_70b and facts.n_layer == 81


# ---- the oracle: every file type on 80-layer models, GGUF input -------------------------------------------


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int


GGUF_SHAPES = {
    "llama-gqa": Shape("llama", 80, 8, 2),  # 70B
    "llama-mha": Shape("llama", 80, 8, 8),  # 65B: no bump
    "olmo": Shape("olmo", 80, 8, 8),  # 70B without GQA (the case production got wrong)
    "qwen2": Shape("qwen2", 80, 8, 8),
    "deci": Shape("deci", 80, 8, 2),
    "jais2": Shape("jais2", 68, 8, 2),  # jais2's 70B has 68 layers
}
N_EMBD, N_VOCAB, ROWS = 256, 256, 32  # the rules read names and ne0 only: 32 rows per matrix keep it fast


def _byte_tokens(n: int) -> list[str]:
    byte_syms = [chr(c) if 33 <= c <= 126 else chr(256 + c) for c in range(256)]
    return byte_syms + [f"t{i}" for i in range(n - 256)]


def build_gguf(s: Shape, path: Path) -> Path:
    """A float32 GGUF of this shape: llama-style tensor names (llama_model_quantize never creates the
    tensors, it reads the hparams), skinny matrices, and the KVs each arch's load_hparams requires."""
    w = gguf.GGUFWriter(path, s.arch)
    w.add_name(f"tiny-{s.arch}-{s.n_layer}")
    w.add_context_length(2048)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(N_EMBD)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)  # llama, qwen2, deci
    w.add_layer_norm_eps(1e-5)  # olmo, jais2
    w.add_rope_dimension_count(N_EMBD // s.n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(N_VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_tokens(N_VOCAB))
    w.add_token_types([1] * N_VOCAB)
    w.add_token_merges(["t o", "o k"])
    rng = np.random.default_rng(s.n_layer)
    shapes = [("token_embd.weight", (N_VOCAB, N_EMBD)), ("output_norm.weight", (N_EMBD,)),
              ("output.weight", (N_VOCAB, N_EMBD))]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (N_EMBD,)), (p + "ffn_norm.weight", (N_EMBD,))]
        shapes += [(p + n + ".weight", (ROWS, N_EMBD)) for n in
                   ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    for name, shape in sorted(shapes):
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _imatrix(model: Path) -> Imatrix:
    rng = np.random.default_rng(0)
    entries = {t.name: (rng.uniform(1.0, 100.0, (1, int(t.shape[0]))).astype(np.float32),
                        np.array([10.0], np.float32))
               for t in gguf.GGUFReader(model).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    return Imatrix(entries, datasets=["calib.txt"], chunk_count=10, chunk_size=512)


def _types(path: Path) -> list[tuple[str, T]]:
    return [(t.name, T(t.tensor_type)) for t in gguf.GGUFReader(path).tensors]


# both refuse these without an imatrix (their Q2_K / IQ1 / IQ2 / IQ3_XXS tensors need one)
NEED_IMATRIX = ("Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")


def _check(model: str | Path, llama_input: Path, ft: str, tmp_path: Path) -> list[tuple[str, T]]:
    """Our plan (dry run) for MODEL against llama_model_quantize of LLAMA_INPUT, same file type."""
    imx = None
    opts = ConvertOptions(file_type=ft, dry_run=True)
    if ft in NEED_IMATRIX:
        imx = _imatrix(llama_input)
        opts.imatrix = tmp_path / "imatrix.gguf"
        write_imatrix_gguf(opts.imatrix, imx)
    ours = [(r.name, r.qtype) for r in convert(str(model), opts).records]
    ref = tmp_path / "ref.gguf"
    weights = {n: imx.weights(n) for n in imx.entries} if imx else None
    model_quantize(llama_input, ref, int(parse_file_type(ft).ftype), imatrix=weights)
    theirs = _types(ref)
    assert ours == theirs
    return ours


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("arch80")
    return {k: build_gguf(s, d / f"{k}.gguf") for k, s in GGUF_SHAPES.items()}


def _attn_v(types: list[tuple[str, T]]) -> set[T]:
    return {t for n, t in types if n.endswith("attn_v.weight")}


@pytest.mark.oracle
@pytest.mark.parametrize("ft", FILE_TYPE_NAMES)
@pytest.mark.parametrize("key", list(GGUF_SHAPES))
def test_gguf_input_types_match_llama_quantize(gguf_models, tmp_path, key, ft):
    ours = _check(gguf_models[key], gguf_models[key], ft, tmp_path)
    if ft == "Q3_K_S":  # the case: attn_v is Q5_K on a 70B model, Q3_K otherwise
        assert _attn_v(ours) == ({T.Q3_K} if key == "llama-mha" else {T.Q5_K})


# ---- the oracle: HF input (its facts come from the header convert writes) ---------------------------------


@pytest.fixture(scope="module")
def hf_llama80(fixtures_lib, tmp_path_factory) -> tuple[Path, Path]:
    """An 80-layer GQA llama checkpoint made tiny, and our BF16 GGUF of it (what llama-quantize is given).
    One shape is enough here: the GGUF-input test above covers the shapes, this one the HF facts path."""
    d = tmp_path_factory.mktemp("hf80")
    model = fixtures_lib.build_streamed_llama(d / "llama80", hidden=256, intermediate=256, layers=80, heads=8,
                                              kv_heads=2, vocab=4096, shards=1)
    bf16 = d / "llama80-bf16.gguf"
    convert(str(model), ConvertOptions(file_type="BF16", output=bf16))
    return model, bf16


@pytest.mark.oracle
@pytest.mark.parametrize("ft", FILE_TYPE_NAMES)
def test_hf_input_types_match_llama_quantize(hf_llama80, tmp_path, ft):
    model, bf16 = hf_llama80
    ours = _check(model, bf16, ft, tmp_path)
    if ft == "Q3_K_S":
        assert _attn_v(ours) == {T.Q5_K}
