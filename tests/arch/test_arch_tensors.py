"""The tensor plan: HF -> GGUF names and the converter's transforms, on the synthetic checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.arch.table import resolve
from qconvert.arch.tensors import gguf_tensor_name, permute_rows, plan_tensors, writes_output_tensor
from qconvert.load import open_checkpoint
from qconvert.load.config import text_config


def test_permutation_matches_the_fixture_builder(fixtures_lib):
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n_head in (1, 2, 3):
        got = permute_rows(w, n_head)
        assert np.array_equal(got, fixtures_lib.llama_permute(w, n_head))
        assert np.array_equal(fixtures_lib.llama_unpermute(got, n_head), w)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_plan_names_and_transforms(synthetic_dir, arch):
    ckpt = open_checkpoint(synthetic_dir(arch))
    cfg = text_config(ckpt.config)
    spec = resolve(cfg)
    planned = {t.name: t for t in plan_tensors(ckpt, spec, cfg)}
    assert "token_embd.weight" in planned and "blk.3.ffn_down.weight" in planned
    assert "output.weight" not in planned  # tied
    norm = planned["blk.0.attn_norm.weight"]
    expect = ckpt.read_numpy(norm.source) + (1.0 if arch.startswith("gemma") else 0.0)
    assert np.array_equal(norm.read(), expect.astype(np.float32))
    if arch == "llama":
        q = planned["blk.1.attn_q.weight"]
        assert np.array_equal(q.read(), permute_rows(ckpt.read_numpy(q.source), cfg["num_attention_heads"]))
    if arch == "phi3":  # fused tensors stay fused
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
        assert planned["blk.0.attn_qkv.weight"].shape == (qkv_rows, cfg["hidden_size"])
        assert planned["blk.0.ffn_up.weight"].shape[0] == 2 * cfg["intermediate_size"]


def test_names_for_the_other_stages():
    llama = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}
    assert gguf_tensor_name(llama, "model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_tensor_name(llama, "lm_head.weight") == "output.weight"
    assert writes_output_tensor(llama, ["lm_head.weight"]) and not writes_output_tensor(llama, [])
    gemma = {"architectures": ["GemmaForCausalLM"], "num_hidden_layers": 4}
    assert not writes_output_tensor(gemma, ["lm_head.weight"])  # the gemma converter drops it
