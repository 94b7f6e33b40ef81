"""`qconvert imatrix` on gpt-oss: the experts (GptOssExperts, x@W with gate/up interleaved, biases, the
clamped swiglu) run as one biased Linear per expert (calib.experts.OaiExpertMLP) read as slices of the fused
tensors (load.expert_slices), so the file has llama-imatrix's ffn_{gate,up,down}_exps entries with per-expert
counts. Held to llama-imatrix on the converter's F32 GGUF of the same checkpoint, in both hub forms (MXFP4
blocks and bf16), and fed to convert --imatrix against llama_model_quantize with the same file.

llama.cpp computes YaRN's correction range truncated (ggml_rope_yarn_corr_dims: floor / ceil) whatever the
config says; gpt-oss's config says ``truncate: false``, which transformers follows. The two models differ
(relative 1e-3 in the full-attention layers' inputs), enough to flip the top-2 of a token or two. The oracle
comparison runs on a copy whose config says ``truncate: true``, the model llama.cpp runs; the hub config is
checked for the same entries and shapes."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from qconvert.formats.gguf.imatrix import read_imatrix
from qconvert.load import open_checkpoint
from qconvert.pipelines.convert import ConvertOptions, convert
from qconvert.pipelines.imatrix import compute_imatrix, write
from tests.helpers import assert_same_gguf
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize
from tests.pipelines.test_convert_gpt_oss import PRE
from tests.pipelines.test_imatrix_moe import CHUNKS, CTX, _llama_imatrix
from tests.pipelines.test_imatrix_run import _cos


@pytest.fixture(scope="module")
def gpt_oss(fixtures_lib):
    return fixtures_lib.gpt_oss_dir


@pytest.fixture(scope="module")
def llama_imatrix(llamacpp_bin, llamacpp_converter, gpt_oss, calib_text, tmp_path_factory):
    """llama-imatrix on the converter's F32 GGUF of the bf16 form (the MXFP4 form's values, exactly), with
    an F32 KV cache and no flash attention: float32 throughout, as our float32 forward, so every token goes
    to the same experts (see test_imatrix_moe); and the converter's BF16 GGUF for llama-quantize."""
    tmp = tmp_path_factory.mktemp("gpt-oss-imatrix")
    model = gpt_oss("bf16")
    f32 = convert_hf_to_gguf(llamacpp_converter, model, tmp / "f32.gguf", PRE, outtype="f32")
    _llama_imatrix(llamacpp_bin, f32, calib_text, tmp / "ref.gguf")
    bf16 = convert_hf_to_gguf(llamacpp_converter, model, tmp / "bf16.gguf", PRE)
    return read_imatrix(tmp / "ref.gguf"), bf16


def _as_llama_cpp_runs_it(model, out):
    """The checkpoint with rope_parameters.truncate true (llama.cpp's YaRN)."""
    import json
    import shutil

    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"]["truncate"] = True
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _ours(model, calib_text):
    return compute_imatrix(open_checkpoint(model), str(calib_text), ctx_size=CTX, chunks=CHUNKS, device="cpu",
                           dtype="f32", threads=1, batch_tokens=CTX * CHUNKS, compute_ppl=False).imatrix


