"""`qconvert inspect` data: the JSON schema on small files, and agreement with the reference readers
(safetensors' safe_open, gguf-py's GGUFReader) on the real SmolLM2 checkpoint and GGUF."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.load import open_checkpoint
from qconvert.load.summary import inspect

REPO = Path(__file__).resolve().parents[2]
TOP_KEYS = {"format", "source", "path", "name", "files", "metadata", "config", "tokenizer_files", "gguf",
            "tensors", "tensor_count", "total_bytes", "parameters", "bits_per_weight", "type_histogram",
            "quantization", "quantized_layers"}
LAYER_KEYS = {"name", "method", "bits", "group_size", "parameters", "nbytes", "bits_per_weight", "shape",
              "granularity", "tensors"}


def _small_gguf(path: Path) -> Path:
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_token_list(["<|endoftext|>"] + [f"t{i}" for i in range(99)])
    x = rng.standard_normal((8, 256)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", rng.integers(0, 256, (4, 144), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _check_schema(s: dict) -> None:
    assert TOP_KEYS <= set(s)
    assert s["format"] in ("gguf", "safetensors")
    assert isinstance(s["metadata"], dict)
    assert s["tensor_count"] == len(s["tensors"])
    for t in s["tensors"]:
        assert set(t) == {"name", "type", "shape", "nbytes"}
        assert isinstance(t["type"], str) and all(isinstance(d, int) for d in t["shape"])
    assert s["total_bytes"] == sum(t["nbytes"] for t in s["tensors"])
    assert s["total_bytes"] == sum(h["nbytes"] for h in s["type_histogram"].values())
    assert s["parameters"] == sum(h["parameters"] for h in s["type_histogram"].values())
    assert len(s["tensors"]) == sum(h["count"] for h in s["type_histogram"].values())
    if s["parameters"]:
        assert math.isclose(s["bits_per_weight"], s["total_bytes"] * 8 / s["parameters"], rel_tol=1e-4)
    for q in s["quantized_layers"]:
        assert set(q) == LAYER_KEYS
    json.dumps(s, allow_nan=False)  # strictly valid JSON


def test_gguf_schema(tmp_path):
    s = inspect(_small_gguf(tmp_path / "small.gguf"))
    _check_schema(s)
    assert s["format"] == "gguf" and s["config"] is None and s["quantized_layers"] == []
    by_name = {t["name"]: t for t in s["tensors"]}
    q8, q4k = by_name["blk.0.attn_q.weight"], by_name["blk.0.ffn_up.weight"]
    assert q8 == {"name": "blk.0.attn_q.weight", "type": "Q8_0", "shape": [8, 256], "nbytes": 8 * 8 * 34}
    assert q4k == {"name": "blk.0.ffn_up.weight", "type": "Q4_K", "shape": [4, 256], "nbytes": 4 * 144}
    assert s["type_histogram"]["Q4_K"] == {"count": 1, "parameters": 1024, "nbytes": 576}
    assert s["parameters"] == 8 * 256 + 4 * 256 + 256
    tokens = s["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["count"] == 100 and tokens["element_type"] == "STRING"
    assert tokens["head"][0] == "<|endoftext|>"
    assert s["quantization"]["file_type"] == "Q8_0" and s["quantization"]["method"] == "ggml"
    assert s["gguf"]["version"] == 3 and s["gguf"]["alignment"] == 32


def test_safetensors_schema(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(10, 8, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(8)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    (d / "tokenizer.json").write_text("{}")
    s = inspect(d)
    _check_schema(s)
    assert s["format"] == "safetensors" and s["gguf"] is None and s["quantization"] is None
    assert s["metadata"] == {"format": "pt"} and s["config"]["hidden_size"] == 8
    assert s["tokenizer_files"] == ["tokenizer.json"]
    assert s["type_histogram"] == {"BF16": {"count": 1, "parameters": 80, "nbytes": 160},
                                   "F32": {"count": 1, "parameters": 8, "nbytes": 32}}
    assert s["parameters"] == 88 and s["total_bytes"] == 192


def test_cli_json_is_exactly_one_object(tmp_path):
    path = _small_gguf(tmp_path / "small.gguf")
    r = subprocess.run([sys.executable, "-m", "qconvert", "inspect", str(path), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    obj, end = json.JSONDecoder().raw_decode(r.stdout)
    assert r.stdout[end:].strip() == ""
    assert obj == json.loads(json.dumps(inspect(path)))  # same data as the library, source aside
    assert obj["format"] == "gguf"


# ---- real model (fixtures from tests/conftest.py) ----

def test_smollm2_safetensors_matches_safe_open(smollm2_dir):
    s = inspect(smollm2_dir)
    _check_schema(s)
    shard = smollm2_dir / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        names = set(f.keys())
        shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        ref_embed = f.get_tensor("model.embed_tokens.weight")
    assert {t["name"] for t in s["tensors"]} == names
    for t in s["tensors"]:
        assert t["shape"] == shapes[t["name"]] and t["type"] == dtypes[t["name"]]
    assert s["parameters"] == sum(math.prod(v) for v in shapes.values())
    assert 130e6 < s["parameters"] < 140e6  # SmolLM2-135M
    assert s["quantization"] is None and s["bits_per_weight"] == 16.0
    assert "tokenizer.json" in s["tokenizer_files"]
    assert s["config"]["hidden_size"] == ref_embed.shape[1]
    with open_checkpoint(smollm2_dir) as ckpt:
        assert torch.equal(ckpt.read("model.embed_tokens.weight"), ref_embed)
        np.testing.assert_array_equal(ckpt.read_numpy("model.norm.weight"),
                                      ckpt.read("model.norm.weight").float().numpy())


def test_smollm2_gguf_matches_gguf_reader(smollm2_gguf):
    t0 = time.perf_counter()
    s = inspect(smollm2_gguf)
    assert time.perf_counter() - t0 < 1.0
    _check_schema(s)
    ref = gguf.GGUFReader(str(smollm2_gguf))
    assert [t["name"] for t in s["tensors"]] == [t.name for t in ref.tensors]
    for mine, theirs in zip(s["tensors"], ref.tensors, strict=True):
        assert mine["type"] == theirs.tensor_type.name
        assert mine["shape"] == [int(n) for n in reversed(theirs.shape)]
        assert mine["nbytes"] == int(theirs.n_bytes)
    assert s["parameters"] == sum(int(t.n_elements) for t in ref.tensors)
    assert s["quantization"]["file_type"] == "Q4_1" and "Q4_1" in s["type_histogram"]
    tokens = s["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["count"] == 49152 and tokens["head"][0] == "<|endoftext|>"
    assert s["metadata"]["general.architecture"] == "llama"
