"""HF checkpoint directories: single file, sharded (index.json), config, tokenizer files, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qconvert.errors import BadInput
from qconvert.load import open_checkpoint


def _sharded(tmp_path, build):
    d = tmp_path / "Tiny-Model"
    shard1 = {"model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
              "model.layers.0.mlp.up_proj.weight": np.ones((2, 4), np.float16)}
    shard2 = {"model.norm.weight": np.full(4, 2.0, np.float32),
              "lm_head.weight": np.zeros((3, 4), np.float32)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    build.write(d / names[0], build.safetensors_bytes(shard1, {"format": "pt"}))
    build.write(d / names[1], build.safetensors_bytes(shard2, {"format": "pt", "extra": "x"}))
    weight_map = {**{n: names[0] for n in shard1}, **{n: names[1] for n in shard2}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                 "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{{ x }}")
    return d, {**shard1, **shard2}


def test_sharded_directory(tmp_path, build):
    d, tensors = _sharded(tmp_path, build)
    ckpt = open_checkpoint(d)
    assert ckpt.path == d and ckpt.name == "Tiny-Model"
    assert ckpt.config == {"model_type": "llama", "hidden_size": 4}
    assert list(ckpt) == list(tensors)  # shard order, then file order within a shard
    assert [f.name for f in ckpt.files] == ["model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors"]
    assert ckpt.metadata == {"format": "pt", "extra": "x"}
    assert set(ckpt.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert ckpt.tokenizer_files["tokenizer.json"] == d / "tokenizer.json"
    for name, want in tensors.items():
        np.testing.assert_array_equal(ckpt.read_numpy(name), want.astype(np.float32))
    assert ckpt.tensors["model.norm.weight"].file.name == "model-00002-of-00002.safetensors"
    assert ckpt.quantization_config is None


def test_index_path_can_be_given_directly(tmp_path, build):
    d, tensors = _sharded(tmp_path, build)
    assert list(open_checkpoint(d / "model.safetensors.index.json")) == list(tensors)


def test_single_file_directory_and_bare_file(tmp_path, build):
    d = tmp_path / "m"
    build.write(d / "model.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))
    ckpt = open_checkpoint(str(d))
    assert ckpt.config == {} and ckpt.tokenizer_files == {} and list(ckpt) == ["w"]
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    bare = open_checkpoint(d / "model.safetensors")
    assert bare.path == d and bare.config == {"model_type": "qwen2"}


def test_unindexed_shards_are_all_read(tmp_path, build):
    d = tmp_path / "m"
    one = np.ones(2, np.float32)
    build.write(d / "model-00001-of-00002.safetensors", build.safetensors_bytes({"a": one}))
    build.write(d / "model-00002-of-00002.safetensors", build.safetensors_bytes({"b": one}))
    build.write(d / "adapter.safetensors", build.safetensors_bytes({"lora": one}))
    assert list(open_checkpoint(d)) == ["a", "b"]  # model* files win over other safetensors


def test_quantize_config_side_file(tmp_path, build):
    d = tmp_path / "m"
    build.write(d / "model.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))
    (d / "quantize_config.json").write_text('{"bits": 4, "group_size": 128, "desc_act": false}')
    assert open_checkpoint(d).quantization_config == {"bits": 4, "group_size": 128, "desc_act": False}


def _expect(path, fragment, named=None):
    with pytest.raises(BadInput) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert fragment in msg, msg
    assert str(named or path) in msg and "\n" not in msg


def test_missing_path(tmp_path):
    _expect(tmp_path / "nope", "no such file or directory")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "directory is empty")


def test_directory_without_weights(tmp_path):
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _expect(d, "no .safetensors weights")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    _expect(d, "pickle")


def test_config_not_json(tmp_path, build):
    d = tmp_path / "m"
    build.write(d / "model.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))
    (d / "config.json").write_text("{oops")
    _expect(d, "not valid JSON", named=d / "config.json")
    (d / "config.json").write_text("[1, 2]")
    _expect(d, "not a JSON object", named=d / "config.json")


def test_index_not_json(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    (d / "model.safetensors.index.json").write_text("{")
    _expect(d, "not valid JSON", named=d / "model.safetensors.index.json")


def test_index_without_weight_map(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _expect(d, "weight_map", named=d / "model.safetensors.index.json")


def test_index_points_to_missing_shard(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    (d / "model-00002-of-00002.safetensors").unlink()
    _expect(d, "missing shard 'model-00002-of-00002.safetensors'", named=d / "model.safetensors.index.json")


def test_index_names_a_tensor_missing_from_its_shard(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(d, "'model.ghost.weight'", named=d / "model.safetensors.index.json")


def test_index_escaping_the_directory(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../elsewhere.safetensors"}}')
    _expect(d, "outside", named=d / "model.safetensors.index.json")


def test_tensor_stored_in_two_shards(tmp_path, build):
    d = tmp_path / "m"
    build.write(d / "model-1.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))
    build.write(d / "model-2.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))
    _expect(d, "stored twice", named=d / "model-2.safetensors")


def test_bad_shard_header_names_the_shard(tmp_path, build):
    d, _ = _sharded(tmp_path, build)
    (d / "model-00002-of-00002.safetensors").write_bytes(build.raw_safetensors_bytes(b"[]"))
    _expect(d, "expected an object", named=d / "model-00002-of-00002.safetensors")


def test_gguf_file_is_not_a_checkpoint(tmp_path, build):
    path = build.write_gguf_good(tmp_path / "m.gguf")
    _expect(path, "GGUF")
    _expect(tmp_path, "pass the .gguf file itself")
