"""FP8 on the fixture model (SmolLM2-135M): qconvert vs llm-compressor, speed and quality.

    python scripts/bench_fp8.py [--samples 64] [--seq-len 512] [--threads 2] [--only ours,llmc,static,eval]
    python scripts/bench_fp8.py --rss-model ~/.cache/qconvert/fixtures/bench/llama-1b   # streaming RSS only

1. ``qconvert quantize --method fp8 --scheme dynamic`` (compressed-tensors) and llm-compressor's ``oneshot``
   FP8_DYNAMIC (scripts/llmcompressor_preset.py in its own venv), each a separate process with ``--threads``
   threads: wall time and peak RSS.
2. Static FP8 both ways on the same calibration chunks (``--samples`` x ``--seq-len`` of the fixture text).
3. Perplexity on the fixture eval text (ctx 512, llama-perplexity semantics) of bf16 and every output, with
   the weights dequantized ("transformers") and with the activations quantized too ("emulate").
With ``--rss-model DIR``: only the dynamic run on that checkpoint, to show peak RSS against the model size.
Outputs go to $QCONVERT_CACHE/bench-fp8; one JSON summary is printed and saved there.
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

from bench_gptq import LLMC_PYTHON, _fixtures, make_tokens, perplexity, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="ours,llmc,static,eval")
    ap.add_argument("--rss-model", type=Path, help="only time qconvert's dynamic FP8 of this checkpoint")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON))
    args = ap.parse_args()
    only = set(args.only.split(","))
    cache = Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert") / "bench-fp8"
    cache.mkdir(parents=True, exist_ok=True)
    quantize = [sys.executable, "-m", "qconvert", "quantize"]

    if args.rss_model:
        out = cache / "rss-model-fp8"
        cmd = [*quantize, str(args.rss_model), "--method", "fp8", "-o", str(out), "--overwrite"]
        r = timed(cmd, args.threads, cache / "rss.log")
        src = sum(f.stat().st_size for f in args.rss_model.glob("*.safetensors"))
        dst = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        r.update(
            {"model": str(args.rss_model), "source_mib": round(src / 2**20), "output_mib": round(dst / 2**20)}
        )
        shutil.rmtree(out)
        print(json.dumps(r, indent=2))
        return

    fx = _fixtures()
    model, calib, evtext = fx.smollm2_dir(), fx.calib_text(), fx.eval_text()
    tokens = cache / f"tokens-{args.samples}x{args.seq_len}.npy"
    if not tokens.exists():
        make_tokens(model, calib, args.samples, args.seq_len, tokens)
    outs = {
        "ours_dynamic": cache / "qconvert-fp8-dynamic",
        "llmc_dynamic": cache / "llmcompressor-fp8-dynamic",
        "ours_static": cache / "qconvert-fp8-static",
        "llmc_static": cache / "llmcompressor-fp8-static",
    }
    result: dict = {
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "samples": args.samples,
        "seq_len": args.seq_len,
    }
    llmc = [
        args.llmc_python,
        str(ROOT / "scripts" / "llmcompressor_preset.py"),
        str(model),
        "--threads",
        str(args.threads),
    ]

    def llmc_run(key: str, extra: list[str]) -> None:
        shutil.rmtree(outs[key], ignore_errors=True)
        result[key] = timed([*llmc, "-o", str(outs[key]), *extra], args.threads, cache / f"{key}.log")
        lines = [
            ln for ln in (cache / f"{key}.log").read_text().splitlines() if ln.startswith('{"llmcompressor"')
        ]
        if lines:
            result[key].update(json.loads(lines[-1]))
        print(key, result[key], flush=True)

    def ours(key: str, *extra: str) -> None:
        cmd = [*quantize, str(model), "--method", "fp8", *extra, "-o", str(outs[key]), "--overwrite"]
        result[key] = timed(cmd, args.threads, cache / f"{key}.log")
        print(key, result[key], flush=True)

    if "ours" in only:
        ours("ours_dynamic", "--scheme", "dynamic")
    if "llmc" in only:
        llmc_run("llmc_dynamic", ["--scheme", "FP8_DYNAMIC"])
    if "ours_dynamic" in result and "llmc_dynamic" in result:
        result["dynamic_wall_ratio"] = round(
            result["ours_dynamic"]["wall_s"] / result["llmc_dynamic"]["wall_s"], 3
        )
    if "static" in only:
        ours("ours_static", "--scheme", "static", "--dataset", str(calib), "--num-samples", str(args.samples),
             "--seq-len", str(args.seq_len), "--device", "cpu")
        if "llmc" in only:
            llmc_run("llmc_static", ["--scheme", "FP8", "--tokens", str(tokens)])
    if "eval" in only:
        import torch

        torch.set_num_threads(args.threads)
        ppl: dict = {"bf16": perplexity(model, evtext, args.threads, "transformers")}
        print("perplexity bf16", ppl["bf16"], flush=True)
        for key, path in outs.items():
            if path.exists():
                for loader in ("transformers", "emulate"):
                    ppl[f"{key}/{loader}"] = perplexity(path, evtext, args.threads, loader)
                    print("perplexity", key, loader, ppl[f"{key}/{loader}"], flush=True)
        result["perplexity"] = ppl
    print(json.dumps(result, indent=2))
    (cache / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
