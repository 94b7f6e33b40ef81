"""GLM-4.5 / 4.6 / 4.7 (Glm4MoeForCausalLM -> glm4moe) end to end, held to llama.cpp's own two steps as the
other MoE families are (test_convert_moe.py): the vendored convert_hf_to_gguf.py (Glm4MoeModel), then
llama_model_quantize; llama.cpp's logits against transformers'.

The synthetic checkpoint (tests/fixtures.py MOE_EXTRA["glm4_moe"]) is built with transformers' own class:
one leading dense layer, 8 routed experts + 1 shared, sigmoid routing with a non-zero correction bias,
routed scaling 2.5, renormalised top-2, q/k/v biases, q/k norms, partial rotary 0.5, GLM's special tokens,
and num_nextn_predict_layers 1 without any MTP tensor (what transformers saves): block_count counts the MTP
layer anyway (Glm4MoeModel does), and llama.cpp's loader, finding no blk.L.nextn.eh_proj, loads the trunk.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.formats.gguf.imatrix import write_imatrix_gguf
from tests.helpers import TOKENS, assert_convert_refused, assert_same_gguf, hf_logits, llama_logits
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize
from tests.pipelines.test_convert_moe import _convert, _edit, _expert_imatrix

FT = gguf.LlamaFileType
Q = gguf.GGMLQuantizationType
ARCH = "glm4_moe"
PRE = "smollm"  # the synthetic tokenizer splits as SmolLM2's does
FILE_TYPES = ["Q4_K_M", "MXFP4_MOE", "Q6_K", "Q2_K"]


@pytest.fixture(scope="module")
def model(synthetic_dir) -> Path:
    return synthetic_dir(ARCH)


@pytest.fixture(scope="module")
def reference_bf16(llamacpp_converter, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref-glm4moe") / "glm4moe-bf16.gguf"
    return convert_hf_to_gguf(llamacpp_converter, model, out, PRE)


def _copy(model: Path, out: Path, **config) -> Path:
    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


# ---------------------------------------------------------------- the converter's BF16 file

def test_bf16_equals_convert_hf_to_gguf(model, reference_bf16, tmp_path):
    ours = _convert(model, tmp_path / "ours.gguf", "BF16")
    assert_same_gguf(ours, reference_bf16, order=False)
    r = gguf.GGUFReader(ours)
    kv = {k: f.contents() for k, f in r.fields.items() if k.startswith("glm4moe.")}
    # 4 decoder layers + the MTP layer the config names (and the checkpoint does not hold)
    assert kv["glm4moe.block_count"] == 5 and kv["glm4moe.nextn_predict_layers"] == 1
    assert kv["glm4moe.leading_dense_block_count"] == 1 and kv["glm4moe.expert_shared_count"] == 1
    assert kv["glm4moe.expert_gating_func"] == 2 and kv["glm4moe.expert_weights_norm"] is True
    assert kv["glm4moe.expert_weights_scale"] == 2.5 and kv["glm4moe.rope.dimension_count"] == 32
    types = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == (Q.BF16, (768, 256))  # the leading dense layer
    assert "blk.0.ffn_gate_inp.weight" not in types and "blk.0.ffn_down_exps.weight" not in types
    assert types["blk.1.ffn_down_exps.weight"] == (Q.BF16, (256, 256, 8))
    assert types["blk.1.ffn_gate_shexp.weight"] == (Q.BF16, (256, 256))
    assert types["blk.1.exp_probs_b.bias"] == (Q.F32, (8,))
    assert types["blk.1.ffn_gate_inp.weight"] == (Q.F32, (256, 8))
    assert types["blk.1.post_attention_norm.weight"] == (Q.F32, (256,))
    assert not [n for n in types if n.startswith("blk.4.")]
    tok = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.ggml.") and
           k.endswith("_token_id")}
    vocab = json.loads((model / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    # GLM's eot and eom; bos and unk come from the tokenizer files first (SpecialVocab keeps them)
    assert tok["tokenizer.ggml.eot_token_id"] == ids["<|user|>"]
    assert tok["tokenizer.ggml.eom_token_id"] == ids["<|observation|>"]


def test_fused_experts_equal_the_per_expert_layout(model, reference_bf16, tmp_path):
    """transformers 5's in-memory layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) gives the same file.
    Glm4MoeModel itself takes per-expert tensors only (it stops with "Unprocessed experts" on these)."""
    import torch

    def fuse(t):
        cfg = json.loads((model / "config.json").read_text())
        n = cfg["n_routed_experts"]
        layers = sorted({int(m[1]) for k in t if (m := re.search(r"layers\.(\d+)\.mlp\.experts\.", k))})
        for i in layers:
            p = f"model.layers.{i}.mlp.experts"
            gate = [t.pop(f"{p}.{x}.gate_proj.weight") for x in range(n)]
            up = [t.pop(f"{p}.{x}.up_proj.weight") for x in range(n)]
            t[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1).contiguous()
            t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{x}.down_proj.weight") for x in range(n)])

    fused = _edit(model, tmp_path / "fused", fuse)
    ours = _convert(fused, tmp_path / "fused.gguf", "BF16")
    assert_same_gguf(ours, reference_bf16, order=False)


def _add_mtp(t):
    """model.layers.4: the hub's MTP layer (layer 3 copied, plus eh_proj, enorm, hnorm, shared_head.norm)."""
    import torch

    src, dst = "model.layers.3.", "model.layers.4."
    for k in [k for k in t if k.startswith(src)]:
        t[dst + k[len(src):]] = t[k].clone()
    gen = torch.Generator().manual_seed(5)
    t[dst + "eh_proj.weight"] = (torch.randn(256, 512, generator=gen) / 512 ** 0.5).to(torch.bfloat16)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        t[dst + f"{norm}.weight"] = (1 + 0.1 * torch.randn(256, generator=gen)).to(torch.bfloat16)


