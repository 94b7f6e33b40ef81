"""`--scheme w8a8 --smoothquant ALPHA` (rtn and gptq): the folded norms and the quantized Linears are the
reference SmoothQuant (s = max|x|^α / max|W|^(1-α), llm-compressor's norm → q/k/v, norm → gate/up mappings
from the architecture table) applied to the source with the stats file's max |x|; the float model computes the
same function after folding; families without mappings and meaningless combinations are refused in one
line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from qconvert import cli
from qconvert.calib.stats import load_stats
from qconvert.methods import smoothquant as sq
from qconvert.methods.rtn import rtn_quantize
from qconvert.methods.types import QuantSpec
from tests.helpers import read_tensors as tensors

ALPHA = 0.8
MAPPINGS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def stats_file(synthetic_dir, calib_text, tmp_path_factory):
    path = tmp_path_factory.mktemp("sq") / "stats.safetensors"
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", str(synthetic_dir("llama")), "--dataset", str(calib_text),
                  "--num-samples", "4", "--seq-len", "64", "--device", "cpu", "--stats", "abs_max,hessian",
                  "-o", str(path)])
    assert e.value.code == 0
    return path


def _reference(source: dict, stats, layer: int, norm: str) -> np.ndarray:
    """The paper's factors, in numpy from the stats file and the source weights."""
    balanced = [f"model.layers.{layer}.{b}" for b in MAPPINGS[norm]]
    a = stats.linears[balanced[0]].abs_max.numpy().astype(np.float64)
    w = np.max([np.abs(source[f"{b}.weight"].float().numpy()).max(0) for b in balanced], axis=0)
    return np.maximum(np.where(w > 0, a**ALPHA / w ** (1 - ALPHA), a), 1e-5)


def test_rtn_smoothquant_is_the_reference(capsys, synthetic_dir, stats_file, tmp_path):
    src = synthetic_dir("llama")
    out = tmp_path / "sq"
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", "w8a8",
                        "--smoothquant", ALPHA, "--stats", stats_file, "-o", out)
    assert code == 0, err
    got, source, stats = tensors(out), tensors(src), load_stats(stats_file)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"  # SmoothQuant leaves no trace in the config (as llm-compressor)
    for layer in range(4):
        for norm, balanced in MAPPINGS.items():
            s = _reference(source, stats, layer, norm)
            name = f"model.layers.{layer}.{norm}.weight"
            want = (source[name].double().numpy() / s).astype(np.float32)
            assert np.allclose(got[name].float().numpy(), want, rtol=1e-2, atol=0), name  # stored in bf16
            assert not torch.equal(got[name], source[name])
            s32 = torch.from_numpy(s.astype(np.float32))
            ours = sq.smoothing_scales(stats.linears[f"model.layers.{layer}.{balanced[0]}"].abs_max,
                                       [source[f"model.layers.{layer}.{b}.weight"] for b in balanced], ALPHA)
            assert torch.allclose(ours, s32, rtol=1e-5)
            assert torch.equal(got[name], sq.fold_norm(source[name], ours, 0.0))
            for b in balanced:
                prefix = f"model.layers.{layer}.{b}"
                qt = rtn_quantize(source[f"{prefix}.weight"].float() * ours[None, :],
                                  QuantSpec(bits=8, group_size=-1, sym=True, scale_dtype="bfloat16"))
                assert torch.equal(got[f"{prefix}.weight"],
                                   torch.from_numpy((qt.codes.astype(np.int16) - 128).astype(np.int8)))
        for other in ("self_attn.o_proj", "mlp.down_proj"):  # not smoothed: plain W8A8
            prefix = f"model.layers.{layer}.{other}"
            qt = rtn_quantize(source[f"{prefix}.weight"], QuantSpec(bits=8, group_size=-1, sym=True,
                                                                    scale_dtype="bfloat16"))
            assert torch.equal(got[f"{prefix}.weight_scale"], torch.from_numpy(qt.scales).to(torch.bfloat16))


