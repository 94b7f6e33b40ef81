"""`qconvert quantize --scheme nvfp4a16 | mxfp4a16 | w8a8` end to end: every packed Linear equals our numpy
reference (kernels/fp4.py, methods/rtn) applied to the source, NVFP4's global scale is shared across the
Linears vLLM fuses, `inspect` names the preset, `eval --loader unpack` runs it, transformers
(compressed-tensors) loads it and generates; meaningless combinations are refused in one line before any
work."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qconvert import cli
from qconvert.arch.tensors import fused_groups
from qconvert.kernels import fp4
from qconvert.methods.rtn import rtn_quantize
from qconvert.methods.types import QuantSpec
from tests.helpers import read_tensors as tensors

SCHEMES = ("nvfp4a16", "mxfp4a16", "w8a8")



def _cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _check_layer(scheme: str, got: dict, prefix: str, w: torch.Tensor, global_scale: float | None) -> None:
    """The packed tensors of one Linear are the reference's for its source weight."""
    wn = w.float().numpy()
    if scheme == "w8a8":
        qt = rtn_quantize(w, QuantSpec(bits=8, group_size=-1, sym=True, scale_dtype="bfloat16"))
        assert torch.equal(got[f"{prefix}.weight"], torch.from_numpy((qt.codes.astype(np.int16) - 128)
                                                                       .astype(np.int8)))
        assert torch.equal(got[f"{prefix}.weight_scale"], torch.from_numpy(qt.scales).to(torch.bfloat16))
        return
    if scheme == "nvfp4a16":
        assert global_scale is not None
        codes, scales = fp4.nvfp4_quantize(wn, global_scale, "bfloat16")
        assert got[f"{prefix}.weight_global_scale"].tolist() == [global_scale]
        assert np.array_equal(got[f"{prefix}.weight_scale"].view(torch.uint8).numpy(), scales)
    else:
        codes, scales = fp4.mxfp4_quantize(wn, "bfloat16")
        assert np.array_equal(got[f"{prefix}.weight_scale"].numpy(), scales)
    assert np.array_equal(got[f"{prefix}.weight_packed"].numpy(), fp4.pack_nibbles(codes))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_output_is_the_reference(scheme, capsys, synthetic_dir, eval_text, tmp_path):
    src = synthetic_dir("llama")
    out = tmp_path / scheme
    code, stdout, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", scheme, "-o", out,
                             "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["scheme"] == scheme and summary["format"] == "compressed-tensors"
    assert len(summary["layers"]) == 4 * 7

    got, source = tensors(out), tensors(src)
    linears = [n[: -len(".weight")] for n in source if f"{n[: -len('.weight')]}.weight_scale" in got]
    assert len(linears) == 4 * 7
    groups = {m: g for g in fused_groups(linears) for m in g}
    assert len(groups) == 4 * 5  # q/k/v and gate/up of every layer
    for prefix in linears:
        members = groups.get(prefix, (prefix,))
        amax = max(float(source[f"{m}.weight"].float().abs().max()) for m in members)
        gs = float(fp4.nvfp4_global_scale(amax, "bfloat16")) if scheme == "nvfp4a16" else None
        _check_layer(scheme, got, prefix, source[f"{prefix}.weight"], gs)
    if scheme == "nvfp4a16":  # shared, and not by accident: the members' own scales differ
        own = {m: float(fp4.nvfp4_global_scale(float(source[f"{m}.weight"].float().abs().max()), "bfloat16"))
               for m in groups}
        assert any(len({own[m] for m in g}) > 1 for g in set(groups.values()))
        assert all(len({got[f"{m}.weight_global_scale"].item() for m in g}) == 1 for g in groups.values())
    for name, w in source.items():  # embeddings and norms: copied bit for bit
        if name[: -len(".weight")] not in linears:
            assert torch.equal(got[name], w), name

    code, stdout, err = _cli(capsys, "inspect", out, "--json")
    assert code in (0, None), err
    q = json.loads(stdout)["quantization"]
    preset = {"nvfp4a16": ("NVFP4A16", 4, 16, "torch.float8_e4m3fn", None),
              "mxfp4a16": ("MXFP4A16", 4, 32, "torch.uint8", None),
              "w8a8": ("W8A8", 8, -1, None, "int8 dynamic token")}[scheme]
    assert (q["scheme"], q["bits"], q["group_size"], q["scale_dtype"], q["activations"]) == preset

    code, stdout, err = _cli(capsys, "eval", out, "--dataset", eval_text, "--loader", "unpack", "-c", "128",
                             "--chunks", "2", "-t", "1", "--json")
    assert code in (0, None), err
    ppl = json.loads(stdout)["perplexity"]
    assert np.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_and_generates(scheme, capsys, synthetic_dir, tmp_path):
    """compressed-tensors (in transformers) decompresses every Linear to exactly our unpacked weights (cast
    to bf16), and the model kept compressed (default mode) generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qconvert.formats.packed import dense_tensors
    from qconvert.load import open_checkpoint

    out = tmp_path / scheme
    code, _, err = _cli(capsys, "quantize", synthetic_dir("llama"), "--method", "rtn", "--scheme", scheme,
                        "-o", out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True))
    with open_checkpoint(str(out)) as ckpt:
        ours = dict(dense_tensors(ckpt))
    params = dict(model.named_parameters())
    checked = 0
    for name, w in ours.items():
        if name.endswith(".weight") and "layers." in name and name in params and w.dim() == 2:
            assert torch.equal(params[name].detach(), w.to(torch.bfloat16)), name
            checked += 1
    assert checked == 4 * 7

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=4, do_sample=False)[0][ids["input_ids"].shape[1]:]
    assert new.numel() == 4


def test_w8a8_gptq(capsys, synthetic_dir, calib_text, tmp_path):
    """GPTQ on the W8A8 grid: int8 codes with RTN's per-channel scales (fixed before the GPTQ loop, as
    llm-compressor does), the same config as RTN's (act-order recorded only when asked)."""
    src = synthetic_dir("llama")
    out = tmp_path / "gptq"
    code, _, err = _cli(capsys, "quantize", src, "--method", "gptq", "--scheme", "w8a8",
                        "--dataset", calib_text, "--num-samples", "4", "--seq-len", "64", "--device", "cpu",
                        "-o", out)
    assert code == 0, err
    got, source = tensors(out), tensors(src)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["config_groups"]["group_0"]["weights"]["actorder"] is None
    differ = 0
    for name, w in source.items():
        prefix = name[: -len(".weight")]
        if f"{prefix}.weight_scale" not in got:
            continue
        rtn = rtn_quantize(w, QuantSpec(bits=8, group_size=-1, sym=True, scale_dtype="bfloat16"))
        assert got[name].dtype == torch.int8
        assert torch.equal(got[f"{prefix}.weight_scale"], torch.from_numpy(rtn.scales).to(torch.bfloat16))
        rtn_codes = torch.from_numpy((rtn.codes.astype(np.int16) - 128).astype(np.int8))
        differ += not torch.equal(got[name], rtn_codes)
    assert differ == 4 * 7  # GPTQ moved codes in every Linear


