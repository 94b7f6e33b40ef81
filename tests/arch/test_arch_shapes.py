"""Wrong-shape weights are refused by every command that reads weights (issue 20), and no right shape is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qconvert.arch.tensors import check_checkpoint_shapes
from qconvert.cli import main
from qconvert.load import open_checkpoint

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_synthetic_family_passes(synthetic_dir, arch):
    assert check_checkpoint_shapes(open_checkpoint(synthetic_dir(arch))) is None


def test_the_untied_and_sharded_variants_pass(synthetic_dir):
    for d in (synthetic_dir("llama", tied=False), synthetic_dir("llama", sharded=True)):
        assert check_checkpoint_shapes(open_checkpoint(d)) is None


def test_the_real_model_passes(smollm2_dir):
    assert check_checkpoint_shapes(open_checkpoint(smollm2_dir)) is None


def _broken(src: Path, dst: Path, name: str, cut: int) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensors[name][:-cut].clone()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _run(capsys, *args: object) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, err.strip().splitlines(), out


# (family, tensor, rows to cut): a plain Linear, a fused phi3 projection, an embedding, a bias, a norm
BROKEN = [("qwen3", "model.layers.1.mlp.up_proj.weight", 1),
          ("phi3", "model.layers.0.self_attn.qkv_proj.weight", 64), ("llama", "model.embed_tokens.weight", 3),
          ("qwen2", "model.layers.2.self_attn.k_proj.bias", 2),
          ("gemma2", "model.layers.0.post_feedforward_layernorm.weight", 1)]


@pytest.mark.parametrize("arch,name,cut", BROKEN)
def test_convert_and_data_free_quantize_refuse_a_wrong_shape(synthetic_dir, tmp_path, capsys, arch, name,
                                                              cut):
    model = _broken(synthetic_dir(arch), tmp_path / "m", name, cut)
    commands = [
        ("convert", model, "--to", "gguf", "--type", "Q8_0", "-o", tmp_path / "out.gguf"),
        ("quantize", model, "--method", "rtn", "--group-size", "64", "-o", tmp_path / "rtn"),
        ("quantize", model, "--method", "fp8", "-o", tmp_path / "fp8"),
    ]
    for command in commands:
        code, err, _ = _run(capsys, *command)
        assert code == 2 and len(err) == 1, (command, err)
        assert name in err[0] and "config.json implies" in err[0] and "model.safetensors" in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial output


def test_calibrated_commands_and_eval_refuse_a_wrong_shape(synthetic_dir, tmp_path, capsys, calib_text):
    model = _broken(synthetic_dir("qwen3"), tmp_path / "m", "model.layers.1.mlp.up_proj.weight", 1)
    data = ("--dataset", calib_text)
    commands = [
        ("calibrate", model, *data, "-n", "2", "--seq-len", "32", "-o", tmp_path / "stats.safetensors"),
        ("imatrix", model, *data, "--chunks", "1", "-c", "64", "-o", tmp_path / "imatrix.gguf"),
        ("quantize", model, "--method", "gptq", *data, "--num-samples", "2", "--seq-len", "32",
         "-o", tmp_path / "q"),
        ("eval", model, *data, "--chunks", "1", "-c", "64"),
        ("eval", model, *data, "--chunks", "1", "-c", "64", "--loader", "unpack"),
    ]
    for command in commands:
        code, err, _ = _run(capsys, *command)
        assert code == 2 and len(err) == 1, (command, err)
        assert "model.layers.1.mlp.up_proj.weight" in err[0] and "(767, 256)" in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_data_free_quantize_without_config_says_what_it_did_not_check(synthetic_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(synthetic_dir("qwen3"), model)
    (model / "config.json").unlink()
    code, err, out = _run(capsys, "quantize", model, "--method", "fp8", "-o", tmp_path / "fp8", "--json")
    assert code == 0, err
    assert json.loads(out)["notes"] == ["no config.json: tensor shapes were not checked"]
    code, err, out = _run(capsys, "quantize", synthetic_dir("qwen3"), "--method", "fp8",
                          "-o", tmp_path / "ok", "--json")
    assert code == 0 and json.loads(out)["notes"] == []
