"""`qconvert quantize` end to end: RTN → gptq / compressed-tensors on the synthetic and the real SmolLM2
checkpoint,
loaded back by our numpy reference, by compressed-tensors and by transformers; bad input refused before any
work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert.formats.packed.gptq import marlin_problems
from qconvert.kernels import packing
from qconvert.methods.rtn import rtn_quantize
from qconvert.methods.types import QuantSpec
from tests.helpers import read_tensors as tensors


@pytest.fixture
def run(quantize_cli):
    return quantize_cli



def test_rtn_gptq_output(run, synthetic_dir, tmp_path):
    src = synthetic_dir("llama")
    out = tmp_path / "gptq"
    code, stdout, err = run(
        src, "--method", "rtn", "--format", "gptq", "--bits", "4", "--group-size", "64", "-o", out
    )
    assert code == 0, err
    assert "bits/weight" in stdout
    cfg = json.loads((out / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (4, 64, True, False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists()
    got, source = tensors(out), tensors(src)
    shapes = {}
    for name, w in source.items():
        prefix = name[: -len(".weight")]
        if f"{prefix}.qweight" not in got:
            assert torch.equal(got[name], w)  # embeddings, norms: copied bit for bit
            continue
        assert name not in got
        shapes[prefix] = tuple(w.shape)
        qz = got[f"{prefix}.qzeros"].numpy().view(np.uint32)
        assert (qz == 0x77777777).all()
        deq = packing.gptq_dequantize(
            *(
                got[f"{prefix}.{s}"].float().numpy() if s == "scales" else got[f"{prefix}.{s}"].numpy()
                for s in ("qweight", "qzeros", "scales", "g_idx")
            ),
            bits=4,
            v2=False,
        )
        expected = rtn_quantize(w, QuantSpec(bits=4, group_size=64, scale_dtype="float16")).dequantize()
        np.testing.assert_array_equal(deq, expected)
    assert len(shapes) == 4 * 7
    assert marlin_problems(qcfg, shapes) == []


def test_ct_json_overrides_and_ignore(run, synthetic_dir, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ct"
    code, stdout, err = run(
        synthetic_dir("llama"),
        "--method",
        "rtn",
        "--format",
        "compressed-tensors",
        "--asym",
        "--group-size",
        "128",
        "--layer-config",
        "down-proj-8bit",
        "--ignore",
        r"layers\.3\.",
        "--json",
        "-o",
        out,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    schemes = {(s["bits"], s["group_size"]): s for s in summary["schemes"]}
    assert schemes[(8, 128)]["layers"] == 3 and schemes[(4, 128)]["layers"] == 18
    assert 4.0 < schemes[(4, 128)]["bits_per_weight"] < 4.5
    assert len(summary["skipped"]) == 7 and all("layers.3." in s for s in summary["skipped"])
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)
    assert "model.layers.3.mlp.down_proj" in qcfg["ignore"]
    assert qcfg["config_groups"]["group_1"]["targets"] == [
        f"model.layers.{i}.mlp.down_proj" for i in range(3)
    ]
    got = tensors(out)
    assert "model.layers.3.mlp.down_proj.weight" in got
    sd = {k.split(".")[-1]: v for k, v in got.items() if k.startswith("model.layers.1.mlp.down_proj.")}
    w8 = PackedQuantizationCompressor.decompress(sd, parsed.config_groups["group_1"])["weight"]
    src = tensors(synthetic_dir("llama"))["model.layers.1.mlp.down_proj.weight"]
    expected = rtn_quantize(
        src, QuantSpec(bits=8, group_size=128, sym=False, scale_dtype="bfloat16")
    ).dequantize()
    assert torch.equal(w8.to(torch.bfloat16), torch.from_numpy(expected).to(torch.bfloat16))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "rtn", "--format", "awq", "--bits", "3"], r"awq \(AutoAWQ GEMM\) holds 4-bit"),
        (
            ["--method", "rtn", "--format", "gptq", "--group-size", "512"],
            r"model\.layers\.0\.mlp\.down_proj: group size 512 does not divide its 768 input columns"
            r".*--ignore",
        ),
        (["--method", "gptq", "--format", "compressed-tensors", "--act-order", "--dataset", "x.txt"],
         "add --static-groups"),
        (["--method", "rtn", "--layer-config", "no-such-preset"], "down-proj-8bit"),
        (["--method", "rtn", "--ignore", "("], "not a valid regular expression"),
        (["--method", "rtn", "--max-shard-size", "lots"], "bad size"),
        # calibrated methods refuse to start without calibration data
        (["--method", "gptq"], "--method gptq needs calibration text"),
        # options the method does not take are refused, not silently ignored
        (["--method", "rtn", "--act-order"], "--act-order does not apply to --method rtn"),
        (["--method", "fp8", "--bits", "4"], "--bits does not apply to --method fp8"),
    ],
)
def test_bad_input_refused_before_work(run, synthetic_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    code, _, err = run(synthetic_dir("llama"), *args, "-o", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qconvert: error: ")
    assert re.search(needle, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_ct(smollm2_dir, tmp_path_factory) -> Path:
    from qconvert.pipelines.quantize import QuantizeOptions, run_quantize

    out = tmp_path_factory.mktemp("smollm2") / "w4g64"
    summary = run_quantize(
        QuantizeOptions(
            model=str(smollm2_dir),
            output=out,
            method="rtn",
            format="compressed-tensors",
            options={"bits": 4, "group_size": 64},
        )
    )
    assert len(summary.layers) == 30 * 7
    return out


def test_smollm2_compressed_tensors_loads_in_transformers(smollm2_ct, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_ct, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(smollm2_ct)
    ids = tok("The capital of France is", return_tensors="pt")
    text = tok.decode(
        model.generate(**ids, max_new_tokens=8, do_sample=False)[0][ids["input_ids"].shape[1] :]
    )
    assert "Paris" in text, text

    got = tensors(smollm2_ct)
    source = tensors(smollm2_dir)
    params = dict(model.named_parameters())
    checked = 0
    for name, w in params.items():
        prefix = name[: -len(".weight")]
        if f"{prefix}.weight_packed" not in got:
            continue
        ours = packing.ct_dequantize(
            got[f"{prefix}.weight_packed"].numpy(),
            got[f"{prefix}.weight_scale"].float().numpy(),
            got[f"{prefix}.weight_shape"].numpy(),
            4,
        )
        assert torch.equal(w.detach(), torch.from_numpy(ours).to(torch.bfloat16)), name
        checked += 1
        if prefix.startswith("model.layers.0.") or prefix == "model.layers.29.mlp.down_proj":
            # …and those are the weights the method produced
            method = rtn_quantize(source[name], QuantSpec(bits=4, group_size=64, scale_dtype="bfloat16"))
            assert torch.equal(w.detach(), torch.from_numpy(method.dequantize()).to(torch.bfloat16)), name
    assert checked == 30 * 7
