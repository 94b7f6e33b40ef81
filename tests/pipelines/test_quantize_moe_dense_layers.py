"""MoE checkpoints with dense MLP layers among the sparse ones: GLM-4.5's leading dense layers
(first_k_dense_replace) and Qwen-MoE's mlp_only_layers / decoder_sparse_step.

convert --to gguf: llama.cpp's qwen2moe and qwen3moe loaders create the router and experts for every layer
(src/models/qwen3moe.cpp, qwen2moe.cpp: flags 0), so a file with a dense layer would not load; it is refused
in one line (the converter writes it anyway). quantize (rtn, compressed-tensors) walks the dense and the
expert layers alike, and transformers loads the output with no missing or unexpected key and generates.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_convert_refused, run_cli


def _qwen_with_dense_layer(fixtures_lib, arch: str, out: Path, **dense) -> Path:
    """The synthetic checkpoint of ``arch`` rebuilt by transformers with some layers dense."""
    from transformers import AutoModelForCausalLM

    src = fixtures_lib.synthetic_dir(arch)
    cfg = fixtures_lib.synthetic_config(arch, tied=arch == "qwen3_moe")
    for k, v in dense.items():
        setattr(cfg, k, v)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    for f in sorted(src.iterdir()):
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    return out


CASES = [("qwen3_moe", {"mlp_only_layers": [0]}, "[0]"),
         ("qwen2_moe", {"decoder_sparse_step": 2}, "[0, 2]")]


@pytest.mark.parametrize(("arch", "dense", "layers"), CASES)
def test_convert_refuses_qwen_moe_dense_layers(arch, dense, layers, fixtures_lib, tmp_path):
    model = _qwen_with_dense_layer(fixtures_lib, arch, tmp_path / "m", **dense)
    name = arch.replace("_", "")
    want = rf"{name} with dense MLP layers {re.escape(layers)} .*llama\.cpp's {name} loader needs experts"
    assert_convert_refused(model, tmp_path, want)


def _quantize_loads(src: Path, out: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli(capsys, "quantize", src, "--method", "rtn", "--group-size", "64", "--format",
                           "compressed-tensors", "-o", out)
    assert code == 0, err
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"


def test_rtn_compressed_tensors_of_qwen3_moe_with_a_dense_layer_loads(fixtures_lib, capsys, tmp_path):
    model = _qwen_with_dense_layer(fixtures_lib, "qwen3_moe", tmp_path / "m", mlp_only_layers=[0])
    _quantize_loads(model, tmp_path / "q", capsys)


def test_rtn_compressed_tensors_of_glm4_moe_loads(synthetic_dir, capsys, tmp_path):
    _quantize_loads(synthetic_dir("glm4_moe"), tmp_path / "q", capsys)
