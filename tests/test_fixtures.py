"""The test fixtures are what they claim: the real model converted faithfully from its GGUF, synthetic
checkpoints that transformers loads, deterministic builds, and the prose texts."""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

TRICKY = [
    "Hello world 12345, it's   fine.\n\nOk",
    "Prices: $3.50 or 1,000,000 units; call 555-0199!",
    "naïve café, Ångström, 東京, emoji 😀 and tabs\tend",
    "def f(x):\n    return x ** 2  # they'll say I'm right\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
]

# ---------------------------------------------------------------- helpers


def _tensors(ckpt: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = fh.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()), f)
    return out


def _read(ckpt: Path, name: str) -> torch.Tensor:
    f = _tensors(ckpt)[name][2]
    with safe_open(str(f), "pt") as fh:
        return fh.get_tensor(name)


def _forward_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF -> GGUF row order of llama q/k (reference gguf.md §5), written here independently of the builder.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _files_digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


# ---------------------------------------------------------------- real model: config and weights


@pytest.fixture(scope="module")
def gguf_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def gguf_kv(gguf_reader, fixtures_lib):
    return fixtures_lib.gguf_fields(gguf_reader)


def test_smollm2_files_and_config(smollm2_dir, gguf_kv):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):  # fmt: skip
        assert (smollm2_dir / name).is_file(), name
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expect = {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192, "head_dim": 64,
        "rope_theta": 100000, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2,
    }  # fmt: skip
    assert {k: cfg[k] for k in expect} == expect
    assert gguf_kv["llama.rope.freq_base"] == cfg["rope_theta"]
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_smollm2_tensors_are_bf16_and_tied(smollm2_dir, gguf_reader):
    tensors = _tensors(smollm2_dir)
    assert "lm_head.weight" not in tensors  # tied: llama.cpp found no output.weight either
    assert "output.weight" not in {t.name for t in gguf_reader.tensors}
    assert len(tensors) == len(gguf_reader.tensors) == 2 + 30 * 9
    assert {dtype for dtype, _, _ in tensors.values()} == {"BF16"}
    assert tensors["model.embed_tokens.weight"][1] == (49152, 576)
    assert tensors["model.layers.7.self_attn.k_proj.weight"][1] == (192, 576)
    assert tensors["model.layers.7.mlp.down_proj.weight"][1] == (576, 1536)


@pytest.mark.parametrize(
    "gguf_name, hf_name, n_head",
    [
        ("token_embd.weight", "model.embed_tokens.weight", None),  # Q8_0
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),  # Q4_1, permuted
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3),
        ("blk.29.attn_q.weight", "model.layers.29.self_attn.q_proj.weight", 9),
        ("blk.13.attn_k.weight", "model.layers.13.self_attn.k_proj.weight", 3),
        ("blk.13.attn_v.weight", "model.layers.13.self_attn.v_proj.weight", None),
        ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight", None),
        ("blk.5.ffn_gate.weight", "model.layers.5.mlp.gate_proj.weight", None),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", None),  # F32
        ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ],
)
def test_smollm2_weights_equal_gguf_py_dequantization(smollm2_dir, gguf_reader, gguf_name, hf_name, n_head):
    t = next(t for t in gguf_reader.tensors if t.name == gguf_name)
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    hf = _read(smollm2_dir, hf_name).float().numpy()
    if n_head is not None:  # redo the HF -> GGUF permutation on the HF weight
        hf = _forward_permute(hf, n_head)
    ref_bf16 = torch.from_numpy(np.array(ref)).to(torch.bfloat16).float().numpy()
    assert hf.shape == ref.shape
    np.testing.assert_array_equal(hf, ref_bf16)
    assert np.abs(hf - ref).max() <= np.abs(ref).max() * 2**-8  # bf16 rounding only


