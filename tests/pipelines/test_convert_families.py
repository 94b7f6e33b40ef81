"""`qconvert convert --to gguf` on the dense 2026 families, each held to llama.cpp's own two steps by one
generic check: the vendored convert_hf_to_gguf.py on the same synthetic checkpoint (BF16 and F32: every
tensor byte for byte, every KV but general.* provenance), llama_model_quantize of the converter's BF16 file
(Q4_K_M), and llama.cpp running our file with transformers' logits.

A new family is an ArchSpec in qconvert/arch/table.py, its config line in tests/fixtures.py FAMILY_EXTRA
(the synthetic checkpoint is built with transformers' own class) and its name in FAMILIES below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.pipelines.convert import ConvertOptions, convert
from tests.helpers import (
    TOKENS,
    assert_convert_refused,
    assert_same_gguf,
    hf_logits,
    llama_logits,
    tensor_bytes,
)
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize

FT = gguf.LlamaFileType
# HF model_type of each synthetic checkpoint (tests/fixtures.py FAMILY_EXTRA)
FAMILIES = ["smollm3", "olmo2", "olmo3", "granite", "glm4", "exaone4", "cohere2", "seed_oss", "ernie4_5",
            "lfm2", "falcon_h1", "qwen3_5"]
# the converter's options a family needs: Qwen3.5 asserts an MTP head unless told there is none (the
# synthetic checkpoint has none; we drop a checkpoint's MTP head as --no-mtp does)
CONVERTER_ARGS = {"qwen3_5": ("--no-mtp",)}
OUTTYPES = ["bf16", "f32"]
# the llama.cpp name the converter's hash gives the real tokenizer a fixture tokenizer style imitates (the
# SentencePiece path never asks)
PRE = {"qwen2": "qwen2", "spm": "default"}


def converter_gguf(converter: Path, fixtures_lib, family: str, out: Path, outtype: str = "bf16") -> Path:
    """The vendored converter's GGUF of a family's synthetic checkpoint, with the family's pre-tokenizer
    name and options."""
    pre = PRE.get(fixtures_lib.TOKENIZER_STYLE.get(family, "smollm"), "smollm")
    return convert_hf_to_gguf(converter, fixtures_lib.synthetic_dir(family), out, pre, outtype,
                              CONVERTER_ARGS.get(family, ()))


@pytest.fixture(scope="module")
def reference(llamacpp_converter, fixtures_lib, tmp_path_factory):
    """(family, outtype) -> (HF dir, the converter's GGUF of it), converted once per module."""
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(family: str, outtype: str = "bf16") -> tuple[Path, Path]:
        if (family, outtype) not in made:
            out = tmp_path_factory.mktemp(f"ref-{family}") / f"{family}-{outtype}.gguf"
            made[family, outtype] = (fixtures_lib.synthetic_dir(family),
                                     converter_gguf(llamacpp_converter, fixtures_lib, family, out, outtype))
        return made[family, outtype]

    return get


def _convert(model: Path, out: Path, file_type: str) -> Path:
    convert(str(model), ConvertOptions(file_type=file_type, output=out, threads=2))
    return out


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_convert_hf_to_gguf(family, outtype, reference, tmp_path):
    model, ref = reference(family, outtype)
    ours = _convert(model, tmp_path / "ours.gguf", outtype.upper())
    # the converter writes tensors in its own emit order; llama-quantize (and we) write llama.cpp's
    assert_same_gguf(ours, ref, order=False)
    assert gguf.GGUFReader(ours).fields["general.architecture"].contents() == \
        gguf.GGUFReader(ref).fields["general.architecture"].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_equals_llama_quantize(family, reference, tmp_path):
    model, bf16 = reference(family)
    ours = _convert(model, tmp_path / "ours.gguf", "Q4_K_M")
    ref = tmp_path / "ref.gguf"
    model_quantize(bf16, ref, FT.MOSTLY_Q4_K_M)
    assert_same_gguf(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_match_transformers(family, synthetic_dir, tmp_path):
    model = synthetic_dir(family)
    out = _convert(model, tmp_path / "m.gguf", "BF16")
    ref, got = hf_logits(model, TOKENS), llama_logits(out, TOKENS)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err < 0.03 * np.abs(ref).max(), f"{family}: max |Δlogit| {err:.4f} of {np.abs(ref).max():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


# ---------------------------------------------------------------- what llama.cpp cannot run: one line

def _copy(model: Path, out: Path, config: dict | None = None) -> Path:
    shutil.copytree(model, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return out


def _edit_weights(model: Path, edit) -> None:
    """Rewrite the single-file checkpoint's tensors through ``edit(tensors)`` (a dict, changed in place)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def test_smollm3_other_nope_pattern_is_refused(synthetic_dir, tmp_path):
    """llama.cpp hardcodes NoPE on every 4th layer; the converter would write the file anyway."""
    model = _copy(synthetic_dir("smollm3"), tmp_path / "m", {"no_rope_layers": [1, 0, 1, 0]})
    assert_convert_refused(model, tmp_path,
                           r"smollm3 no_rope_layers \[1, 0, 1, 0\] is not llama\.cpp's fixed pattern")


def test_exaone4_sliding_window_off_the_32b_is_refused(synthetic_dir, tmp_path):
    """llama.cpp runs EXAONE 4's sliding windows (and NoPE on its global layers) for 64 layers only."""
    model = _copy(synthetic_dir("exaone4"), tmp_path / "m", {
        "sliding_window": 4, "sliding_window_pattern": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"]})
    assert_convert_refused(model, tmp_path,
                           r"exaone4 with sliding_window and 4 layers: llama\.cpp runs sliding-window")


def test_cohere2_nonzero_bias_is_refused(synthetic_dir, tmp_path):
    import torch

    model = _copy(synthetic_dir("cohere2"), tmp_path / "m")
    _edit_weights(model, lambda t: t.update({
        "model.layers.1.self_attn.q_proj.bias": torch.full((256,), 0.5, dtype=torch.bfloat16),
        "model.layers.2.self_attn.k_proj.bias": torch.zeros(128, dtype=torch.bfloat16)}))
    assert_convert_refused(model, tmp_path,
                           r"bias tensor model\.layers\.1\.self_attn\.q_proj\.bias is not zero")


def test_cohere2_zero_biases_are_dropped(synthetic_dir, tmp_path):
    """As the converter drops them: the file equals the one without biases."""
    import torch

    model = _copy(synthetic_dir("cohere2"), tmp_path / "m")
    _edit_weights(model, lambda t: t.update(
        {"model.layers.0.self_attn.v_proj.bias": torch.zeros(128, dtype=torch.bfloat16)}))
    with_bias = tensor_bytes(_convert(model, tmp_path / "a.gguf", "BF16"))
    assert with_bias == tensor_bytes(_convert(synthetic_dir("cohere2"), tmp_path / "b.gguf", "BF16"))


def test_glm4_tokenizer_without_its_user_token_is_refused(synthetic_dir, tmp_path):
    model = _copy(synthetic_dir("glm4"), tmp_path / "m")
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|user|>"]
    (model / "tokenizer.json").write_text(json.dumps(tj))
    assert_convert_refused(model, tmp_path, r"glm4 tokenizer has no <\|user\|> token")


def test_ernie4_5_without_tokenizer_model_is_refused(synthetic_dir, tmp_path):
    model = _copy(synthetic_dir("ernie4_5"), tmp_path / "m")
    (model / "tokenizer.model").unlink()
    assert_convert_refused(model, tmp_path, r"no tokenizer found for ernie4_5 \(needs tokenizer\.model\)")


# ---------------------------------------------------------------- hybrid stacks: layer_types, their tensors

def test_lfm2_unknown_layer_type_is_refused(synthetic_dir, tmp_path):
    model = _copy(synthetic_dir("lfm2"), tmp_path / "m",
                  {"layer_types": ["conv", "full_attention", "mamba", "full_attention"]})
    assert_convert_refused(model, tmp_path,
                           r"lfm2: layer_types\[2\] is 'mamba', not one of conv, full_attention")


# hybrid layers whose mixer misses a tensor: (family, HF tensor removed, the error)
MISSING_MIXER_TENSOR = [
    ("lfm2", "model.layers.2.conv.in_proj.weight",
     r"lfm2 layer 2 \(conv\) has no blk\.2\.shortconv\.in_proj\.weight"),
    ("falcon_h1", "model.layers.1.mamba.A_log",
     r"falcon-h1 layer 1 has no blk\.1\.ssm_a: the checkpoint lacks"),
    ("qwen3_5", "model.layers.2.linear_attn.in_proj_b.weight",
     r"qwen35 layer 2 \(linear_attention\) has no blk\.2\.ssm_beta\.weight"),
]


@pytest.mark.parametrize(("family", "tensor", "error"), MISSING_MIXER_TENSOR, ids=[f for f, _, _ in
                                                                                  MISSING_MIXER_TENSOR])
def test_hybrid_layer_without_its_mixer_tensor_is_refused(family, tensor, error, synthetic_dir, tmp_path):
    model = _copy(synthetic_dir(family), tmp_path / "m")
    _edit_weights(model, lambda t: t.pop(tensor))
    assert_convert_refused(model, tmp_path, error)


def test_lfm2_conv_weight_of_another_shape_is_refused(synthetic_dir, tmp_path):
    import torch

    model = _copy(synthetic_dir("lfm2"), tmp_path / "m")
    _edit_weights(model, lambda t: t.update(
        {"model.layers.0.conv.conv.weight": torch.zeros(256, 3, dtype=torch.bfloat16)}))
    assert_convert_refused(model, tmp_path, r"model\.layers\.0\.conv\.conv\.weight has shape \[256, 3\], "
                                            r"expected a depthwise convolution")


def test_falcon_h1_short_ssm_multipliers_are_refused(synthetic_dir, tmp_path):
    model = _copy(synthetic_dir("falcon_h1"), tmp_path / "m", {"ssm_multipliers": [1.0, 1.0]})
    assert_convert_refused(model, tmp_path, r"falcon-h1 ssm_multipliers \[1\.0, 1\.0\]: expected 5 values")


def test_qwen3_5_value_heads_off_the_key_heads_are_refused(synthetic_dir, tmp_path):
    """The converter tiles value heads per key head; a count that does not divide has no such order."""
    model = _copy(synthetic_dir("qwen3_5"), tmp_path / "m", {"linear_num_value_heads": 3})
    assert_convert_refused(model, tmp_path, r"qwen35: linear_num_value_heads 3 is not a multiple of "
                                            r"linear_num_key_heads 2")


def test_qwen3_5_unknown_layer_type_is_refused(synthetic_dir, tmp_path):
    model = _copy(synthetic_dir("qwen3_5"), tmp_path / "m", {
        "layer_types": ["linear_attention", "mamba", "linear_attention", "full_attention"]})
    assert_convert_refused(model, tmp_path, r"qwen35: layer_types\[1\] is 'mamba', not one of "
                                            r"linear_attention, full_attention")


def test_qwen3_5_mtp_head_is_dropped_as_with_no_mtp(synthetic_dir, tmp_path):
    """The hub's Qwen3.5 checkpoints carry an MTP head (mtp.*); it is left out, as convert_hf_to_gguf.py
    --no-mtp leaves it: the file equals the one of the same checkpoint without it."""
    import torch

    plain = synthetic_dir("qwen3_5")
    model = _copy(plain, tmp_path / "m")
    _edit_weights(model, lambda t: t.update({
        "mtp.fc.weight": torch.ones(256, 512, dtype=torch.bfloat16),
        "mtp.layers.0.input_layernorm.weight": torch.ones(256, dtype=torch.bfloat16)}))
    ours = _convert(model, tmp_path / "mtp.gguf", "BF16")
    assert not [n for n in tensor_bytes(ours) if "nextn" in n or n.startswith("blk.4.")]
    assert_same_gguf(ours, _convert(plain, tmp_path / "plain.gguf", "BF16"))