def test_mtp_layer_comes_back_under_the_hub_names(model, tmp_path):
    """--to hf of a GGUF with the MTP layer: blk.4.* and blk.4.nextn.* return as model.layers.4.*, bit for
    bit, and num_hidden_layers leaves the MTP layer out again (the trunk-only case: test_gguf_to_hf)."""
    import torch

    from qconvert.pipelines.to_hf import convert_to_hf
    from tests.helpers import read_tensors

    mtp = _edit(model, tmp_path / "mtp", _add_mtp)
    back = convert_to_hf(_convert(mtp, tmp_path / "m.gguf", "BF16"), tmp_path / "hf").output
    orig, got = read_tensors(mtp), read_tensors(back)
    assert sorted(got) == sorted(orig)
    for name, t in orig.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    cfg = json.loads((back / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]) == (4, 1)


def test_mtp_layer_equals_convert_hf_to_gguf(llamacpp_converter, model, tmp_path):
    """A checkpoint that holds the MTP layer, as the hub's GLM-4.5 files do (model.layers.L: a full decoder
    layer plus eh_proj, enorm, hnorm, shared_head.norm): it is written as blk.L.* and blk.L.nextn.*, as the
    converter writes it, and llama.cpp still runs the trunk like transformers (which ignores layer L)."""
    mtp = _edit(model, tmp_path / "mtp", _add_mtp)
    ref = convert_hf_to_gguf(llamacpp_converter, mtp, tmp_path / "ref.gguf", PRE)
    ours = _convert(mtp, tmp_path / "ours.gguf", "BF16")
    assert_same_gguf(ours, ref, order=False)
    names = {t.name for t in gguf.GGUFReader(ours).tensors}
    assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.shared_head_norm.weight",
            "blk.4.ffn_down_exps.weight", "blk.4.attn_q.weight"} <= names
    q = _convert(mtp, tmp_path / "q.gguf", "Q4_K_M")
    ref_q = tmp_path / "ref-q.gguf"
    model_quantize(ref, ref_q, FT.MOSTLY_Q4_K_M)
    assert_same_gguf(q, ref_q)
    f32 = _convert(mtp, tmp_path / "f32.gguf", "F32")
    want, got = hf_logits(model, TOKENS), llama_logits(f32, TOKENS)
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