def test_q_projection_is_not_left_in_gguf_order(smollm2_dir, gguf_reader):
    # Guards the test above against a permutation that is the identity on these shapes.
    t = next(t for t in gguf_reader.tensors if t.name == "blk.0.attn_q.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    hf = _read(smollm2_dir, "model.layers.0.self_attn.q_proj.weight").float().numpy()
    assert np.abs(hf - ref).max() > 0.01


# ---------------------------------------------------------------- real model: behaviour


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_generates_sensible_english(smollm2_dir, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = smollm2_tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_tokenizer_layout(smollm2_dir, gguf_kv):
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text())
    assert tj["normalizer"] is None
    assert tj["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    assert tj["decoder"]["type"] == "ByteLevel" and tj["model"]["type"] == "BPE"
    vocab = tj["model"]["vocab"]
    assert [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == gguf_kv["tokenizer.ggml.tokens"]
    assert [" ".join(m) for m in tj["model"]["merges"]] == gguf_kv["tokenizer.ggml.merges"]
    specials = {t["id"]: t["content"] for t in tj["added_tokens"] if t["special"]}
    assert specials[0] == "<|endoftext|>" and specials[1] == "<|im_start|>" and specials[2] == "<|im_end|>"
    assert len(specials) == 17

    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == gguf_kv["tokenizer.chat_template"]
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tc["model_max_length"] == 8192


def test_smollm2_tokenizer_round_trip(smollm2_dir, smollm2_tokenizer, eval_text):
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    text = eval_text.read_text(encoding="utf-8")[:30000]
    for s in [*TRICKY, text]:
        assert raw.decode(raw.encode(s).ids, skip_special_tokens=False) == s
    # transformers 5 loads tokenizer_class GPT2Tokenizer (as in SmolLM2's own files) with a plain ByteLevel
    # pre-tokenizer, dropping Digits: "   2" then splits as "  " + " 2" instead of "   " + "2". Everywhere
    # else it must agree with tokenizer.json and add no BOS.
    no_digits = regex.sub(r"\p{N}", "", text)
    assert smollm2_tokenizer(no_digits)["input_ids"] == raw.encode(no_digits).ids
    assert smollm2_tokenizer(TRICKY[4])["input_ids"] == raw.encode(TRICKY[4]).ids
    assert smollm2_tokenizer.bos_token_id == 1 and smollm2_tokenizer.eos_token_id == 2
    assert smollm2_tokenizer.pad_token_id == 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class _ReferenceBpe:
    """Plain byte-level BPE over the GGUF's own tokens and merges, with SmolLM2's pre-tokenization
    (single digits, then the GPT-2 regex)."""

    GPT2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def __init__(self, tokens: list[str], merges: list[str]):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()

    @functools.cache  # noqa: B019 - one instance per test
    def word(self, piece: str) -> tuple[int, ...]:
        parts = [self.byte_map[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [
                (self.ranks.get((a, b), 1 << 30), i)
                for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.ids[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in regex.split(r"(\p{N})", text):
            for piece in self.GPT2.findall(chunk):
                out += self.word(piece)
        return out


def test_smollm2_tokenizer_matches_reference_bpe(smollm2_dir, gguf_kv, eval_text):
    ref = _ReferenceBpe(gguf_kv["tokenizer.ggml.tokens"], gguf_kv["tokenizer.ggml.merges"])
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    text = eval_text.read_text(encoding="utf-8")[:20000]
    for s in [*TRICKY[:4], text]:
        assert raw.encode(s).ids == ref.encode(s), s[:40]


def test_smollm2_tokenizer_matches_llama_cpp(smollm2_dir, smollm2_gguf, eval_text):
    import llama_cpp  # the oracle wheel (make dev); missing means this test fails

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    raw = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    text = eval_text.read_text(encoding="utf-8")[:20000]
    for s in [*TRICKY, text]:
        assert llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) == raw.encode(s).ids, s[:40]


# ---------------------------------------------------------------- synthetic checkpoints

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}  # fmt: skip


def test_arch_list_matches_builder(fixtures_lib):
    assert list(fixtures_lib.ARCHS) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_loads_and_gives_finite_logits(synthetic_dir, arch):
    d = synthetic_dir(arch)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [CLASSES[arch]]
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0
    assert cfg["num_key_value_heads"] == 2 < cfg["num_attention_heads"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64 == cfg.get("head_dim", 64)
    assert cfg["tie_word_embeddings"] is True
    tensors = _tensors(d)
    assert {dtype for dtype, _, _ in tensors.values()} == {"BF16"}
    assert "lm_head.weight" not in tensors
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) < 12 * 2**20

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == CLASSES[arch] and model.dtype == torch.bfloat16
    text = TRICKY[0] + " The parser dispatches to sub-parsers."
    ids = tok(text, return_tensors="pt")["input_ids"]
    # transformers must tokenize like tokenizer.json (it re-derives some pre-tokenizers from model_type)
    assert ids[0].tolist() == Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert torch.isfinite(logits).all() and logits.float().std() > 0.1


_QWEN_EXPERTS = ("mlp.experts.{x}.{p}.weight", ("gate_proj", "up_proj", "down_proj"))
MOE_ARCHS = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", *_QWEN_EXPERTS), "olmoe": ("OlmoeForCausalLM", *_QWEN_EXPERTS),
    "qwen2_moe": ("Qwen2MoeForCausalLM", *_QWEN_EXPERTS),
    "mixtral": ("MixtralForCausalLM", "block_sparse_moe.experts.{x}.{p}.weight", ("w1", "w2", "w3")),
    "deepseek_v3": ("DeepseekV3ForCausalLM", *_QWEN_EXPERTS),
    "glm4_moe": ("Glm4MoeForCausalLM", *_QWEN_EXPERTS),
}


def test_moe_arch_list_matches_builder(fixtures_lib):
    assert list(fixtures_lib.MOE_ARCHS) == list(MOE_ARCHS)
    assert ("qwen3_moe", False, True) in fixtures_lib.synthetic_variants()  # make fixtures builds them


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_synthetic_has_hub_layout_and_runs(synthetic_dir, arch):
    """One Linear per expert under its hub name (what save_pretrained writes), widths that fit K-quants,
    enough experts for llama-quantize's n_expert rules; transformers loads it and routes tokens around."""
    cls, pattern, projs = MOE_ARCHS[arch]
    d = synthetic_dir(arch)
    cfg = json.loads((d / "config.json").read_text())
    n = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]
    assert cfg["architectures"] == [cls] and n >= 4 and cfg["num_experts_per_tok"] < n
    expert_ff = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    assert cfg["hidden_size"] % 256 == 0 and expert_ff % 256 == 0
    tensors = _tensors(d)
    for layer in range(cfg.get("first_k_dense_replace", 0), cfg["num_hidden_layers"]):
        for x in range(n):
            for proj in projs:
                assert f"model.layers.{layer}." + pattern.format(x=x, p=proj) in tensors
    assert not [k for k in tensors if k.endswith(("gate_up_proj", "experts.down_proj"))]  # nothing fused
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.tensor([list(range(5, 69))])
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert torch.isfinite(out.logits).all() and out.logits.float().std() > 0.1
    chosen = out.router_logits[0].float().topk(cfg["num_experts_per_tok"], dim=-1).indices.unique()
    assert len(chosen) >= n // 2  # the seeded router spreads tokens over the experts


def test_synthetic_weights_are_shaped_not_default_init(synthetic_dir):
    d = synthetic_dir("llama")
    norm = _read(d, "model.layers.0.input_layernorm.weight").float()
    assert 0.7 < norm.mean() < 1.3 and norm.std() > 0.05  # near 1, not all ones
    w = _read(d, "model.layers.1.mlp.down_proj.weight").float()
    col = w.abs().mean(dim=0)
    assert col.max() / col.median() > 3  # some input channels stand out
    gemma_norm = _read(synthetic_dir("gemma"), "model.norm.weight").float()
    assert gemma_norm.abs().mean() < 0.3  # Gemma norms multiply by (1 + w)
    bias = _read(synthetic_dir("qwen2"), "model.layers.0.self_attn.q_proj.bias").float()
    assert bias.abs().max() > 0


def test_synthetic_arches_differ(synthetic_dir):
    a = _read(synthetic_dir("llama"), "model.layers.0.self_attn.q_proj.weight")
    b = _read(synthetic_dir("mistral"), "model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(a, b)


def test_sharded_index_is_consistent(synthetic_dir):
    d = synthetic_dir("llama", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (d / "model.safetensors").exists()
    assert all(f.name.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    tensors = _tensors(d)
    assert index["weight_map"] == {name: f.name for name, (_, _, f) in tensors.items()}
    sizes = {"BF16": 2}
    total = sum(sizes[dt] * int(np.prod(shape)) for dt, shape, _ in tensors.values())
    assert index["metadata"]["total_size"] == total
    # same seed as the single-file llama: the same tensors, only split
    single = synthetic_dir("llama")
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(_read(d, name), _read(single, name))
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_untied_variant_has_lm_head(synthetic_dir):
    d = synthetic_dir("llama", tied=False)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    lm_head, embed = _read(d, "lm_head.weight"), _read(d, "model.embed_tokens.weight")
    assert lm_head.shape == embed.shape and not torch.equal(lm_head, embed)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert torch.equal(model.lm_head.weight.data, lm_head)


def test_synthetic_build_is_deterministic(fixtures_lib, synthetic_dir, tmp_path):
    cached = synthetic_dir("qwen3")
    for i in range(2):
        fixtures_lib._build_synthetic("qwen3", False, True, fixtures_lib.synthetic_seed("qwen3"))(
            tmp_path / str(i)
        )
    assert _files_digest(tmp_path / "0") == _files_digest(tmp_path / "1") == _files_digest(cached)


def test_tokenizer_training_is_deterministic(fixtures_lib, tmp_path):
    fixtures_lib._train_tokenizer("smollm")(tmp_path / "a")
    cached = fixtures_lib.synthetic_tokenizer_dir("smollm")
    assert _files_digest(tmp_path / "a") == _files_digest(cached)
    assert Tokenizer.from_file(str(cached / "tokenizer.json")).get_vocab_size() == 4096


# ---------------------------------------------------------------- the streamed (benchmark) llama


def test_streamed_llama_tiny(fixtures_lib, tmp_path):
    out = fixtures_lib.build_streamed_llama(
        tmp_path / "tiny", hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=512, shards=2
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _tensors(out)
    assert len({f for _, _, f in tensors.values()}) == 2
    assert index["weight_map"] == {name: f.name for name, (_, _, f) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for _, s, _ in tensors.values())
    assert tensors["model.layers.2.self_attn.k_proj.weight"][1] == (64, 128)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight.data, _read(out, "lm_head.weight"))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    again = fixtures_lib.build_streamed_llama(
        tmp_path / "again", hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=512, shards=2
    )
    assert _files_digest(out) == _files_digest(again)


def test_bench_1b_shape_plan(fixtures_lib):
    shapes = fixtures_lib._llama_tensor_shapes(2048, 5632, 22, 32, 4, 32000)
    n = sum(int(np.prod(s)) for _, s in shapes)
    assert 1.0e9 < n < 1.2e9
    shards = fixtures_lib._split_shards(shapes, 2)
    sizes = [sum(int(np.prod(s)) for _, s in group) for group in shards]
    assert len(shards) == 2 and abs(sizes[0] - sizes[1]) < 0.1 * n
    assert [name for group in shards for name, _ in group] == [name for name, _ in shapes]


# ---------------------------------------------------------------- texts


def test_calib_and_eval_text(fixtures_lib, calib_text, eval_text, smollm2_dir):
    calib = calib_text.read_text(encoding="utf-8")
    held_out = eval_text.read_text(encoding="utf-8")
    assert len(calib) >= 300_000 and len(held_out) >= 60_000
    assert set(fixtures_lib.CALIB_MODULES).isdisjoint(fixtures_lib.EVAL_MODULES)
    shared = set(calib.split("\n\n")) & set(held_out.split("\n\n"))
    assert all(len(p) < 40 for p in shared), shared  # headings such as "Usage:" at most
    assert calib == fixtures_lib.fresh_docstring_text("calib")  # deterministic, cache current
    assert held_out == fixtures_lib.fresh_docstring_text("eval")
    assert "Work out which source or compiled file" in calib  # inspect.getfile's own, not torch's
    words = regex.findall(r"\p{L}+", calib.lower())
    common = {w for w, _ in collections.Counter(words).most_common(10)}
    assert {"the", "is", "of", "to"} <= common  # English prose
    n_tokens = len(Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(calib).ids)
    assert n_tokens >= 64 * 512 + 16 * 512  # calibration plus evaluation chunks


# ---------------------------------------------------------------- cache plumbing and the oracle


def test_ensure_builds_atomically_and_rebuilds_stale(fixtures_lib, tmp_path):
    target = tmp_path / "artefact"
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "data").write_text(str(len(calls)))

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        fixtures_lib.ensure(target, "r1", broken)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    assert fixtures_lib.ensure(target, "r1", build) == target and (target / "data").read_text() == "1"
    fixtures_lib.ensure(target, "r1", build)
    assert len(calls) == 1  # present and current: not rebuilt
    fixtures_lib.ensure(target, "r2", build)
    assert len(calls) == 2 and (target / "data").read_text() == "2"  # stale recipe: rebuilt
    (tmp_path / ".artefact.recipe").unlink()
    fixtures_lib.ensure(target, "r2", build)
    assert len(calls) == 3  # no stamp (a build cut short before stamping): rebuilt


def test_cache_root_follows_env(fixtures_lib, monkeypatch, tmp_path):
    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path))
    assert fixtures_lib.fixtures_root() == tmp_path / "fixtures"
    monkeypatch.delenv("QCONVERT_CACHE")
    assert fixtures_lib.cache_root() == Path.home() / ".cache" / "qconvert"


def test_command_line_rejects_unknown_target(fixtures_lib, capsys):
    assert fixtures_lib.main(["nonsense"]) == 2
    assert "usage" in capsys.readouterr().err


def test_oracle_is_installed(fixtures_lib, monkeypatch):
    fixtures_lib.ensure_oracle()  # installs it if `make dev` has not
    assert fixtures_lib.oracle_installed()
    import llama_cpp

    assert llama_cpp.__version__ == fixtures_lib.ORACLE_VERSION

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ensure_oracle ran {args} although the oracle is installed")

    monkeypatch.setattr(fixtures_lib.subprocess, "run", no_subprocess)
    fixtures_lib.ensure_oracle()  # idempotent: nothing to do


def _fake_pip(calls: list[list[str]]):
    def run(cmd, check, env=None):
        calls.append(cmd)
        if cmd[3] == "wheel":  # pretend to build: drop a wheel into the -w dir
            out = Path(cmd[cmd.index("-w") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
            assert env["CMAKE_BUILD_PARALLEL_LEVEL"] == "2"
            assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=OFF"  # portable: no AMX matmul path

    return run


def test_oracle_builds_wheel_once_then_installs(fixtures_lib, monkeypatch, tmp_path):
    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path))
    monkeypatch.delenv("CMAKE_BUILD_PARALLEL_LEVEL", raising=False)
    installed = iter([False, True, False, True])
    monkeypatch.setattr(fixtures_lib, "oracle_installed", lambda: next(installed))
    marker = tmp_path / "site" / ".qconvert-build"
    marker.parent.mkdir()
    monkeypatch.setattr(fixtures_lib, "_oracle_marker", lambda: marker)
    calls: list[list[str]] = []
    monkeypatch.setattr(fixtures_lib.subprocess, "run", _fake_pip(calls))
    wheels_dir = tmp_path / "wheels" / fixtures_lib.ORACLE_BUILD
    (wheels_dir / ".build-1").mkdir(parents=True)  # left by a killed build
    fixtures_lib.ensure_oracle()
    assert [c[3] for c in calls] == ["wheel", "install"]
    assert "llama-cpp-python==0.3.36" in calls[0] and "--no-cache-dir" in calls[0]
    wheel = wheels_dir / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    assert calls[1][-1] == str(wheel) and "--no-deps" in calls[1]
    assert sorted(p.name for p in wheels_dir.iterdir() if not p.name.endswith(".lock")) == [wheel.name]
    assert marker.read_text().strip() == fixtures_lib.ORACLE_BUILD
    fixtures_lib.ensure_oracle()  # wheel cached, not installed (a new venv): install only
    assert [c[3] for c in calls] == ["wheel", "install", "install"]
