"""`qconvert convert --to gguf` end to end, against llama.cpp (llama-cpp-python 0.3.36) and transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from qconvert.cli.convert import convert_command
from qconvert.errors import BadInput
from qconvert.formats.gguf.imatrix import Imatrix, write_imatrix_gguf
from qconvert.pipelines.convert import ConvertOptions, convert
from tests.helpers import TOKENS, hf_logits, llama_logits, open_llama, tensor_bytes
from tests.oracle.llamacpp import model_quantize

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
TEXT = "Hello world! The 3 quick brown foxes jumped over 1234 lazy dogs, didn't they?\n  Indented."


def _convert(model, out: Path, file_type: str, **kw) -> Path:
    convert(str(model), ConvertOptions(file_type=file_type, output=out, **kw))
    return out


def _assert_same_file(ours: Path, ref: Path) -> None:
    a, b = tensor_bytes(ours), tensor_bytes(ref)
    assert list(a) == list(b), "tensor order differs"
    bad = [n for n in a if a[n] != b[n]]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"
    assert ours.read_bytes() == ref.read_bytes(), "tensors equal but header (KV) differs"


# ---------------------------------------------------------------- every architecture vs transformers

@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_gguf_matches_transformers(arch, synthetic_dir, tmp_path):
    model = synthetic_dir(arch)
    # llama.cpp looks up </s>, <s>, <unk> in any model *named* phi3; our synthetic vocabulary has none of them
    rename = ["general.name=str:tiny synthetic"] if arch == "phi3" else []
    out = _convert(model, tmp_path / f"{arch}.gguf", "BF16", override_kv=rename)
    ref = hf_logits(model, TOKENS)
    got = llama_logits(out, TOKENS)
    assert got.shape == ref.shape
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.03 * scale, f"{arch}: max |Δlogit| {np.abs(got - ref).max():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    # the tokenizer llama.cpp rebuilt from our KVs splits text like the checkpoint's own tokenizer.json
    from tokenizers import Tokenizer

    llm = open_llama(out)
    want = Tokenizer.from_file(str(model / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == want
    llm.close()


def test_sentencepiece_tokenizer_export(synthetic_dir, calib_text, tmp_path):
    """A tokenizer.model (SentencePiece BPE with byte fallback, as Gemma ships) becomes model "llama"."""
    import sentencepiece as spm

    model = tmp_path / "gemma"
    shutil.copytree(synthetic_dir("gemma"), model)
    spm.SentencePieceTrainer.train(
        input=str(calib_text), model_prefix=str(model / "tokenizer"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=2, eos_id=1, unk_id=3, pad_id=0, input_sentence_size=20000,
        minloglevel=2)
    out = _convert(model, tmp_path / "g.gguf", "BF16")
    kv = gguf.GGUFReader(out).fields
    assert kv["tokenizer.ggml.model"].contents() == "llama"
    assert kv["tokenizer.ggml.pre"].contents() == "default"
    assert len(kv["tokenizer.ggml.scores"].contents()) == 4096  # padded to the embedding's vocab_size
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    llm = open_llama(out)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == sp.encode(TEXT)
    llm.close()


def test_f16_untied_llama_matches_transformers(synthetic_dir, tmp_path):
    model = synthetic_dir("llama", tied=False)
    out = _convert(model, tmp_path / "u.gguf", "F16")
    assert "output.weight" in tensor_bytes(out)
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


# ---------------------------------------------------------------- SmolLM2: byte-identical to llama-quantize

@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_dir, tmp_path_factory) -> Path:
    return _convert(smollm2_dir, tmp_path_factory.mktemp("smol") / "smol-BF16.gguf", "BF16")


def test_smollm2_q4_k_m_is_llama_quantize_of_our_bf16(smollm2_dir, smollm2_bf16, tmp_path):
    ours = _convert(smollm2_dir, tmp_path / "ours.gguf", "Q4_K_M", threads=2)
    ref = tmp_path / "ref.gguf"
    model_quantize(smollm2_bf16, ref, FT.MOSTLY_Q4_K_M)
    _assert_same_file(ours, ref)
    kv = gguf.GGUFReader(ours).fields
    assert kv["tokenizer.ggml.pre"].contents() == "smollm"
    # greedy generation of our file equals llama.cpp's own Q4_K_M of our BF16
    texts = []
    for path in (ours, ref):
        llm = open_llama(path)
        texts.append(llm("The capital of France is", max_tokens=16, temperature=0.0)["choices"][0]["text"])
        llm.close()
    assert texts[0] == texts[1] and len(texts[0]) > 0


def test_bf16_is_a_fixed_point_of_llama_quantize(smollm2_bf16, tmp_path):
    ref = tmp_path / "ref.gguf"
    model_quantize(smollm2_bf16, ref, FT.MOSTLY_BF16)
    _assert_same_file(smollm2_bf16, ref)


def test_gguf_input_is_a_drop_in_for_llama_quantize(synthetic_dir, tmp_path):
    bf16 = _convert(synthetic_dir("llama", tied=False), tmp_path / "bf16.gguf", "BF16")
    for file_type in ("Q4_K_M", "Q8_0"):
        ours = _convert(bf16, tmp_path / f"ours-{file_type}.gguf", file_type)
        ref = tmp_path / f"ref-{file_type}.gguf"
        model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")))
        _assert_same_file(ours, ref)


# ---------------------------------------------------------------- llama-quantize flags

def _imatrix_for(gguf_path: Path) -> Imatrix:
    rng = np.random.default_rng(0)
    entries = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            entries[t.name] = (rng.gamma(2.0, 1.0, (1, int(t.shape[0]))).astype(np.float32) * 50,
                               np.array([50.0], np.float32))
    return Imatrix(entries, datasets=["calib.txt"], chunk_count=50, chunk_size=512)


FLAG_CASES = {
    "pure": ({"pure": True}, {"pure": True}),
    "tensor_type": ({"tensor_types": ["attn_v=q8_0", r"ffn_down\.weight=q5_K"]},
                    {"tensor_types": [("attn_v", int(Q.Q8_0)), (r"ffn_down\.weight", int(Q.Q5_K))]}),
    "output_types": ({"output_tensor_type": "q8_0", "token_embedding_type": "q4_0"},
                     {"output_tensor_type": int(Q.Q8_0), "token_embedding_type": int(Q.Q4_0)}),
    "leave_output": ({"leave_output_tensor": True}, {"quantize_output_tensor": False}),
    "override_kv": ({"override_kv": ["general.name=str:renamed", "x.count=int:-7", "x.f=float:0.5",
                                     "x.b=bool:true"]},
                    {"kv_overrides": {"general.name": "renamed", "x.count": -7, "x.f": 0.5, "x.b": True}}),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flags_match_llama_quantize(case, synthetic_dir, tmp_path):
    ours_kw, ref_kw = FLAG_CASES[case]
    model = synthetic_dir("llama", tied=False)
    bf16 = _convert(model, tmp_path / "bf16.gguf", "BF16")
    ours = _convert(model, tmp_path / "ours.gguf", "Q4_K_M", **ours_kw)
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, FT.MOSTLY_Q4_K_M, **ref_kw)
    _assert_same_file(ours, ref)


# llama-quantize's low-bit file types (reference/gguf-lowbit.md §8; NVFP4 is none: it has no default type)
LOWBIT_FILE_TYPES = ["IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S",
                     "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q1_0", "Q2_0"]
# the ones llama-quantize writes without an imatrix (the others have IQ1/IQ2/IQ3_XXS tensors)
NO_IMATRIX_FILE_TYPES = ["IQ3_S", "IQ3_M", "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q1_0", "Q2_0"]


@pytest.mark.parametrize("file_type", NO_IMATRIX_FILE_TYPES)
def test_lowbit_file_types_match_llama_quantize(file_type, synthetic_dir, tmp_path):
    model = synthetic_dir("llama", tied=False)
    bf16 = _convert(model, tmp_path / "bf16.gguf", "BF16")
    ours = _convert(model, tmp_path / "ours.gguf", file_type, threads=2)
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")))
    _assert_same_file(ours, ref)


def test_mxfp4_moe_experts_match_llama_quantize(tmp_path):
    """The synthetic HF llama has no experts: MXFP4_MOE's MXFP4 stacks come from an 8-expert GGUF input."""
    from tests.formats.test_gguf_mixture import SPECS, build_model

    src = build_model(SPECS["moe8"], tmp_path / "moe8.gguf")
    ours = _convert(src, tmp_path / "ours.gguf", "MXFP4_MOE")
    ref = tmp_path / "ref.gguf"
    model_quantize(src, ref, FT.MOSTLY_MXFP4_MOE)
    _assert_same_file(ours, ref)
    types = {name: t for name, (t, _) in tensor_bytes(ours).items()}
    assert types["blk.0.ffn_down_exps.weight"] == Q.MXFP4 and types["blk.0.attn_q.weight"] == Q.Q8_0


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q2_K_S", "IQ4_XS", *LOWBIT_FILE_TYPES])
def test_imatrix_matches_llama_quantize(file_type, synthetic_dir, tmp_path):
    model = synthetic_dir("llama")
    bf16 = _convert(model, tmp_path / "bf16.gguf", "BF16")
    imx = _imatrix_for(bf16)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imx)
    ours = _convert(model, tmp_path / "ours.gguf", file_type, imatrix=tmp_path / "imatrix.gguf")
    ref = tmp_path / "ref.gguf"
    kvs = {"quantize.imatrix.file": str(tmp_path / "imatrix.gguf"), "quantize.imatrix.dataset": "calib.txt",
           "quantize.imatrix.entries_count": len(imx.entries), "quantize.imatrix.chunks_count": 50}
    weights = {n: imx.weights(n) for n in imx.entries}
    model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")), imatrix=weights, kv_overrides=kvs)
    _assert_same_file(ours, ref)


