"""AWQ vs RTN vs GPTQ on the fixture model (SmolLM2-135M): wall time, CPU time, peak RSS and perplexity.

    python scripts/bench_awq.py [--num-samples 64] [--seq-len 512] [--group-size 64] [--eval-chunks 16]
                                [--threads N] [--skip gptq,rtn] [--json out.json]

Each quantization runs in its own process (so peak RSS is that job's):
  awq   `qconvert quantize --method awq --zero-point --format compressed-tensors`
  rtn   `qconvert quantize --method rtn --asym --format compressed-tensors`
  gptq  if `quantize --method gptq` is wired, through the CLI; otherwise the same job built from the public
        pieces (calibration runner with Hessians, methods.gptq per Linear, quantized outputs propagated).
Perplexity: the compressed-tensors outputs dequantized by transformers
(CompressedTensorsConfig(dequantize=True)), float32, on non-overlapping 512-token chunks of the fixture eval
text (tests/fixtures.py eval_text).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixtures():
    spec = importlib.util.spec_from_file_location("qconvert_bench_fixtures", ROOT / "tests" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _timed(cmd: list[str], env: dict) -> dict:
    """Run a child process; its wall time, CPU time and peak RSS (ru_maxrss of the waited child)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({code}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": out}


def _cli(method: str, model: Path, out: Path, calib: Path, a, env) -> dict:
    cmd = [sys.executable, "-m", "qconvert", "quantize", str(model), "--method", method, "--bits", "4",
           "--group-size", str(a.group_size), "--format", "compressed-tensors", "-o", str(out), "--json",
           "--overwrite"]
    cmd += ["--zero-point"] if method == "awq" else ["--asym"]
    if method != "rtn":
        cmd += ["--dataset", str(calib), "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len)]
    return _timed(cmd, env)


def perplexity(model, tokenizer, text: str, n_chunks: int, ctx: int = 512) -> float:
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_chunks = min(n_chunks, len(ids) // ctx)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n_chunks):
            chunk = torch.tensor([ids[i * ctx : (i + 1) * ctx]])
            logits = model(input_ids=chunk).logits[0, :-1].float()
            nll -= float(torch.log_softmax(logits, -1).gather(-1, chunk[0, 1:, None]).sum())
            count += ctx - 1
    return math.exp(nll / count)


def _ppl_of(kind: str, model_dir: Path, out: Path, tok, text: str, chunks: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if kind == "base":
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    elif kind == "gptq-runner":
        from safetensors.torch import load_file

        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        sd = load_file(str(out) + ".safetensors")
        params = dict(m.named_parameters())
        for name, w in sd.items():
            params[name].data.copy_(w)
    else:
        m = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    return perplexity(m.eval(), tok, text, chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="OMP/torch threads of the quantize jobs")
    ap.add_argument("--skip", default="", help="comma list of methods to skip (awq, rtn, gptq)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    fx = _fixtures()
    model, calib, eval_text = fx.smollm2_dir(), fx.calib_text(), fx.eval_text()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    skip = {s for s in a.skip.split(",") if s}
    report: dict = {"model": str(model), "num_samples": a.num_samples, "seq_len": a.seq_len,
                    "group_size": a.group_size, "bits": 4, "zero_point": True, "threads": a.threads,
                    "load_avg_start": os.getloadavg(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-awq-", dir=Path(fx.cache_root())) as tmp:
        outs = {}
        for method in ("awq", "gptq", "rtn"):
            if method in skip:
                continue
            out = outs[method] = Path(tmp) / method
            print(f"[bench] quantizing with {method} ...", file=sys.stderr, flush=True)
            if method == "gptq":
                res = {**_cli("gptq", model, out, calib, a, env), "how": "cli"}
            else:
                res = _cli(method, model, out, calib, a, env)
            res.pop("stdout", None)
            report["runs"][method] = res
            print(f"[bench] {method}: {res}", file=sys.stderr, flush=True)
        import torch
        from transformers import AutoTokenizer

        if a.threads:
            torch.set_num_threads(a.threads)
        tok = AutoTokenizer.from_pretrained(str(model))
        text = eval_text.read_text()
        report["perplexity"] = {"bf16": round(_ppl_of("base", model, model, tok, text, a.eval_chunks), 4)}
        for method, out in outs.items():
            how = report["runs"][method].get("how", "cli")
            kind = "gptq-runner" if method == "gptq" and how != "cli" else "ct"
            report["perplexity"][method] = round(_ppl_of(kind, model, out, tok, text, a.eval_chunks), 4)
            print(f"[bench] ppl {method}: {report['perplexity'][method]}", file=sys.stderr, flush=True)
    report["eval_tokens"] = a.eval_chunks * 511
    report["load_avg_end"] = os.getloadavg()
    report["bench_self_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)


if __name__ == "__main__":
    main()