def _misfit_checkpoint(src: Path, out: Path) -> Path:
    """The synthetic llama with an MLP 776 wide (config.json says so too): every down_proj has 776 input
    columns (776 % 16 = 8)."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 776
    (out / "config.json").write_text(json.dumps(cfg))
    t = tensors(src)
    gen = torch.Generator().manual_seed(1)
    for layer in range(4):
        mlp = f"model.layers.{layer}.mlp"
        for name in ("gate_proj", "up_proj"):
            t[f"{mlp}.{name}.weight"] = (torch.randn(776, 256, generator=gen) * 0.02).to(torch.bfloat16)
        t[f"{mlp}.down_proj.weight"] = (torch.randn(256, 776, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "awq", "--scheme", "nvfp4a16", "--dataset", "x.txt"],
         r"--scheme nvfp4a16 is not offered by --method awq; use --method rtn"),
        (["--method", "gptq", "--scheme", "mxfp4a16", "--dataset", "x.txt"], r"not offered by --method gptq"),
        (["--method", "fp8", "--scheme", "w8a8"], r"use --method rtn or gptq"),
        (["--method", "rtn", "--scheme", "static"], r"--scheme static is not offered by --method rtn"),
        (["--method", "rtn", "--scheme", "nvfp4a16", "--bits", "3"], r"fixes the weight grid .* drop --bits"),
        (["--method", "rtn", "--scheme", "w8a8", "--group-size", "64"], r"drop --group-size"),
        (["--method", "rtn", "--scheme", "w8a8", "--asym"], r"drop --sym"),
        (["--method", "rtn", "--scheme", "mxfp4a16", "--mse"], r"drop --mse"),
        (["--method", "rtn", "--scheme", "w8a8", "--format", "gptq"],
         r"--scheme w8a8 writes --format compressed-tensors, not 'gptq'"),
        (["--method", "rtn", "--scheme", "nvfp4a16", "--ignore", r"layers\.2\.self_attn\.v_proj"],
         r"nvfp4: model\.layers\.2\.self_attn\.v_proj is kept dense but its fused siblings are not"),
        (["--method", "rtn", "--scheme", "w8a8", "--layer-config", "down-proj-8bit"],
         r"overrides .* do not apply to --scheme w8a8"),
    ],
)
def test_bad_combinations_refused_before_work(args, needle, capsys, synthetic_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "quantize", synthetic_dir("llama"), *args, "-o", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qconvert: error: "), err
    assert re.search(needle, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme,group", [("nvfp4a16", 16), ("mxfp4a16", 32)])
def test_input_dim_not_a_multiple_of_the_group_is_refused(scheme, group, capsys, synthetic_dir, tmp_path):
    src = _misfit_checkpoint(synthetic_dir("llama"), tmp_path / "src")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", scheme, "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(rf"model\.layers\.0\.mlp\.down_proj has 776 input columns, not a multiple of {group} "
                     r"\(and 3 more\); skip it with --ignore", err), err
    assert list(out.parent.iterdir()) == []
    # skipping them as told works
    code, _, err = _cli(capsys, "quantize", src, "--method", "rtn", "--scheme", scheme, "-o", out,
                        "--ignore", r"mlp\.down_proj$")
    assert code == 0, err


def test_smollm2_nvfp4a16_in_transformers(capsys, smollm2_dir, eval_text, tmp_path):
    """The real model, NVFP4A16 (bit-identical to llm-compressor's on this model: scripts/compare_fp4.py):
    transformers loads it compressed, generates, and its next-token choices mostly agree with the bf16
    model's (RTN NVFP4 on a 135M model is lossy: the 8-token continuation of "The capital of France is"
    is not Paris any more, for llm-compressor's file as for ours)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "nvfp4"
    code, _, err = _cli(capsys, "quantize", smollm2_dir, "--method", "rtn", "--scheme", "nvfp4a16", "-o", out)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=8, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 8
    text = tok(Path(eval_text).read_text()[:2000], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        agree = (model(text).logits.argmax(-1) == dense(text).logits.argmax(-1)).float().mean().item()
    assert agree > 0.6, agree
