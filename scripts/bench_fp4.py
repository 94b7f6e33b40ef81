"""Data-free --scheme runs on the fixture model (SmolLM2-135M): qconvert vs llm-compressor, speed, memory,
bytes and quality.

    python scripts/bench_fp4.py [--threads 2] [--schemes nvfp4a16,mxfp4a16,w8a8]
                                [--only ours,llmc,compare,eval]
    python scripts/bench_fp4.py --rss-model ~/.cache/qconvert/fixtures/bench/llama-1b   # streaming RSS only

1. ``qconvert quantize --method rtn --scheme S`` and llm-compressor's ``oneshot`` with the preset of that name
   (scripts/llmcompressor_preset.py in its own venv), each a separate process with ``--threads`` threads: wall
   time and peak RSS, and their ratio (issue #17's target: <= 0.5 for both).
2. scripts/compare_fp4.py on the two outputs: config, tensor names / dtypes / shapes, differing values, and
   the weight error of the layers that differ.
3. Perplexity on the fixture eval text (ctx 512, llama-perplexity semantics) of bf16 and every output,
   weights dequantized by our kernels (``--loader unpack``) and, for W8A8, also with int8 activations
   emulated.
With ``--rss-model DIR``: only qconvert's runs on that checkpoint, peak RSS against the model size.
Outputs go to $QCONVERT_CACHE/bench-fp4; one JSON summary is printed and saved there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_gptq import LLMC_PYTHON, _fixtures, timed  # noqa: E402

PRESETS = {"nvfp4a16": "NVFP4A16", "mxfp4a16": "MXFP4A16", "w8a8": "W8A8"}


def perplexity(model: Path, text: Path, threads: int, loader: str, chunks: int | None) -> dict:
    from qconvert.evaluate.run import evaluate

    r = evaluate(model, text, ctx=512, chunks=chunks, threads=threads, loader=loader)
    return {"ppl": round(r.perplexity, 4), "stderr": round(r.perplexity_stderr, 4), "chunks": r.chunks}


def rss_only(model: Path, schemes: list[str], threads: int, cache: Path) -> None:
    src = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    result: dict = {"model": str(model), "source_mib": round(src / 2**20), "threads": threads}
    for scheme in schemes:
        out = cache / f"rss-model-{scheme}"
        cmd = [sys.executable, "-m", "qconvert", "quantize", str(model), "--method", "rtn",
               "--scheme", scheme, "-o", str(out), "--overwrite"]
        result[scheme] = timed(cmd, threads, cache / f"rss-{scheme}.log")
        result[scheme]["output_mib"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20)
        shutil.rmtree(out)
        print(scheme, result[scheme], flush=True)
    print(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", default=",".join(PRESETS))
    ap.add_argument("--only", default="ours,llmc,compare,bf16,eval")
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON))
    ap.add_argument("--rss-model", type=Path, help="only time qconvert's runs on this checkpoint")
    ap.add_argument("--chunks", type=int, default=None, help="perplexity on the first N chunks (default all)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    schemes = args.schemes.split(",")
    cache = Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert") / "bench-fp4"
    cache.mkdir(parents=True, exist_ok=True)
    if args.rss_model:
        rss_only(args.rss_model, schemes, args.threads, cache)
        return
    fx = _fixtures()
    model, evtext = fx.smollm2_dir(), fx.eval_text()
    result: dict = {"threads": args.threads, "cpus": os.cpu_count()}
    outs = {s: (cache / f"qconvert-{s}", cache / f"llmcompressor-{s}") for s in schemes}
    # 1. the timed runs first, while this process is small: a child's peak RSS counts the parent's pages it
    # shares between fork and exec
    for scheme, (ours, llmc) in outs.items():
        r: dict = result.setdefault(scheme, {})
        if "ours" in only:
            cmd = [sys.executable, "-m", "qconvert", "quantize", str(model), "--method", "rtn",
                   "--scheme", scheme, "-o", str(ours), "--overwrite"]
            r["ours"] = timed(cmd, args.threads, cache / f"ours-{scheme}.log")
        if "llmc" in only:
            shutil.rmtree(llmc, ignore_errors=True)
            cmd = [args.llmc_python, str(ROOT / "scripts" / "llmcompressor_preset.py"), str(model),
                   "-o", str(llmc), "--scheme", PRESETS[scheme], "--threads", str(args.threads)]
            r["llmc"] = timed(cmd, args.threads, cache / f"llmc-{scheme}.log")
        if "ours" in r and "llmc" in r:
            r["wall_ratio"] = round(r["ours"]["wall_s"] / r["llmc"]["wall_s"], 3)
            r["rss_ratio"] = round(r["ours"]["peak_rss_mib"] / r["llmc"]["peak_rss_mib"], 3)
        print(scheme, r, flush=True)
    # 2. the tensors side by side
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for scheme, (ours, llmc) in outs.items():
        if "compare" in only and ours.exists() and llmc.exists():
            cmd = [sys.executable, str(ROOT / "scripts" / "compare_fp4.py"), str(ours), str(llmc),
                   "--source", str(model)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            result[scheme]["compare"] = json.loads(done.stdout)
    # 3. perplexity (the same bytes need no second run)
    ppl: dict = {}
    if "bf16" in only or "eval" in only:
        import torch

        torch.set_num_threads(args.threads)
    if "bf16" in only:
        ppl["bf16"] = perplexity(model, evtext, args.threads, "transformers", args.chunks)
        print("perplexity bf16", ppl["bf16"], flush=True)
    for scheme, (ours, llmc) in outs.items():
        if "eval" not in only:
            break
        cmp = result[scheme].get("compare", {})
        same = cmp.get("layers_differing") == 0 and cmp.get("names_equal")
        for name, path in (("ours", ours), ("llmc", llmc)):
            if name == "llmc" and same:
                ppl[f"{scheme}/llmc"] = "identical tensors to ours"
                continue
            if path.exists():
                for loader in ("unpack", "emulate") if scheme == "w8a8" else ("unpack",):
                    key = f"{scheme}/{name}/{loader}"
                    ppl[key] = perplexity(path, evtext, args.threads, loader, args.chunks)
                    print("perplexity", key, ppl[key], flush=True)
    result["perplexity"] = ppl
    print(json.dumps(result, indent=2))
    (cache / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