def test_folding_keeps_the_function():
    """RMSNorm → Linear computes the same after fold_norm / scale_columns (Gemma's (1 + w) norm too)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=gen) * torch.linspace(0.1, 20, 64)
    w = torch.randn(48, 64, generator=gen) * 0.05
    for offset in (0.0, 1.0):
        g = torch.rand(64, generator=gen) + 0.5
        rms = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        s = sq.smoothing_scales((rms * (g + offset)).abs().amax(0), [w], 0.5)
        before = (rms * (g + offset)) @ w.T
        after = (rms * (sq.fold_norm(g, s, offset) + offset)) @ sq.scale_columns(w, s).T
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
        assert s.min() >= sq.MIN_SCALE


def test_gptq_smoothquant(capsys, synthetic_dir, calib_text, stats_file, tmp_path):
    """GPTQ with --stats folds the same norms as RTN with --stats (the file's max |x|); with --dataset the
    factors come from each layer's inputs over the quantized layers before, and the output evaluates."""
    src = synthetic_dir("llama")
    rtn, gptq, seq = tmp_path / "rtn", tmp_path / "gptq", tmp_path / "seq"
    for out, method, data in ((rtn, "rtn", ["--stats", stats_file]), (gptq, "gptq", ["--stats", stats_file]),
                              (seq, "gptq", ["--dataset", calib_text, "--num-samples", "4", "--seq-len", "64",
                                             "--device", "cpu"])):
        code, _, err = _cli(capsys, "quantize", src, "--method", method, "--scheme", "w8a8", "--smoothquant",
                            ALPHA, *data, "-o", out)
        assert code == 0, err
    a, b, c, source = tensors(rtn), tensors(gptq), tensors(seq), tensors(src)
    norms = [f"model.layers.{i}.{n}.weight" for i in range(4) for n in MAPPINGS]
    for name in norms:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(c[name], source[name]), name
        # layer 0 sees the same (unquantized) inputs in the engine as in the stats file's pass
        if name.startswith("model.layers.0."):
            assert torch.allclose(c[name].float(), a[name].float(), rtol=2e-2), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # GPTQ moved codes
    assert torch.equal(a[f"{q}_scale"], b[f"{q}_scale"])  # same per-channel scales of the smoothed weight


@pytest.mark.parametrize(
    "arch,args,needle",
    [
        ("qwen3_moe", ["--method", "rtn", "--scheme", "w8a8", "--smoothquant", "0.5", "--stats", "STATS"],
         r"--smoothquant: no smoothing mappings for Mixture-of-Experts blocks yet \(qwen3moe with experts\)"),
        ("llama", ["--method", "rtn", "--scheme", "nvfp4a16", "--smoothquant", "0.5", "--stats", "STATS"],
         r"--smoothquant applies to --scheme w8a8"),
        ("llama", ["--method", "rtn", "--scheme", "w8a8", "--smoothquant", "0.5"],
         r"--smoothquant needs activation statistics: --dataset"),
        ("llama", ["--method", "gptq", "--scheme", "w8a8", "--smoothquant", "1.5", "--stats", "STATS"],
         r"--smoothquant 1.5: the smoothing strength α must be between 0 and 1"),
        ("llama", ["--method", "rtn", "--scheme", "w8a8", "--stats", "STATS"],
         r"--method rtn --scheme w8a8 needs no data"),
        ("llama", ["--method", "awq", "--smoothquant", "0.5", "--dataset", "x.txt"],
         r"--smoothquant does not apply to --method awq"),
    ],
)
def test_smoothquant_refusals(arch, args, needle, capsys, synthetic_dir, stats_file, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    args = [str(stats_file) if a == "STATS" else a for a in args]
    code, _, err = _cli(capsys, "quantize", synthetic_dir(arch), *args, "-o", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("qconvert: error: "), err
    assert re.search(needle, err), err
    assert list(out.parent.iterdir()) == []
