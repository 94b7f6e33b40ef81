"""`qconvert quantize --method gptq` end to end: packed outputs in every format unpack to exactly the weights
the method produced; every Hessian is the one of the sequentially quantized model (checked against a plain
transformers forward of the finished model); bad input is one line, exit 2; on the real fixture model the
compressed-tensors output loads in transformers, generates sensible text and beats RTN on perplexity."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.kernels import packing
from qconvert.methods import gptq_layerwise
from tests.helpers import read_tensors as tensors

SAMPLES, SEQ = 4, 64


@pytest.fixture
def run(quantize_cli):
    return quantize_cli


@pytest.fixture
def recorded(monkeypatch) -> dict:
    """name -> (Hessian, QuantizedTensor) of every GPTQ call the pipeline makes."""
    seen: dict = {}
    real = gptq_layerwise.gptq_weight

    def spy(weight, h, spec, cfg, name):
        qt, deq, err = real(weight, h, spec, cfg, name)
        seen[name] = (h.detach().to("cpu", torch.float64).clone(), qt)
        return qt, deq, err

    monkeypatch.setattr(gptq_layerwise, "gptq_weight", spy)
    return seen



def unpack(got: dict[str, torch.Tensor], prefix: str, fmt: str, bits: int) -> np.ndarray:
    """The weight every reader reconstructs, through the numpy reference unpackers."""
    if fmt.startswith("gptq"):
        return packing.gptq_dequantize(
            got[f"{prefix}.qweight"].numpy(),
            got[f"{prefix}.qzeros"].numpy(),
            got[f"{prefix}.scales"].float().numpy(),
            got[f"{prefix}.g_idx"].numpy(),
            bits=bits,
            v2=fmt == "gptq_v2",
        )
    zp = got.get(f"{prefix}.weight_zero_point")
    return packing.ct_dequantize(
        got[f"{prefix}.weight_packed"].numpy(),
        got[f"{prefix}.weight_scale"].float().numpy(),
        got[f"{prefix}.weight_shape"].numpy(),
        bits,
        None if zp is None else zp.numpy(),
    )


def calib_args(calib_text: Path) -> list[str]:
    return ["--dataset", str(calib_text), "--num-samples", str(SAMPLES), "--seq-len", str(SEQ)]


@pytest.mark.parametrize(
    "fmt,extra",
    [
        ("gptq", ["--bits", "4", "--group-size", "64", "--sym"]),
        ("gptq_v2", ["--bits", "3", "--group-size", "32", "--asym", "--act-order"]),
        pytest.param("compressed-tensors",
                     ["--bits", "8", "--group-size", "-1", "--asym", "--no-true-sequential"],
                     marks=pytest.mark.slow),  # tens of CPU seconds each
        pytest.param("compressed-tensors",
                     ["--bits", "2", "--group-size", "128", "--act-order", "--static-groups"],
                     marks=pytest.mark.slow),
    ],
)
def test_outputs_unpack_to_the_method_weights(run, recorded, synthetic_dir, calib_text, tmp_path, fmt, extra):
    src = synthetic_dir("llama")
    out = tmp_path / "out"
    code, stdout, err = run(src, "--method", "gptq", "--format", fmt, *extra, *calib_args(calib_text),
                            "--device", "cpu", "--json", "-o", out)
    assert code == 0, err
    summary = json.loads(stdout)
    bits = int(extra[1])
    assert summary["method"] == "gptq" and len(summary["layers"]) == 4 * 7
    assert all(0 < layer["error"] < 1 for layer in summary["layers"])
    got, source = tensors(out), tensors(src)
    assert set(recorded) == {layer["name"] for layer in summary["layers"]}
    for prefix, (_h, qt) in recorded.items():
        np.testing.assert_array_equal(unpack(got, prefix, fmt, bits), qt.dequantize(), err_msg=prefix)
        assert f"{prefix}.weight" not in got
    for name, w in source.items():  # embeddings, norms: copied bit for bit
        if name[: -len(".weight")] not in recorded:
            assert torch.equal(got[name], w), name
    if "--act-order" in extra and "--static-groups" not in extra:
        g_idx = got["model.layers.0.mlp.down_proj.g_idx"].numpy()
        assert not np.array_equal(g_idx, np.arange(768) // 32)  # a real act-order permutation was stored
        assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True


def _inputs_of_finished_model(model_dir: Path, tokens: torch.Tensor, deq: dict[str, np.ndarray]):
    """Σ x xᵀ of every Linear's input (lm_head's too) in a plain transformers forward of the quantized
    model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    hess: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name in deq:
                mod.weight.data = torch.from_numpy(deq[name])

            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                hess[name] = hess.get(name, 0) + x.T @ x

            mod.register_forward_pre_hook(hook)
    with torch.inference_mode():
        for row in tokens:
            model(input_ids=row[None], use_cache=False)
    return hess