@pytest.fixture(scope="module")
def ours(gpt_oss, calib_text, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt-oss-truncated")
    return {form: _ours(_as_llama_cpp_runs_it(gpt_oss(form), tmp / form), calib_text)
            for form in ("bf16", "mxfp4")}


def test_hub_config_gives_the_same_entries(gpt_oss, calib_text, llama_imatrix):
    ref, _ = llama_imatrix
    got = _ours(gpt_oss("mxfp4"), calib_text)
    shapes = {n: s.shape for n, (s, _) in ref.entries.items()}
    assert {n: s.shape for n, (s, _) in got.entries.items()} == shapes
    for name, (_, counts) in ref.entries.items():
        assert got.entries[name][1].sum() == counts.sum(), name


def test_both_forms_give_the_same_imatrix(ours):
    """The MXFP4 blocks dequantize to the bf16 form's values exactly: the same file, bit for bit."""
    a, b = ours["bf16"], ours["mxfp4"]
    assert set(a.entries) == set(b.entries)
    for name, (sums, counts) in a.entries.items():
        assert np.array_equal(sums, b.entries[name][0]) and np.array_equal(counts, b.entries[name][1]), name


@pytest.mark.parametrize("form", ["bf16", "mxfp4"])
def test_matches_llama_imatrix(form, ours, llama_imatrix):
    ref, _ = llama_imatrix
    got = ours[form]
    assert (got.chunk_count, got.chunk_size) == (ref.chunk_count, ref.chunk_size)
    assert set(got.entries) == set(ref.entries)
    experts = sorted(n for n in ref.entries if "_exps." in n)
    # every layer's three expert projections (gate and up are two tensors in the GGUF, one input)
    assert len(experts) == 3 * 4 and all(ref.entries[n][1].size == 4 for n in experts), experts
    worst = 1.0
    for name, (ref_sums, ref_counts) in ref.entries.items():
        sums, counts = got.entries[name]
        assert sums.shape == ref_sums.shape, name
        assert np.array_equal(counts, ref_counts), (name, counts, ref_counts)  # per expert: routed pairs
        for j in np.flatnonzero(ref_counts > 0):
            worst = min(worst, _cos(sums[j] / counts[j], ref_sums[j] / ref_counts[j]))
    assert worst >= 0.999, f"lowest per-entry cosine similarity {worst:.6f}"


def test_convert_with_it_equals_llama_quantize(gpt_oss, ours, llama_imatrix, calib_text, tmp_path):
    """IQ2_XS (an imatrix type) of the MXFP4 form with our file: the bytes llama_model_quantize writes from
    the converter's BF16 GGUF with the same file (--allow-requantize: it refuses MXFP4 experts without)."""
    _, bf16 = llama_imatrix
    imx_path = write(tmp_path / "ours.imatrix.gguf", ours["mxfp4"])
    out = tmp_path / "ours.gguf"
    opts = ConvertOptions(file_type="IQ2_XS", output=out, threads=1, imatrix=imx_path)
    convert(str(gpt_oss("mxfp4")), opts)
    back = read_imatrix(imx_path)
    kvs = {"quantize.imatrix.file": str(imx_path), "quantize.imatrix.dataset": str(calib_text),
           "quantize.imatrix.entries_count": len(back.entries),
           "quantize.imatrix.chunks_count": back.chunk_count}
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, int(gguf.LlamaFileType.MOSTLY_IQ2_XS),
                   imatrix={n: back.weights(n) for n in back.entries}, kv_overrides=kvs,
                   allow_requantize=True)
    assert_same_gguf(out, ref)


def test_calibrate_and_gptq_run(gpt_oss, calib_text, capsys, tmp_path):
    """calibrate: every expert's Linears have statistics from its routed tokens (2 per token); gptq
    quantizes the attention and keeps the fused experts, routers and lm_head as they are (no per-expert
    gpt-oss layout has a loader)."""
    from safetensors import safe_open

    from tests.helpers import read_tensors, run_cli

    small = ("--num-samples", "4", "--seq-len", "64", "--device", "cpu")
    stats = tmp_path / "s.safetensors"
    code, stdout, err = run_cli(capsys, "calibrate", gpt_oss("mxfp4"), "--dataset", calib_text, "-o", stats,
                                *small)
    assert code == 0, err
    with safe_open(str(stats), "pt") as st:
        meta = st.metadata()
    tokens = json.loads(meta["expert_tokens"])
    assert len(tokens) == 16 and sum(tokens.values()) == 2 * 4 * 64 * 4  # 4 layers, top-2
    code, stdout, err = run_cli(capsys, "quantize", gpt_oss("mxfp4"), "--method", "gptq", "--dataset",
                                calib_text, "-o", tmp_path / "q", *small)
    assert code == 0, err
    out = read_tensors(tmp_path / "q")
    assert "model.layers.0.self_attn.q_proj.qweight" in out
    assert out["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 256, 512)
