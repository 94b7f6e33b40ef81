"""gpt-oss (GptOssForCausalLM) end to end, in both forms the hub and transformers produce: experts as MXFP4
``*_blocks`` / ``*_scales`` (openai/gpt-oss-*) and as dequantized bf16 (fused gate_up_proj / down_proj with
biases). Held to llama.cpp's own two steps as the other MoE families are (test_convert_moe.py): the
vendored convert_hf_to_gguf.py, then llama_model_quantize; llama.cpp's logits against transformers'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.formats.gguf.imatrix import write_imatrix_gguf
from qconvert.kernels import dequantize, quantize
from tests.helpers import TOKENS, assert_convert_refused, assert_same_gguf, hf_logits, llama_logits
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize
from tests.pipelines.test_convert_moe import _convert, _edit, _expert_imatrix

FT = gguf.LlamaFileType
Q = gguf.GGMLQuantizationType
FORMS = ("bf16", "mxfp4")
PRE = "smollm"  # the synthetic tokenizer imitates SmolLM2's; the converter's vocab is _set_vocab_gpt2
FILE_TYPES = ["MXFP4_MOE", "Q4_K_M", "Q8_0"]


@pytest.fixture(scope="module")
def gpt_oss(fixtures_lib):
    return fixtures_lib.gpt_oss_dir


@pytest.fixture(scope="module")
def reference_bf16(llamacpp_converter, gpt_oss, tmp_path_factory):
    """form -> (HF dir, the converter's BF16 GGUF of it), converted once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(form: str) -> tuple[Path, Path]:
        if form not in made:
            model = gpt_oss(form)
            out = tmp_path_factory.mktemp(f"ref-gpt-oss-{form}") / "bf16.gguf"
            made[form] = (model, convert_hf_to_gguf(llamacpp_converter, model, out, PRE))
        return made[form]

    return get


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- the fixture: one model, two layouts

def test_mxfp4_form_loads_in_transformers_as_the_bf16_form(gpt_oss):
    """transformers' own Mxfp4 loader (dequantizing on CPU) reads our blocks and scales back to the bf16
    form's experts, bit for bit: the packed layout is the one it reads."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(gpt_oss("bf16"), dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(gpt_oss("mxfp4"), dtype=torch.float32).state_dict()
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    cfg = json.loads((gpt_oss("mxfp4") / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["architectures"] == ["GptOssForCausalLM"]


# ---------------------------------------------------------------- the converter's BF16 file

@pytest.mark.parametrize("form", FORMS)
def test_bf16_equals_convert_hf_to_gguf(form, reference_bf16, tmp_path):
    model, ref = reference_bf16(form)
    ours = _convert(model, tmp_path / "ours.gguf", "BF16")
    assert_same_gguf(ours, ref, order=False)
    t = _tensors(ours)
    expert = Q.MXFP4 if form == "mxfp4" else Q.BF16
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        assert t[f"blk.1.{name}.weight"].tensor_type == expert and list(t[f"blk.1.{name}.weight"].shape) == [
            256, 256, 4]
        assert t[f"blk.1.{name}.bias"].tensor_type == Q.F32
    sinks = t["blk.0.attn_sinks.weight"]
    assert sinks.tensor_type == Q.F32 and list(sinks.shape) == [4]
    kv = gguf.GGUFReader(ours).fields
    assert kv["gpt-oss.attention.sliding_window"].contents() == 4
    assert "gpt-oss.attention.sliding_window_pattern" not in kv  # the default layer_types: llama.cpp's 2
    want_ft = FT.MOSTLY_MXFP4_MOE if form == "mxfp4" else FT.MOSTLY_BF16
    assert kv["general.file_type"].contents() == want_ft


def test_mxfp4_experts_are_moved_not_requantized(gpt_oss, tmp_path):
    """The MXFP4 experts are the checkpoint's blocks: ggml's MXFP4 quantization of the bf16 form's (already
    MXFP4-exact) weights gives the same bytes, and they decode to those weights; gate = even rows of
    gate_up_proj's transpose, up = odd."""
    from safetensors.torch import load_file

    ours = _convert(gpt_oss("mxfp4"), tmp_path / "ours.gguf", "BF16")
    t = _tensors(ours)
    dense = load_file(str(gpt_oss("bf16") / "model.safetensors"))
    gate_up = dense["model.layers.2.mlp.experts.gate_up_proj"].float().numpy().transpose(0, 2, 1)
    down = dense["model.layers.2.mlp.experts.down_proj"].float().numpy().transpose(0, 2, 1)
    for name, w in (("ffn_gate_exps", gate_up[:, 0::2]), ("ffn_up_exps", gate_up[:, 1::2]),
                    ("ffn_down_exps", down)):
        got = np.asarray(t[f"blk.2.{name}.weight"].data).reshape(-1, 8 * 17)
        assert got.tobytes() == quantize(np.ascontiguousarray(w), Q.MXFP4).tobytes(), name
        assert np.array_equal(dequantize(got, Q.MXFP4).reshape(w.shape), w), name


