"""`--scheme nvfp4 | mxfp4` (W4A4): the weights are NVFP4A16's / MXFP4A16's bytes, NVFP4 adds each Linear's
``input_global_scale`` (448·6 / max|x| of its calibration inputs, in the model dtype, as llm-compressor's
static_minmax observer), the config is llm-compressor 0.14's NVFP4 / MXFP4 preset (packed-formats-2026.md
§1.3, §2.4), transformers loads the output and runs it with activations quantized; data is asked for exactly
when the scheme needs it, and an input dimension that is not a multiple of the group is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qconvert import cli
from qconvert.calib.stats import load_stats
from qconvert.kernels import fp4
from tests.helpers import read_tensors as tensors
from tests.pipelines.test_quantize_schemes import _misfit_checkpoint

# llm-compressor 0.14.0.1 + compressed-tensors 0.19, QuantizationModifier(scheme=..., ignore=["lm_head"])
_ARGS = {"actorder": None, "block_structure": None, "observer_kwargs": {}, "zp_dtype": None}
NVFP4_INPUTS = {**_ARGS, "dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "static_minmax",
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                "type": "float"}
MXFP4_INPUTS = {**_ARGS, "dynamic": True, "group_size": 32, "num_bits": 4, "observer": None,
                "scale_dtype": "torch.uint8", "strategy": "group", "symmetric": True, "type": "float"}


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def stats_file(synthetic_dir, calib_text, tmp_path_factory):
    path = tmp_path_factory.mktemp("w4a4") / "stats.safetensors"
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", str(synthetic_dir("llama")), "--dataset", str(calib_text),
                  "--num-samples", "4", "--seq-len", "64", "--device", "cpu", "--stats", "abs_max",
                  "-o", str(path)])
    assert e.value.code == 0
    return path


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_w4a4_output(scheme, capsys, synthetic_dir, stats_file, tmp_path):
    src = synthetic_dir("llama")
    out, weight_only = tmp_path / scheme, tmp_path / f"{scheme}a16"
    data = ["--stats", stats_file] if scheme == "nvfp4" else []
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", scheme, *data, "-o", out)
    assert code == 0, err
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", f"{scheme}a16", "-o",
                        weight_only)
    assert code == 0, err
    got, a16 = tensors(out), tensors(weight_only)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc16 = json.loads((weight_only / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"] == (NVFP4_INPUTS if scheme == "nvfp4" else MXFP4_INPUTS)
    group16 = qc16["config_groups"]["group_0"]
    assert {**group, "input_activations": None} == group16 and {**qc, "config_groups": None} == {
        **qc16, "config_groups": None}
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)  # compressed-tensors' own classes accept it
    extra = {n for n in got if n not in a16}
    for name, t in a16.items():  # the weights are the weight-only preset's, byte for byte
        assert torch.equal(got[name], t), name
    if scheme == "mxfp4":
        assert not extra
        return
    stats = load_stats(stats_file)
    assert extra == {f"{p}.input_global_scale" for p in stats.linears if p != "lm_head"}
    for prefix, st in stats.linears.items():
        want = float(fp4.nvfp4_global_scale(float(st.abs_max.max()), "bfloat16"))
        assert got[f"{prefix}.input_global_scale"].dtype == torch.float32
        assert got[f"{prefix}.input_global_scale"].tolist() == [want], prefix
    for layer in range(4):  # fused siblings see one input: one scale
        qkv = {got[f"model.layers.{layer}.self_attn.{m}_proj.input_global_scale"].item() for m in "qkv"}
        assert len(qkv) == 1

    code, stdout, err = _cli(capsys, "inspect", out, "--json")
    assert code in (0, None), err
    q = json.loads(stdout)["quantization"]
    assert (q["scheme"], q["activations"]) == ("NVFP4", "float4 local tensor_group 16")


def test_transformers_runs_nvfp4_with_activations(capsys, synthetic_dir, stats_file, eval_text,
                                                   tmp_path):
    """Kept compressed (transformers' default mode), compressed-tensors quantizes the activations with our
    input_global_scale: the logits differ from the weight-only model's, and it generates."""
    from transformers import AutoModelForCausalLM

    src = synthetic_dir("llama")
    w4a4, w4a16 = tmp_path / "nvfp4", tmp_path / "nvfp4a16"
    assert _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", "nvfp4", "--stats", stats_file,
                "-o", w4a4)[0] == 0
    assert _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", "nvfp4a16", "-o", w4a16)[0] == 0
    ids = torch.arange(3, 35).reshape(1, -1)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(w4a4, dtype=torch.bfloat16)
        b = AutoModelForCausalLM.from_pretrained(w4a16, dtype=torch.bfloat16)
        la, lb = a(ids).logits, b(ids).logits
        assert torch.isfinite(la).all() and not torch.equal(la, lb)
        assert a.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    # eval --loader emulate runs it (in bf16: compressed-tensors' FP4 path cannot run a float32 model)
    ppl = {}
    for name, path in (("w4a4", w4a4), ("w4a16", w4a16)):
        code, stdout, err = _cli(capsys, "eval", path, "--dataset", eval_text, "--loader", "emulate",
                                 "-c", "128", "--chunks", "2", "-t", "1", "--json")
        assert code in (0, None), err
        ppl[name] = json.loads(stdout)["perplexity"]
    assert all(p > 1 for p in ppl.values()) and ppl["w4a4"] != ppl["w4a16"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "rtn", "--scheme", "nvfp4"], r"--scheme nvfp4 needs activation statistics: --dataset"),
        (["--method", "rtn", "--scheme", "mxfp4", "--stats", "x.safetensors"],
         r"--method rtn --scheme mxfp4 needs no data"),
        (["--method", "gptq", "--scheme", "nvfp4", "--dataset", "x.txt"],
         r"--scheme nvfp4 is not offered by --method gptq; use --method rtn"),
    ],
)
def test_w4a4_refusals(args, needle, capsys, synthetic_dir, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, _, err = _cli(capsys, "quantize", synthetic_dir("llama"), *args, "-o", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("qconvert: error: "), err
    assert re.search(needle, err), err
    assert list(out.parent.iterdir()) == []


def test_nvfp4_input_dim_not_a_multiple_of_16(capsys, synthetic_dir, calib_text, tmp_path):
    """Refused while planning: before the calibration pass, nothing written."""
    src = _misfit_checkpoint(synthetic_dir("llama"), tmp_path / "src")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", "nvfp4", "--dataset",
                        calib_text, "--num-samples", "2", "--seq-len", "32", "--device", "cpu", "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(r"nvfp4: model\.layers\.0\.mlp\.down_proj has 776 input columns, not a multiple of 16",
                     err), err
    assert list(out.parent.iterdir()) == []
