"""`qconvert eval` on the real fixture model: llama.cpp's numbers, transformers' numbers, KL, the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert.evaluate.run import evaluate

CHUNKS = 4


def _llama_perplexity(bin_dir: Path, model: Path, text: Path, chunks: int) -> tuple[float, float]:
    done = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512",
                           "--chunks", str(chunks), "-t", "2"], capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", done.stdout + done.stderr)
    assert m, done.stderr[-2000:]
    return float(m.group(1)), float(m.group(2))


def test_gguf_matches_llama_perplexity(q4km_gguf, eval_text, llama_tools):
    """Q4_K_M made by llama.cpp's quantizer from our BF16 GGUF, same text, -c 512, same chunks."""
    ppl, err = _llama_perplexity(llama_tools, q4km_gguf, eval_text, CHUNKS)
    res = evaluate(q4km_gguf, eval_text, ctx=512, chunks=CHUNKS, threads=2)
    assert res.backend == "llama.cpp" and res.chunks == CHUNKS and res.tokens == CHUNKS * 255
    assert abs(res.perplexity / ppl - 1) < 0.005, (res.perplexity, ppl)
    assert abs(res.perplexity_stderr / err - 1) < 0.02, (res.perplexity_stderr, err)


def _plain_transformers_ppl(model_dir: Path, text_path: Path, ctx: int, chunks: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = text_path.read_text(encoding="utf-8").removesuffix("\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]  # SmolLM2 adds no BOS
    assert tok("a")["input_ids"][0] != tok.bos_token_id
    nll = []
    with torch.no_grad():
        for c in range(chunks):
            x = torch.tensor([ids[c * ctx:(c + 1) * ctx]])
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            for pos in range(ctx // 2, ctx - 1):
                nll.append(-float(logp[pos, x[0, pos + 1]]))
    return math.exp(float(np.mean(nll)))


def test_hf_dense_matches_plain_transformers(smollm2_dir, eval_text):
    res = evaluate(smollm2_dir, eval_text, ctx=256, chunks=2, threads=2)
    assert res.backend == "transformers" and res.tokens == 2 * 127
    expected = _plain_transformers_ppl(smollm2_dir, eval_text, 256, 2)
    assert abs(res.perplexity / expected - 1) < 0.005, (res.perplexity, expected)


def test_kl_gguf_against_hf_source(smollm2_gguf, smollm2_dir, eval_text):
    """The original Q4_1 GGUF (llama.cpp tokenizer) against the BF16 HF checkpoint (HF tokenizer)."""
    res = evaluate(smollm2_gguf, eval_text, reference=smollm2_dir, ctx=512, chunks=2, threads=2)
    kl = res.kl_divergence
    assert 0 < kl["mean"] < 1 and math.isfinite(kl["p99"]) and kl["p99"] >= kl["median"] > 0
    assert 0.5 < res.top1_agreement <= 1
    assert res.reference_perplexity > 1 and res.perplexity > 1


@pytest.fixture(scope="module")
def bf16_logits(bf16_gguf, eval_text, tmp_path_factory) -> tuple[Path, float]:
    f = tmp_path_factory.mktemp("logits") / "bf16.safetensors"
    res = evaluate(bf16_gguf, eval_text, ctx=512, chunks=2, save_logits_to=f, threads=2)
    return f, res.perplexity


def test_kl_self_is_zero(bf16_gguf, eval_text, bf16_logits):
    f, ppl = bf16_logits
    res = evaluate(bf16_gguf, eval_text, ctx=512, logits=f, threads=2)
    assert res.kl_divergence == {"mean": 0.0, "p99": 0.0, "median": 0.0, "max": 0.0}
    assert res.top1_agreement == 1.0 and res.perplexity == res.reference_perplexity == pytest.approx(ppl)


def test_cli_json_q4km_against_bf16(eval_cli, capsys, q4km_gguf, eval_text, bf16_logits):
    f, ppl = bf16_logits
    with pytest.raises(SystemExit) as e:
        eval_cli(["eval", str(q4km_gguf), "--dataset", str(eval_text), "--logits", str(f), "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    res = json.loads(out)
    assert res["tokens"] == 2 * 255 and res["perplexity"] > res["reference_perplexity"] == pytest.approx(ppl)
    assert res["perplexity_stderr"] > 0
    assert 0 < res["kl_divergence"]["mean"] < math.inf and res["kl_divergence"]["p99"] > 0
    assert 0.5 < res["top1_agreement"] < 1


def _one_line_error(eval_cli, capsys, args, code, fragment):
    with pytest.raises(SystemExit) as e:
        eval_cli(["eval", *args])
    out, err = capsys.readouterr()
    assert e.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qconvert: error: ") and fragment in lines[0], err


def test_cli_bad_input(eval_cli, capsys, smollm2_gguf, eval_text, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    _one_line_error(eval_cli, capsys, [str(smollm2_gguf), "--dataset", str(short)], 2, "tokenizes to only")
    missing = tmp_path / "none.gguf"
    _one_line_error(eval_cli, capsys, [str(missing), "--dataset", str(eval_text)], 2, "none.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    _one_line_error(eval_cli, capsys, [str(junk), "--dataset", str(eval_text)], 2, "junk.gguf")
    _one_line_error(eval_cli, capsys, [str(smollm2_gguf), "--dataset", str(tmp_path / "no.txt")], 2, "no.txt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    args = [str(smollm2_gguf), "--dataset", str(eval_text), "--logits", str(bad)]
    _one_line_error(eval_cli, capsys, args, 2, "bad.safetensors")