# ---------------------------------------------------------------- llama-quantize of it

@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_file_types_equal_llama_quantize(file_type, model, reference_bf16, tmp_path):
    ours = _convert(model, tmp_path / "ours.gguf", file_type)
    ref = tmp_path / "ref.gguf"
    model_quantize(reference_bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")))
    assert_same_gguf(ours, ref)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    if file_type == "Q4_K_M":  # 8 experts: the n_expert == 8 rules
        assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == Q.Q8_0
        assert types["blk.0.attn_output.weight"] == Q.Q5_K
    if file_type == "MXFP4_MOE":
        assert types["blk.3.ffn_down_exps.weight"] == Q.MXFP4
        assert types["blk.3.ffn_down_shexp.weight"] == types["blk.0.ffn_down.weight"] == Q.Q8_0
    assert types["blk.1.exp_probs_b.bias"] == types["blk.1.ffn_gate_inp.weight"] == Q.F32


@pytest.mark.parametrize("file_type", ["IQ2_XS", "IQ4_XS"])
def test_imatrix_file_types_equal_llama_quantize(file_type, model, reference_bf16, tmp_path):
    imx = _expert_imatrix(reference_bf16)  # expert 3 of every gate stack without tokens: all-ones weights
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imx)
    ours = _convert(model, tmp_path / "ours.gguf", file_type, imatrix=tmp_path / "imatrix.gguf")
    ref = tmp_path / "ref.gguf"
    kvs = {"quantize.imatrix.file": str(tmp_path / "imatrix.gguf"), "quantize.imatrix.dataset": "calib.txt",
           "quantize.imatrix.entries_count": len(imx.entries), "quantize.imatrix.chunks_count": 10}
    weights = {n: imx.weights(n) for n in imx.entries}
    model_quantize(reference_bf16, ref, int(getattr(FT, f"MOSTLY_{file_type}")), imatrix=weights,
                   kv_overrides=kvs)
    assert_same_gguf(ours, ref)


# ---------------------------------------------------------------- llama.cpp runs it like transformers

def test_llama_cpp_logits_match_transformers(model, tmp_path):
    """F32 as for the other MoE families (top-k routing is not continuous). The correction bias moves
    transformers' logits by far more than the tolerance, so the match covers exp_probs_b's selection."""
    import torch
    from transformers import AutoModelForCausalLM

    out = _convert(model, tmp_path / "m.gguf", "F32")
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert got.shape == ref.shape
    tol = 0.03 * np.abs(ref).max()
    assert np.abs(got - ref).max() < tol, f"max |Δlogit| {np.abs(got - ref).max():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        unbiased = hf(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(unbiased - ref).max() > 5 * tol


# ---------------------------------------------------------------- bad input: one line, no output

def test_tokenizer_without_gmask_is_refused(model, tmp_path):
    m = _copy(model, tmp_path / "m")
    tok = json.loads((m / "tokenizer.json").read_text())
    for t in tok["added_tokens"]:
        if t["content"] == "[gMASK]":
            t["content"] = "[MASK]"
    (m / "tokenizer.json").write_text(json.dumps(tok))
    assert_convert_refused(m, tmp_path, r"glm4moe tokenizer has no \[gMASK\] token")


def test_expert_groups_llama_cpp_cannot_load_are_refused(model, tmp_path):
    """transformers routes with topk_group == n_group (every group kept); llama.cpp's loader asserts
    topk_group < n_group and would abort on the file the converter writes."""
    m = _copy(model, tmp_path / "m", n_group=2, topk_group=2)
    assert_convert_refused(m, tmp_path, r"glm4moe n_group 2 / topk_group 2 with 8 experts")


def test_missing_expert_is_refused(model, tmp_path):
    m = _edit(model, tmp_path / "m", lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    assert_convert_refused(m, tmp_path, r"model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight is missing")
