"""Calibrated --scheme runs on the fixture model (SmolLM2-135M): qconvert vs llm-compressor on the same
calibration tokens: wall time, peak RSS, config keys and perplexity.

    python scripts/bench_schemes.py [--runs w8a8-sq,w8a8-sq-gptq,nvfp4,fp8-kv] [--samples 64] [--seq-len 512]
                                    [--threads 2] [--only ours,llmc,eval] [--chunks N] [--result F]

Runs (each a separate process, ``--threads`` threads, wall time and peak RSS from wait4):

    w8a8-sq       qconvert --method rtn  --scheme w8a8 --smoothquant 0.8  | SmoothQuant(0.8) + W8A8 RTN
    w8a8-sq-gptq  qconvert --method gptq --scheme w8a8 --smoothquant 0.8  | SmoothQuant(0.8) + GPTQ W8A8
    nvfp4         qconvert --method rtn  --scheme nvfp4                   | NVFP4 (static input global scale)
    fp8-kv        qconvert --method fp8  --scheme dynamic --kv-cache fp8  | FP8_DYNAMIC + FP8 KV cache

The calibration tokens are cut as ``qconvert quantize --dataset`` cuts them (scripts/bench_gptq.make_tokens)
and the same token ids are handed to llm-compressor (scripts/llmcompressor_preset.py in its own venv).
Perplexity: the fixture eval text, ctx 512, ``--loader emulate`` (activations quantized as the scheme says
where our emulation knows the scheme, else the dequantized weights: the key says which).
Outputs go to $QCONVERT_CACHE/bench-schemes; one JSON summary is printed and saved there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_gptq import LLMC_PYTHON, _fixtures, make_tokens, timed  # noqa: E402

# run -> (qconvert quantize arguments, llmcompressor_preset.py arguments)
RUNS = {
    "w8a8-sq": (["--method", "rtn", "--scheme", "w8a8", "--smoothquant", "0.8"],
                ["--scheme", "W8A8", "--smoothquant", "0.8"]),
    "w8a8-sq-gptq": (["--method", "gptq", "--scheme", "w8a8", "--smoothquant", "0.8"],
                     ["--scheme", "W8A8", "--smoothquant", "0.8", "--gptq"]),
    "nvfp4": (["--method", "rtn", "--scheme", "nvfp4"], ["--scheme", "NVFP4"]),
    "fp8-kv": (["--method", "fp8", "--scheme", "dynamic", "--kv-cache", "fp8"],
               ["--scheme", "FP8_DYNAMIC", "--kv-cache", "fp8"]),
}


def perplexity(model: Path, text: Path, threads: int, loader: str, chunks: int | None) -> dict:
    from qconvert.evaluate.run import evaluate

    r = evaluate(model, text, ctx=512, chunks=chunks, threads=threads, loader=loader)
    return {"ppl": round(r.perplexity, 4), "stderr": round(r.perplexity_stderr, 4), "chunks": r.chunks,
            "loader": loader}


def config_diff(ours: Path, llmc: Path) -> dict:
    """quantization_config of both outputs: keys and values that differ (version strings aside)."""
    a = json.loads((ours / "config.json").read_text())["quantization_config"]
    b = json.loads((llmc / "config.json").read_text())["quantization_config"]
    a.pop("version", None)
    b.pop("version", None)
    return {"equal": a == b, **({} if a == b else {"ours": a, "llmc": b})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="ours,llmc,eval")
    ap.add_argument("--chunks", type=int, default=None, help="perplexity on the first N chunks (default all)")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON))
    ap.add_argument("--result", default="result.json", help="summary file under the cache directory")
    args = ap.parse_args()
    only = set(args.only.split(","))
    runs = args.runs.split(",")
    cache = Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert") / "bench-schemes"
    cache.mkdir(parents=True, exist_ok=True)
    fx = _fixtures()
    model, calib, evtext = fx.smollm2_dir(), fx.calib_text(), fx.eval_text()
    tokens = cache / f"tokens-{args.samples}x{args.seq_len}.npy"
    if not tokens.exists():
        make_tokens(model, calib, args.samples, args.seq_len, tokens)
    result_file = cache / args.result
    result: dict = json.loads(result_file.read_text()) if result_file.exists() else {}
    result.update({"threads": args.threads, "cpus": os.cpu_count(), "samples": args.samples,
                   "seq_len": args.seq_len})
    data = ["--dataset", str(calib), "--num-samples", str(args.samples), "--seq-len", str(args.seq_len),
            "--device", "cpu"]
    for run in runs:
        ours_args, llmc_args = RUNS[run]
        ours, llmc = cache / f"qconvert-{run}", cache / f"llmcompressor-{run}"
        r: dict = result.setdefault(run, {})
        if "llmc" in only:
            shutil.rmtree(llmc, ignore_errors=True)
            cmd = [args.llmc_python, str(ROOT / "scripts" / "llmcompressor_preset.py"), str(model), "-o",
                   str(llmc), *llmc_args, "--tokens", str(tokens), "--threads", str(args.threads)]
            r["llmc"] = timed(cmd, args.threads, cache / f"llmc-{run}.log")
        if "ours" in only:
            cmd = [sys.executable, "-m", "qconvert", "quantize", str(model), *ours_args, *data,
                   "-o", str(ours), "--overwrite"]
            r["ours"] = timed(cmd, args.threads, cache / f"ours-{run}.log")
        if "ours" in r and "llmc" in r:
            r["wall_ratio"] = round(r["ours"]["wall_s"] / r["llmc"]["wall_s"], 3)
            r["rss_ratio"] = round(r["ours"]["peak_rss_mib"] / r["llmc"]["peak_rss_mib"], 3)
        if ours.exists() and llmc.exists():
            r["config"] = config_diff(ours, llmc)
        print(run, json.dumps(r), flush=True)
        result_file.write_text(json.dumps(result, indent=2) + "\n")
    if "eval" in only:
        import torch

        torch.set_num_threads(args.threads)
        ppl = result.setdefault("perplexity", {})
        if "bf16" not in ppl:
            ppl["bf16"] = perplexity(model, evtext, args.threads, "transformers", args.chunks)
        for run in runs:
            for name in ("ours", "llmc"):
                path = cache / f"{'qconvert' if name == 'ours' else 'llmcompressor'}-{run}"
                if path.exists():
                    ppl[f"{run}/{name}"] = perplexity(path, evtext, args.threads, "emulate", args.chunks)
                    print("perplexity", run, name, ppl[f"{run}/{name}"], flush=True)
            o, lc = ppl.get(f"{run}/ours"), ppl.get(f"{run}/llmc")
            if o and lc:
                ppl[f"{run}/ratio"] = round(o["ppl"] / lc["ppl"], 5)
            result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
