"""GGUF export pieces without llama.cpp: pre-tokenizer detection, header, writer (the architecture table:
tests/arch)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.arch.table import resolve
from qconvert.errors import BadInput, IOFailure
from qconvert.formats.gguf.metadata import build_header, tokenizer_kvs
from qconvert.formats.gguf.tokenizer import check_pre_tokenizer_name, detect_pre_tokenizer
from qconvert.formats.gguf.writer import GGUFOutput, write_gguf
from qconvert.load import open_checkpoint

V = gguf.GGUFValueType
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_bytelevel(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


# ---------------------------------------------------------------- pre-tokenizer

def test_smollm2_tokenizer_is_smollm(smollm2_dir):
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text())
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert detect_pre_tokenizer(tj, cfg) == "smollm"
    # same split rules, but a tokenizer that cleans up spaces when decoding is llama.cpp's starcoder
    assert detect_pre_tokenizer(tj, {**cfg, "clean_up_tokenization_spaces": True}) == "starcoder"


def test_qwen2_style_tokenizer_is_qwen2(synthetic_dir):
    tj = json.loads((synthetic_dir("qwen2") / "tokenizer.json").read_text())
    assert tj["normalizer"]["type"] == "NFC"
    assert detect_pre_tokenizer(tj) == "qwen2"


def test_structural_signatures():
    assert detect_pre_tokenizer({"pre_tokenizer": _split_bytelevel(LLAMA3_RE)}) == "llama-bpe"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert detect_pre_tokenizer({"pre_tokenizer": gpt2}) == "gpt-2"
    # unknown: a different regex, a prefix space, a lower-casing normalizer, no byte-level step
    assert detect_pre_tokenizer({"pre_tokenizer": _split_bytelevel(r"\w+|\s+")}) is None
    assert detect_pre_tokenizer({"pre_tokenizer": {**gpt2, "add_prefix_space": True}}) is None
    assert detect_pre_tokenizer({"pre_tokenizer": gpt2, "normalizer": {"type": "Lowercase"}}) is None
    assert detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}) is None


def test_unknown_pre_tokenizer_fails_with_override_hint(smollm2_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(smollm2_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((model / "config.json").read_text())
    spec = resolve(cfg)
    with pytest.raises(BadInput, match="--pre-tokenizer"):
        tokenizer_kvs(spec, cfg, model)
    t, info = tokenizer_kvs(spec, cfg, model, pre_tokenizer="smollm")
    assert info.pre == "smollm" and t.kv()["tokenizer.ggml.pre"].value == "smollm"
    with pytest.raises(BadInput, match="not a name llama.cpp knows"):
        check_pre_tokenizer_name("no-such-pre")


# ---------------------------------------------------------------- header

def test_smollm2_header(smollm2_dir):
    ckpt = open_checkpoint(smollm2_dir)
    cfg = ckpt.config
    spec = resolve(cfg)
    tok, info = tokenizer_kvs(spec, cfg, smollm2_dir)
    w = build_header(spec, cfg, smollm2_dir, ckpt.name, 134_515_008, tok)
    w.finalize_kv(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    kv = w.kv()
    keys = list(kv)
    assert keys[0] == "general.architecture" and kv["general.architecture"].value == "llama"
    assert keys[-2:] == ["general.quantization_version", "general.file_type"]
    assert kv["general.file_type"].value == 15
    assert kv["tokenizer.ggml.model"].value == "gpt2" and kv["tokenizer.ggml.pre"].value == "smollm"
    assert kv["tokenizer.ggml.add_bos_token"].value is False  # the converter's 49152-vocab rule
    assert len(kv["tokenizer.ggml.tokens"].value) == 49152 and len(kv["tokenizer.ggml.merges"].value) > 40000
    assert kv["llama.rope.dimension_count"].value == 64 and kv["llama.attention.head_count_kv"].value == 3
    assert kv["general.size_label"].value == "135M"
    assert "tokenizer.chat_template" in kv and info.n_tokens == 49152


def test_set_value_moves_key_to_end_add_keeps_position():
    w = GGUFOutput("llama")
    w.add_uint32("a", 1)
    w.add_uint32("b", 2)
    w.add_uint32("a", 3)
    assert list(w.kv()) == ["general.architecture", "a", "b"] and w.kv()["a"].value == 3
    w.set_value("a", 4, V.UINT32)
    assert list(w.kv()) == ["general.architecture", "b", "a"]
    w.add_uint16("split.count", 2)
    w.finalize_kv(7, [("b", "x", V.STRING)])
    assert list(w.kv()) == ["general.architecture", "a", "general.quantization_version", "general.file_type",
                            "b"]


# ---------------------------------------------------------------- writer

def _tiny_output() -> GGUFOutput:
    w = GGUFOutput("llama")
    w.add_planned_tensor("a.weight", (32, 2), gguf.GGMLQuantizationType.F32)
    w.add_planned_tensor("b.weight", (64,), gguf.GGMLQuantizationType.F16)
    return w


def test_writer_layout_roundtrip(tmp_path):
    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    b = np.linspace(-1, 1, 64).astype(np.float16)
    out = tmp_path / "t.gguf"
    write_gguf(_tiny_output(), out, iter([a, b]))
    r = gguf.GGUFReader(out)
    assert [t.name for t in r.tensors] == ["a.weight", "b.weight"]
    assert np.array_equal(np.asarray(r.tensors[0].data), a)
    assert np.array_equal(np.asarray(r.tensors[1].data), b)
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    assert list(tmp_path.iterdir()) == [out]


def test_writer_error_leaves_nothing(tmp_path):
    out = tmp_path / "t.gguf"

    def failing():
        yield np.zeros((2, 32), np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(_tiny_output(), out, failing())
    assert list(tmp_path.iterdir()) == []


def test_writer_disk_full_is_one_line_io_failure(tmp_path):
    def full():
        yield np.zeros((2, 32), np.float32)
        raise OSError(errno.ENOSPC, "No space left on device")

    message = r"cannot write GGUF file: No space left on device \(partial output removed\)"
    with pytest.raises(IOFailure, match=message) as e:
        write_gguf(_tiny_output(), tmp_path / "t.gguf", full())
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_writer_missing_directory(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        write_gguf(_tiny_output(), tmp_path / "nope" / "t.gguf", iter([]))


def test_writer_checks_tensor_count(tmp_path):
    with pytest.raises(RuntimeError):
        write_gguf(_tiny_output(), tmp_path / "t.gguf", iter([np.zeros((2, 32), np.float32)]))
    assert not Path(tmp_path / "t.gguf").exists()