@pytest.mark.slow  # a full calibrated quantize run on a synthetic model: tens of CPU seconds
@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_layer_sees_the_quantized_layers_before(run, recorded, synthetic_dir, calib_text, tmp_path,
                                                     true_sequential):
    """True-sequential: every Linear's Hessian is that of its input in the *finished* quantized model (all
    upstream weights quantized, including earlier sub-layers of its own layer); lm_head too. Without it,
    only the first group of each layer (q/k/v) sees quantized upstream weights only."""
    from qconvert.calib.datasets import load_calibration, load_tokenizer
    from qconvert.load import open_checkpoint

    src = synthetic_dir("llama", tied=False)
    flag = "--true-sequential" if true_sequential else "--no-true-sequential"
    code, _, err = run(src, "--method", "gptq", "--format", "gptq", "--group-size", "64", flag,
                       "--quantize-lm-head", *calib_args(calib_text), "--calib-dtype", "f32",
                       "-o", tmp_path / "out")
    assert code == 0, err
    tokens = load_calibration(str(calib_text), load_tokenizer(open_checkpoint(src)), seq_len=SEQ,
                              num_samples=SAMPLES).tokens
    deq = {name: qt.dequantize() for name, (_h, qt) in recorded.items()}
    want = _inputs_of_finished_model(src, tokens, deq)
    assert set(recorded) == set(want)
    mismatched = []
    for name, (h, _qt) in recorded.items():
        rel = float((h - want[name]).abs().max() / want[name].abs().max())
        if rel > 1e-4:
            mismatched.append(name)
    if true_sequential:
        assert mismatched == []
    else:
        assert mismatched and all(re.search(r"o_proj|gate_proj|up_proj|down_proj", n) for n in mismatched)
        assert not any(re.search(r"[qkv]_proj|lm_head", n) for n in mismatched)


def test_stats_file_gives_the_hessians(run, recorded, synthetic_dir, calib_text, tmp_path):
    from qconvert.calib.stats import save_stats
    from qconvert.load import open_checkpoint
    from qconvert.pipelines.calibrate import CalibrateOptions, calibrate

    src = synthetic_dir("llama")
    stats = calibrate(open_checkpoint(src), str(calib_text),
        CalibrateOptions(num_samples=SAMPLES, seq_len=SEQ, kinds="hessian", dtype="f32"))
    path = save_stats(tmp_path / "stats.safetensors", stats)
    code, _, err = run(src, "--method", "gptq", "--stats", path, "--format", "gptq", "-o", tmp_path / "out")
    assert code == 0, err
    assert len(recorded) == 4 * 7
    for name, (h, _qt) in recorded.items():
        assert torch.equal(h, stats.linears[name].hessian.double()), name

    no_h = save_stats(tmp_path / "abs.safetensors", calibrate(open_checkpoint(src), str(calib_text),
        CalibrateOptions(num_samples=1, seq_len=SEQ, kinds="abs_max")))
    code, _, err = run(src, "--method", "gptq", "--stats", no_h, "-o", tmp_path / "out2")
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(r"no Hessian for model\.layers\.0\.\w+\.\w+_proj; collect them with 'qconvert calibrate "
                     r"--stats hessian'", err), err
    assert not (tmp_path / "out2").exists()


def _with_nan_norm(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.layers.1.post_attention_layernorm.weight"][:] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], r"--method gptq needs calibration text: --dataset"),
        (["--num-samples", "100000"], r"calib.*at least 6400000 tokens are needed"),
        (["--device", "tpu:7"], r"unknown --device 'tpu:7'"),
        (["--stats", "missing.safetensors"], r"missing\.safetensors: stats file not found"),
    ],
)
def test_bad_input_one_line_exit_2(run, synthetic_dir, calib_text, tmp_path, args, needle):
    data = [] if args[:1] in ([], ["--stats"]) else ["--dataset", str(calib_text), "--seq-len", str(SEQ)]
    code, _, err = run(synthetic_dir("llama"), "--method", "gptq", *data, *args, "-o", tmp_path / "out")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("qconvert: error: ")
    assert re.search(needle, err), err
    assert not (tmp_path / "out").exists()


def test_broken_hessian_names_the_layer(run, synthetic_dir, calib_text, tmp_path):
    src = _with_nan_norm(synthetic_dir("llama"), tmp_path / "nan")
    code, _, err = run(src, "--method", "gptq", *calib_args(calib_text), "-o", tmp_path / "out")
    assert code == 2, err
    assert err.count("\n") == 1
    assert re.search(r"model\.layers\.1\.mlp\.gate_proj: Hessian has a non-finite", err), err
    assert [p.name for p in tmp_path.iterdir()] == ["nan"]  # no output, no temp dir left behind


# --- the real fixture model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_w4g64(smollm2_dir, calib_text, tmp_path_factory) -> dict[str, Path]:
    from qconvert.pipelines.quantize import QuantizeOptions, run_quantize

    base = tmp_path_factory.mktemp("smollm2-gptq")
    outs = {}
    calib = {"dataset": str(calib_text), "num_samples": 8, "seq_len": 512, "device": "cpu"}
    for method in ("gptq", "rtn"):
        outs[method] = base / method
        summary = run_quantize(
            QuantizeOptions(model=str(smollm2_dir), output=outs[method], method=method,
                            format="compressed-tensors",
                            options={"bits": 4, "group_size": 64, **({} if method == "rtn" else calib)})
        )
        assert len(summary.layers) == 30 * 7
    return outs


def test_smollm2_gptq_generates_and_beats_rtn(smollm2_w4g64, eval_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qconvert.evaluate.run import evaluate

    path = smollm2_w4g64["gptq"]
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0][ids["input_ids"].shape[1] :]
    text = tok.decode(new)
    assert "Paris" in text, text
    del model

    ppl = {m: evaluate(p, eval_text, ctx=512, chunks=12).perplexity for m, p in smollm2_w4g64.items()}
    print("perplexity (12 x 512 eval tokens, 8 x 512 calibration):", ppl)
    assert ppl["gptq"] < 0.97 * ppl["rtn"], ppl
