"""quantize on Mixture-of-Experts checkpoints, judged by transformers: the compressed-tensors output (each
expert under the checkpoint's per-expert names) loads with no missing or unexpected key, transformers' fused
expert parameters hold exactly what our reference unpacker gives, the model generates, and eval's two HF
loaders (transformers' and ours) agree."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.evaluate.backends import _load_unpacked
from qconvert.load import open_checkpoint
from tests.helpers import run_cli

# glm4_moe, deepseek_v3: their first layer is dense
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3"]
METHODS = {"rtn": ["--method", "rtn", "--group-size", "64"], "fp8": ["--method", "fp8"],
           "gptq": ["--method", "gptq", "--group-size", "64", "--num-samples", "4", "--seq-len", "64"],
           # symmetric: transformers 5.25 cannot decompress zero-point experts (its fused-expert dequantizer
           # finds no zero_point among the per-expert tensors)
           "awq": ["--method", "awq", "--no-zero-point", "--group-size", "64", "--num-samples", "4",
                   "--seq-len", "64"]}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_tensors_moe_loads_in_transformers(arch, method, synthetic_dir, calib_text, capsys,
                                                     tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = synthetic_dir(arch)
    out = tmp_path / "q"
    data = ["--dataset", calib_text] if method in ("awq", "gptq") else []
    code, _, err = run_cli(capsys, "quantize", src, *METHODS[method], *data, "--format", "compressed-tensors",
                           "-o", out)
    assert code == 0, err
    # as users load it (compressed Linears run compressed; fp8 quantizes activations at run time)
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)

    # weight-only, every weight decompressed: transformers' fused experts hold our reference unpacker's values
    model = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    ckpt = open_checkpoint(out)
    ours = _load_unpacked(ckpt)  # per-expert Linears from our numpy-reference unpacker
    dense = dict(ours.named_parameters())
    gate_n, up_n, down_n = _proj_names(dense)
    fused = [(n, m) for n, m in model.named_modules() if hasattr(m, "gate_up_proj")]
    assert len(fused) == model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    # compressed-tensors 0.20 decompresses a Linear into the model's dtype (bf16 here) and the experts into
    # their fused parameters' (int4: bf16, fp8: float32): our float32 values rounded to it once
    model_dt = getattr(torch, json.loads((out / "config.json").read_text())["dtype"])
    experts_dt = fused[0][1].gate_up_proj.dtype
    packed = [k[: -len("_scale")] for k in ckpt.tensors if k.endswith(".weight_scale")]
    assert packed
    expected = {n: dense[n].to(experts_dt if ".experts." in n else model_dt).float() for n in packed}
    for name, mod in fused:
        ckpt_name = name.replace(".mlp.", f".{_block(dense)}.")
        for e in range(mod.gate_up_proj.shape[0]):
            gate, up, down = (expected[f"{ckpt_name}.{e}.{p}.weight"] for p in (gate_n, up_n, down_n))
            torch.testing.assert_close(mod.gate_up_proj[e].float(), torch.cat([gate, up]), rtol=0, atol=0)
            torch.testing.assert_close(mod.down_proj[e].float(), down, rtol=0, atol=0)
    theirs = dict(model.named_parameters())
    for n, value in expected.items():
        if n in theirs:  # the non-expert Linears
            torch.testing.assert_close(theirs[n].float(), value, rtol=0, atol=0)
        dense[n].data = value
    # transformers 5.25 runs bf16 experts under a float32 model with grouped_mm far off (|dlogit| ~3 here):
    # compare the forwards with the same float32 values on both sides; then routing and all, they agree
    for p in model.parameters():
        p.data = p.data.float()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _block(dense: dict) -> str:
    return "block_sparse_moe" if any(".block_sparse_moe." in n for n in dense) else "mlp"


def _proj_names(dense: dict) -> tuple[str, str, str]:
    if any(".experts.0.w1." in n for n in dense):
        return ("w1", "w3", "w2")
    return ("gate_proj", "up_proj", "down_proj")