# ---------------------------------------------------------------- llama-quantize of it

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_file_types_equal_llama_quantize(form, file_type, reference_bf16, tmp_path):
    """MXFP4_MOE copies the MXFP4 experts (and quantizes the bf16 form's to the same bytes); any other type
    requantizes their exact values, as llama-quantize --allow-requantize does (it refuses without)."""
    model, bf16 = reference_bf16(form)
    ours = _convert(model, tmp_path / "ours.gguf", file_type)
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")), allow_requantize=True)
    assert_same_gguf(ours, ref)
    t = _tensors(ours)
    want = {"MXFP4_MOE": Q.MXFP4, "Q4_K_M": None, "Q8_0": Q.Q8_0}[file_type]
    if want is not None:
        assert t["blk.3.ffn_down_exps.weight"].tensor_type == want
    if file_type == "MXFP4_MOE":
        assert t["blk.0.attn_q.weight"].tensor_type == Q.Q8_0 and t["output.weight"].tensor_type == Q.Q8_0


def test_imatrix_file_type_equals_llama_quantize(reference_bf16, tmp_path):
    """IQ2_XS needs an imatrix: each MXFP4 expert's slice with its own row (one expert without tokens)."""
    model, bf16 = reference_bf16("mxfp4")
    imx = _expert_imatrix(bf16)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imx)
    ours = _convert(model, tmp_path / "ours.gguf", "IQ2_XS", imatrix=tmp_path / "imatrix.gguf")
    ref = tmp_path / "ref.gguf"
    kvs = {"quantize.imatrix.file": str(tmp_path / "imatrix.gguf"), "quantize.imatrix.dataset": "calib.txt",
           "quantize.imatrix.entries_count": len(imx.entries), "quantize.imatrix.chunks_count": 10}
    weights = {n: imx.weights(n) for n in imx.entries}
    model_quantize(bf16, ref, int(FT.MOSTLY_IQ2_XS), imatrix=weights, kv_overrides=kvs, allow_requantize=True)
    assert_same_gguf(ours, ref)


# ---------------------------------------------------------------- llama.cpp runs it like transformers

