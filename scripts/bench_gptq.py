"""GPTQ quality and speed on the fixture model (SmolLM2-135M): qconvert GPTQ vs RTN vs llm-compressor's GPTQ.

    python scripts/bench_gptq.py [--samples 64] [--seq-len 512] [--threads 2] [--skip-llmcompressor]

1. Calibration chunks: ``--samples`` x ``--seq-len`` tokens of the fixture calibration text, cut exactly as
   ``qconvert quantize --dataset`` cuts them (calib.datasets.load_calibration, seed 0); saved as .npy so that
   llm-compressor is fed the very same token ids.
2. ``qconvert quantize --method gptq`` and ``--method rtn`` (W4, group 64, sym, compressed-tensors), each a
   separate process with ``--threads`` threads: wall time and peak RSS (wait4 rusage).
3. llm-compressor ``oneshot`` GPTQ with the same scheme and tokens, in its own venv
   (scripts/llmcompressor_gptq.py; ``--llmc-python``, default that venv under ~/.cache/qconvert),
   same measurements.
4. Perplexity of every output (and the bf16 source) on the fixture eval text with qconvert.evaluate
   (llama-perplexity semantics: ctx 512, second half of each chunk scored).

The load average is recorded before and after each timed run: other processes on the machine distort wall
times.
Outputs go to $QCONVERT_CACHE/bench-gptq (default ~/.cache/qconvert); one JSON summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = Path.home() / ".cache/qconvert/venv-llmcompressor/bin/python"
sys.path.insert(0, str(ROOT))


def _fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qconvert_fixtures", ROOT / "tests" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def timed(cmd: list[str], threads: int, log: Path) -> dict:
    """Run a command in its own process; wall seconds and peak RSS (MiB) of that process tree's largest
    member."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    before = load()
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "load_before": before, "load_after": load()}


def make_tokens(model: Path, text: Path, samples: int, seq_len: int, out: Path) -> None:
    import numpy as np

    from qconvert.calib.datasets import load_calibration, load_tokenizer
    from qconvert.load import open_checkpoint

    ckpt = open_checkpoint(model)
    data = load_calibration(str(text), load_tokenizer(ckpt), seq_len=seq_len, num_samples=samples)
    np.save(out, data.tokens.numpy())


def perplexity(model: Path, text: Path, threads: int, loader: str = "auto") -> dict:
    from qconvert.evaluate.run import evaluate

    r = evaluate(model, text, ctx=512, threads=threads, loader=loader)
    return {"ppl": round(r.perplexity, 4), "stderr": round(r.perplexity_stderr, 4), "chunks": r.chunks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--skip-llmcompressor", action="store_true")
    ap.add_argument("--only", default="gptq,rtn,llmc,eval", help="comma list of gptq, rtn, llmc, eval")
    ap.add_argument("--tag", default="", help="suffix of the output directories")
    ap.add_argument("--extra", default="", help="extra arguments for qconvert quantize --method gptq")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON))
    args = ap.parse_args()
    only = set(args.only.split(","))
    if args.skip_llmcompressor:
        only.discard("llmc")

    fx = _fixtures()
    model, calib, evtext = fx.smollm2_dir(), fx.calib_text(), fx.eval_text()
    cache = Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert") / "bench-gptq"
    cache.mkdir(parents=True, exist_ok=True)
    tokens = cache / f"tokens-{args.samples}x{args.seq_len}.npy"
    if not tokens.exists():
        make_tokens(model, calib, args.samples, args.seq_len, tokens)

    scheme = ["--bits", str(args.bits), "--group-size", str(args.group_size), "--sym"]
    qconvert = [sys.executable, "-m", "qconvert", "quantize", str(model), "--format", "compressed-tensors",
                "--overwrite", *scheme]
    tag = args.tag
    outs = {
        "gptq": cache / f"qconvert-gptq{tag}",
        "rtn": cache / "qconvert-rtn",
        "llmc": cache / "llmcompressor-gptq",
    }
    result: dict = {"samples": args.samples, "seq_len": args.seq_len, "threads": args.threads,
                    "scheme": f"W{args.bits} g{args.group_size} sym", "cpus": os.cpu_count()}
    if "gptq" in only:
        cmd = [*qconvert, "--method", "gptq", "--dataset", str(calib), "--num-samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--device", "cpu", *args.extra.split(),
               "-o", str(outs["gptq"])]
        result["qconvert_gptq"] = timed(cmd, args.threads, cache / f"gptq{tag}.log")
        print("qconvert gptq", result["qconvert_gptq"], flush=True)
    if "rtn" in only:
        cmd = [*qconvert, "--method", "rtn", "-o", str(outs["rtn"])]
        result["qconvert_rtn"] = timed(cmd, args.threads, cache / "rtn.log")
        print("qconvert rtn", result["qconvert_rtn"], flush=True)
    if "llmc" in only:
        import shutil

        shutil.rmtree(outs["llmc"], ignore_errors=True)
        cmd = [args.llmc_python, str(ROOT / "scripts" / "llmcompressor_gptq.py"), str(model), str(tokens),
               "-o", str(outs["llmc"]), "--bits", str(args.bits), "--group-size", str(args.group_size),
               "--threads", str(args.threads)]
        result["llmcompressor_gptq"] = timed(cmd, args.threads, cache / "llmc.log")
        log_lines = (cache / "llmc.log").read_text().splitlines()
        lines = [ln for ln in log_lines if ln.startswith('{"llmcompressor"')]
        if lines:
            result["llmcompressor_gptq"].update(json.loads(lines[-1]))
        print("llm-compressor gptq", result["llmcompressor_gptq"], flush=True)
    if "gptq" in result and "llmcompressor_gptq" in result:
        result["wall_ratio_vs_llmcompressor"] = round(
            result["qconvert_gptq"]["wall_s"] / result["llmcompressor_gptq"]["wall_s"], 3)
    if "eval" in only:
        import torch

        torch.set_num_threads(args.threads)
        ppl = {"bf16": perplexity(model, evtext, args.threads)}
        for key in ("gptq", "rtn", "llmc"):
            if outs[key].exists():
                ppl[key] = perplexity(outs[key], evtext, args.threads)
            print("perplexity", key, ppl.get(key), flush=True)
        result["perplexity"] = ppl
    print(json.dumps(result, indent=2))
    (cache / f"result{tag}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