# ---------------------------------------------------------------- bad inputs

def test_q2_k_s_without_imatrix(synthetic_dir, tmp_path):
    with pytest.raises(BadInput, match="needs an importance matrix"):
        _convert(synthetic_dir("llama"), tmp_path / "o.gguf", "Q2_K_S")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("file_type", ["IQ2_XXS", "IQ1_M", "IQ3_XXS"])
def test_lowbit_without_imatrix_names_the_tensor_and_the_fix(file_type, synthetic_dir, tmp_path):
    with pytest.raises(BadInput, match=r"tensor blk\.0\.\S+ as IQ\S+ needs an importance matrix") as e:
        _convert(synthetic_dir("llama"), tmp_path / "o.gguf", file_type)
    assert "qconvert imatrix" in str(e.value) and "--imatrix" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_imatrix_size_mismatch(synthetic_dir, tmp_path):
    bad = Imatrix({"blk.0.attn_q.weight": (np.ones((1, 100), np.float32), np.ones(1, np.float32))},
                  datasets=["x"], chunk_count=1, chunk_size=512)
    write_imatrix_gguf(tmp_path / "bad.gguf", bad)
    with pytest.raises(BadInput, match="blk.0.attn_q.weight has 100 values"):
        _convert(synthetic_dir("llama"), tmp_path / "o.gguf", "Q4_K_M", imatrix=tmp_path / "bad.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_nan_weight_names_the_tensor(synthetic_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(synthetic_dir("llama"), model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert weights["model.layers.2.mlp.up_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(BadInput, match=r"model\.layers\.2\.mlp\.up_proj\.weight contains NaN"):
        _convert(model, tmp_path / "o.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_missing_output_directory(synthetic_dir, tmp_path):
    with pytest.raises(BadInput, match="output directory does not exist"):
        _convert(synthetic_dir("llama"), tmp_path / "no" / "o.gguf", "Q8_0")


def test_interrupt_leaves_no_partial_file(synthetic_dir, tmp_path):
    def stop(record, done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(synthetic_dir("llama")), ConvertOptions(file_type="Q8_0", output=tmp_path / "o.gguf"),
                stop)
    assert list(tmp_path.iterdir()) == []


def test_quantized_gguf_needs_allow_requantize(synthetic_dir, tmp_path):
    bf16 = _convert(synthetic_dir("llama"), tmp_path / "bf16.gguf", "BF16")
    q4_1 = tmp_path / "q4_1.gguf"
    model_quantize(bf16, q4_1, FT.MOSTLY_Q4_1)
    with pytest.raises(BadInput, match="--allow-requantize"):
        _convert(q4_1, tmp_path / "o.gguf", "Q4_K_M")
    assert not (tmp_path / "o.gguf").exists()
    ours = _convert(q4_1, tmp_path / "ours.gguf", "Q4_K_M", allow_requantize=True)
    ref = tmp_path / "ref.gguf"
    model_quantize(q4_1, ref, FT.MOSTLY_Q4_K_M, allow_requantize=True)
    _assert_same_file(ours, ref)


def test_phi3_name_without_its_tokens_is_refused(synthetic_dir, tmp_path):
    with pytest.raises(BadInput, match="--override-kv general.name"):
        _convert(synthetic_dir("phi3"), tmp_path / "o.gguf", "BF16")
    assert list(tmp_path.iterdir()) == []


def test_bad_options(synthetic_dir, tmp_path):
    model = synthetic_dir("llama")
    for kw, msg in [({"override_kv": ["k=int:x"]}, "not a int"),
                    ({"override_kv": ["novalue"]}, "KEY=TYPE:VALUE"),
                    ({"tensor_types": ["attn_v=q9_9"]}, "unknown tensor type"),
                    ({"pre_tokenizer": "nope"}, "not a name llama.cpp knows")]:
        with pytest.raises(BadInput, match=msg):
            _convert(model, tmp_path / "o.gguf", "Q8_0", **kw)
    with pytest.raises(BadInput, match="unknown GGUF file type"):
        _convert(model, tmp_path / "o.gguf", "Q4_K_X")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CLI

def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("convert")(convert_command)
    app.command("noop")(lambda: None)  # two commands: keep `convert` as a subcommand
    return app


def test_dry_run_prints_plan_writes_nothing(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["convert", str(synthetic_dir("llama")), "--type", "q4_k_m", "--dry-run"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "blk.0.attn_v.weight" in res.output and "Q6_K" in res.output and "bits per weight" in res.output
    assert list(tmp_path.iterdir()) == []


def test_default_output_name(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_app(), ["convert", str(synthetic_dir("qwen3")), "--type", "Q8_0"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3-Q8_0.gguf"]
    assert json.loads(json.dumps(gguf.GGUFReader(tmp_path / "qwen3-Q8_0.gguf").fields["general.file_type"]
                                 .contents())) == int(FT.MOSTLY_Q8_0)


def test_phi3_long_rope_factors_match_transformers(synthetic_dir, tmp_path):
    """phi3 128k-style rope: rope_factors_long/short tensors, the attention factor right after
    general.architecture (where convert_hf_to_gguf.py adds it), and llama.cpp's logits = transformers'."""
    import math

    model = tmp_path / "phi3-long"
    shutil.copytree(synthetic_dir("phi3"), model)
    cfg = json.loads((model / "config.json").read_text())
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    short = [1.0 + 0.05 * i for i in range(half)]
    long = [2.0 + 0.5 * i for i in range(half)]
    cfg["max_position_embeddings"] = 4 * cfg["original_max_position_embeddings"]
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": "longrope", "short_factor": short,
                              "long_factor": long}
    (model / "config.json").write_text(json.dumps(cfg))
    out = _convert(model, tmp_path / "long.gguf", "F32", override_kv=["general.name=str:tiny synthetic"])
    r = gguf.GGUFReader(out)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert np.array_equal(tensors["rope_factors_short.weight"], np.asarray(short, dtype=np.float32))
    assert np.array_equal(tensors["rope_factors_long.weight"], np.asarray(long, dtype=np.float32))
    keys = list(r.fields)
    assert keys[keys.index("general.architecture") + 1] == "phi3.rope.scaling.attn_factor"
    attn = float(r.fields["phi3.rope.scaling.attn_factor"].contents())
    orig = cfg["original_max_position_embeddings"]
    assert attn == pytest.approx(math.sqrt(1 + math.log(4) / math.log(orig)))
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max()
    # without the short factors llama.cpp would compute other logits: the comparison has teeth
    cfg["rope_parameters"]["short_factor"] = [1.0] * half
    (model / "config.json").write_text(json.dumps(cfg))
    plain = _convert(model, tmp_path / "plain.gguf", "F32", override_kv=["general.name=str:tiny synthetic"])
    assert np.abs(llama_logits(plain, TOKENS) - ref).max() > 0.01 * np.abs(ref).max()


def test_config_recipe_equals_the_same_flags(synthetic_dir, tmp_path):
    """--config configs/gguf/example-recipe.yaml writes the very file its flags write (the flags themselves
    are held to llama-quantize by test_flags_match_llama_quantize)."""
    recipe = Path(__file__).resolve().parents[2] / "configs" / "gguf" / "example-recipe.yaml"
    model = synthetic_dir("llama", tied=False)
    by_config = _convert(model, tmp_path / "config.gguf", None, config=recipe)
    by_flags = _convert(model, tmp_path / "flags.gguf", "Q4_K_M", output_tensor_type="q8_0",
                        token_embedding_type="q8_0",
                        tensor_types=[r"attn_v\.weight$=q6_k", r"^blk\.(0|1)\.ffn_down=q8_0"])
    assert by_config.read_bytes() == by_flags.read_bytes()
    types = {name: t for name, (t, _) in tensor_bytes(by_config).items()}
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0 and types["blk.2.attn_v.weight"] == Q.Q6_K
    assert types["output.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q8_0


def test_llama_hf_tokenizer_export(synthetic_dir, calib_text, tmp_path):
    """A llama checkpoint with only tokenizer.json (byte-fallback BPE + Metaspace, what transformers saves
    for Llama-2-style tokenizers) goes through gguf-py's LlamaHfVocab: model "llama", the vocabulary padded
    to the embedding rows, loadable by llama.cpp, text round-trips. (LlamaHfVocab gives every piece the same
    score, so llama.cpp's split can differ from the source tokenizer's — as with convert_hf_to_gguf.py.)"""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(calib_text), model_prefix=str(spm_dir / "tokenizer"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, input_sentence_size=20000, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    model = tmp_path / "llama-hf"
    shutil.copytree(synthetic_dir("llama"), model)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        (model / f).unlink(missing_ok=True)
    # tokenizer.json as transformers' LlamaConverter builds it: the SentencePiece pieces as a byte-fallback
    # BPE whose merges are every split of a piece into two pieces, ranked by the merged piece
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(pairs, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(str(model))
    assert not (model / "tokenizer.model").exists()
    out = _convert(model, tmp_path / "hf.gguf", "BF16")
    kv = gguf.GGUFReader(out).fields
    assert kv["tokenizer.ggml.model"].contents() == "llama"
    assert kv["tokenizer.ggml.bos_token_id"].contents() == 1
    llm = open_llama(out)
    pieces = kv["tokenizer.ggml.tokens"].contents()
    assert len(pieces) == 4096 and pieces[:1000] == [sp.id_to_piece(i) for i in range(1000)]
    assert pieces[1000:] == [f"[PAD{i}]" for i in range(1000, 4096)]
    text = TEXT + " ü€"  # byte fallback for characters the vocabulary lacks
    got = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert max(got) < 1000 and llm.detokenize(got).decode().lstrip(" ") == text
    llm.close()