@pytest.mark.parametrize(("form", "file_type"), [("bf16", "F32"), ("mxfp4", "F32")])
def test_llama_cpp_logits_match_transformers(form, file_type, gpt_oss, tmp_path):
    """Sinks, biases, the clamped SwiGLU, softmax over the chosen experts' logits and the sliding window
    (4, crossed by the 8 tokens on the even layers) as transformers computes them. The mxfp4 form's F32
    file keeps its experts MXFP4 (llama.cpp multiplies them by Q8_0-rounded activations)."""
    model = gpt_oss(form)
    out = _convert(model, tmp_path / "m.gguf", file_type)
    if form == "mxfp4":
        assert _tensors(out)["blk.0.ffn_up_exps.weight"].tensor_type == Q.MXFP4
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max(), f"max |Δlogit| {np.abs(got - ref).max():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_other_layer_types_write_the_pattern(gpt_oss, tmp_path):
    """layer_types other than transformers' default (even layers sliding) would be run wrongly under the
    converter's file (llama.cpp assumes 2); the pattern KV, which llama.cpp reads first, says what they are,
    and llama.cpp's logits follow transformers' again."""
    model = tmp_path / "m"
    shutil.copytree(gpt_oss("bf16"), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    (model / "config.json").write_text(json.dumps(cfg))
    out = _convert(model, tmp_path / "m.gguf", "F32")
    kv = gguf.GGUFReader(out).fields
    assert kv["gpt-oss.attention.sliding_window_pattern"].contents() == [False, True, True, False]
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max(), f"max |Δlogit| {np.abs(got - ref).max():.4f}"


# ---------------------------------------------------------------- bad input: one line, no output

def _reshape(name: str, fn):
    def change(t):
        t[name] = fn(t[name]).contiguous().clone()
    return change


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t.pop("model.layers.1.mlp.experts.down_proj_scales"),
     r"model\.layers\.1\.mlp\.experts\.down_proj_scales is missing \(MXFP4 experts need both"),
    (lambda t: t.pop("model.layers.0.mlp.experts.gate_up_proj_blocks"),
     r"model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks is missing"),
    (_reshape("model.layers.2.mlp.experts.gate_up_proj_scales", lambda x: x[:, :, :4]),
     r"MXFP4 experts model\.layers\.2\.mlp\.experts\.gate_up_proj_blocks \[4, 512, 8, 16\] / .*_scales "
     r"\[4, 512, 4\]: expected blocks \[E, 2\*I, H/32, 16\]"),
    (_reshape("model.layers.3.mlp.experts.down_proj_blocks", lambda x: x[:3]),
     r"down_proj_blocks \[3, 256, 8, 16\] .* with E=4, H=256"),
    (_reshape("model.layers.3.mlp.experts.down_proj_blocks", lambda x: x.reshape(4, 256, 16, 8)),
     r"down_proj_blocks \[4, 256, 16, 8\]"),
])
def test_bad_mxfp4_experts_are_refused(change, match, gpt_oss, tmp_path):
    model = _edit(gpt_oss("mxfp4"), tmp_path / "m", change)
    assert_convert_refused(model, tmp_path, match)


def test_other_swiglu_constants_are_refused(gpt_oss, tmp_path):
    """transformers 5.25 reads swiglu_alpha / swiglu_limit from config.json; llama.cpp hardcodes 1.702 / 7.0
    and the converter writes neither, so another value would run another activation."""
    model = tmp_path / "m"
    shutil.copytree(gpt_oss("bf16"), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "swiglu_limit": 10.0}))
    assert_convert_refused(model, tmp_path,
                           r"gpt-oss swiglu_limit 10\.0 is not 7\.0, the value llama\.cpp's gpt-oss graph")


def test_bad_fused_experts_are_refused(gpt_oss, tmp_path):
    model = _edit(gpt_oss("bf16"), tmp_path / "m",
                  _reshape("model.layers.1.mlp.experts.gate_up_proj", lambda x: x.transpose(1, 2)))
    assert_convert_refused(model, tmp_path,
                           r"fused expert tensor model\.layers\.1\.mlp\.experts\.gate_up_proj has shape "
                              r"\[4, 512, 256\], expected \[E, H, 2\*I\] with E=4, H=256")


