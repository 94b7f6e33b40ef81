"""`qconvert quantize` on the 2026 families, a hybrid stack (LFM2: short-convolution layers beside attention)
and a dense one (SmolLM3): GPTQ W4 in
compressed-tensors loads in transformers, generates, and its perplexity on real text is finite and below
RTN's at the same scheme (GPTQ's whole point, measured through the consumer)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import run_cli


def _quantize_and_eval(capsys, model, method: str, calib_text, eval_text, out) -> float:
    data = ["--dataset", calib_text] if method == "gptq" else []
    code, _, err = run_cli(capsys, "quantize", model, "--method", method, "--format", "compressed-tensors",
                           *data, "-o", out)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "eval", out, "--dataset", eval_text, "-c", "128", "--chunks", "8",
                                "-t", "1", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["backend"] == "transformers"  # loaded by the consumer, not our unpacker
    return float(report["perplexity"])


@pytest.mark.parametrize("family", ["lfm2", "smollm3"])
def test_gptq_loads_generates_and_beats_rtn(family, capsys, synthetic_dir, calib_text, eval_text, tmp_path):
    from transformers import AutoModelForCausalLM

    model = synthetic_dir(family)
    ppl = {m: _quantize_and_eval(capsys, model, m, calib_text, eval_text, tmp_path / m)
           for m in ("gptq", "rtn")}
    assert all(math.isfinite(p) for p in ppl.values()), ppl
    assert ppl["gptq"] < ppl["rtn"], ppl

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32)
    out = loaded.generate(torch.tensor([[1, 17, 400, 1021]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
