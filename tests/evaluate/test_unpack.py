"""The "unpack with our kernels" loader: GPTQ / AWQ / compressed-tensors checkpoints written by
`qconvert quantize` (RTN) become dense weights close to the source, and evaluate like transformers' own
dequantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qconvert.evaluate.run import evaluate
from qconvert.formats.packed import dense_tensors
from qconvert.load import open_checkpoint


@pytest.fixture(scope="module")
def tiny_src(synthetic_dir) -> Path:
    return synthetic_dir("llama")


def _quantize(src: Path, out: Path, fmt: str) -> Path:
    from qconvert.pipelines.quantize import QuantizeOptions, run_quantize

    run_quantize(QuantizeOptions(model=str(src), output=out, method="rtn", format=fmt,
                                 options={"group_size": 64}, overwrite=True))
    return out


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_unpacked_weights_are_close_to_source(tiny_src, tmp_path, fmt):
    q = open_checkpoint(_quantize(tiny_src, tmp_path / fmt, fmt))
    src = open_checkpoint(tiny_src)
    dense = dict(dense_tensors(q))
    linears = [n for n in dense if n.endswith("proj.weight")]
    assert linears and all(n in src for n in dense)
    for name in linears:
        w, ref = dense[name], src.read(name).float()
        assert w.shape == ref.shape and w.dtype == torch.float32
        # 4-bit RTN, group 64 on Gaussian weights: ~0.17; a transposed / mis-ordered unpack: ~1.4
        assert float((w - ref).norm() / ref.norm()) < 0.3, name
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(dense[name], src.read(name).float())


def test_unpack_loader_matches_transformers_loader(tiny_src, tmp_path, calib_text):
    ct = _quantize(tiny_src, tmp_path / "ct", "compressed-tensors")
    a = evaluate(ct, calib_text, ctx=64, chunks=2, loader="transformers", threads=2)
    b = evaluate(ct, calib_text, ctx=64, chunks=2, loader="unpack", threads=2)
    assert a.tokens == b.tokens == 2 * 31
    assert abs(a.perplexity / b.perplexity - 1) < 0.005, (a.perplexity, b.perplexity)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_unpack_loader_keeps_the_router_correction_bias(synthetic_dir, arch):
    """The routers' e_score_correction_bias is a persistent buffer, not a parameter: the unpack loader
    fills it from the checkpoint (left at from_config's zeros it picks other experts), and the model it
    builds computes transformers' logits."""
    from transformers import AutoModelForCausalLM

    from qconvert.evaluate.backends import _load_unpacked

    src = synthetic_dir(arch)
    ours = _load_unpacked(open_checkpoint(src))
    theirs = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    biases = {n: b for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases and all(b.abs().max() > 0 for b in biases.values())
    mine = dict(ours.named_buffers())
    for name, bias in biases.items():
        assert torch.equal(mine[name], bias), name
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