def test_bad_mxfp4_experts_exit_2_from_the_cli(gpt_oss, capsys, tmp_path):
    from qconvert import cli

    model = _edit(gpt_oss("mxfp4"), tmp_path / "m",
                  lambda t: t.pop("model.layers.1.mlp.experts.gate_up_proj_scales"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(model), "--to", "gguf", "-o", str(out / "o.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "gate_up_proj_scales is missing" in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- quantize and eval

def _read_all(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_rtn_quantize_reads_mxfp4_experts_as_their_bf16_values(gpt_oss, quantize_cli, tmp_path):
    """rtn quantizes the attention Linears and keeps the routers and the fused experts; an MXFP4 source's
    experts are written as the bf16 values transformers dequantizes them to, not as blocks under the output
    method's quantization_config: both forms give the same checkpoint, bit for bit."""
    import torch

    outs = {}
    for form in FORMS:
        code, out, err = quantize_cli(gpt_oss(form), "--method", "rtn", "-o", tmp_path / form)
        assert code == 0, err
        outs[form] = _read_all(tmp_path / form)
        cfg = json.loads((tmp_path / form / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert ("dequantized 8 MXFP4 expert tensors to bf16" in out), out
    a, b = outs["bf16"], outs["mxfp4"]
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert "model.layers.0.self_attn.q_proj.qweight" in a and "model.layers.0.mlp.router.weight" in a
    dense = _read_all(gpt_oss("bf16"))
    name = "model.layers.3.mlp.experts.gate_up_proj"
    assert torch.equal(a[name], dense[name])
    assert not [k for k in a if k.endswith(("_blocks", "_scales"))]


def test_rtn_quantize_refuses_bad_mxfp4_experts(gpt_oss, quantize_cli, tmp_path):
    model = _edit(gpt_oss("mxfp4"), tmp_path / "m",
                  _reshape("model.layers.2.mlp.experts.down_proj_scales", lambda x: x[:, :, :4]))
    code, out, err = quantize_cli(model, "--method", "rtn", "-o", tmp_path / "q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "down_proj_blocks U8 [4, 256, 8, 16] / model.layers.2.mlp.experts.down_proj_scales U8 " \
        "[4, 256, 4]" in err
    assert not (tmp_path / "q").exists()


def test_eval_runs_both_forms_and_their_files(gpt_oss, eval_text, tmp_path):
    """eval loads the MXFP4 form through transformers' own dequantizer (eager attention: gpt-oss has no sdpa
    path), the same model as the bf16 form (KL exactly 0); the GGUF runs in llama.cpp close to it."""
    from qconvert.evaluate.run import evaluate

    same = evaluate(gpt_oss("mxfp4"), eval_text, reference=gpt_oss("bf16"), ctx=64, chunks=1, threads=2)
    assert same.kl_divergence["mean"] == 0.0 and same.top1_agreement == 1.0
    gguf_file = _convert(gpt_oss("mxfp4"), tmp_path / "m.gguf", "F32")
    r = evaluate(gguf_file, eval_text, reference=gpt_oss("bf16"), ctx=64, chunks=1, threads=2)
    assert r.backend == "llama.cpp" and r.kl_divergence["mean"] < 0.05, r.kl_divergence
    assert abs(r.perplexity / same.perplexity - 1) < 0.1


def test_imatrix_runs_with_eager_attention(gpt_oss, calib_text, tmp_path):
    """gpt-oss has no sdpa path (attention sinks): the calibration engine asks transformers for eager, as
    eval does (load/config.attn_implementation), instead of failing on the sdpa request."""
    from qconvert.load import open_checkpoint
    from qconvert.pipelines.imatrix import compute_imatrix

    text = tmp_path / "t.txt"
    text.write_text(calib_text.read_text()[:8000])
    run = compute_imatrix(open_checkpoint(gpt_oss("bf16")), str(text), ctx_size=32, chunks=2, device="cpu",
                          compute_ppl=False)
    sums, counts = run.imatrix.entries["blk.0.attn_q.weight"]
    assert counts.tolist() == [2 * 32] and sums.shape == (1, 256) and np.isfinite(sums).all() and sums.any()
