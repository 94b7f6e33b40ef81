#!/usr/bin/env python3
"""Quality at equal size: llama-quantize's mixtures against `convert --target-size` (issue 18).

    python scripts/bench_budget.py [--model HF_DIR] [--types Q2_K Q3_K_M Q4_K_M Q5_K_M] [--chunks 16]
                                   [--threads 2] [--json]

1. `qconvert imatrix` on the calibration text (the fixture's calib.txt), cached beside the work files.
2. For each type: `qconvert convert --type T` without and with the imatrix (byte-identical to llama-quantize,
   tests/pipelines/test_convert.py), and `qconvert convert --type T --imatrix I --target-size SIZE` with SIZE
   the file size of the imatrix llama-quantize file: the budget's mixture at no more bytes.
3. `qconvert eval` of each file on a different text (the fixture's eval.txt), ctx 512, llama.cpp backend:
   perplexity and mean KL divergence against the BF16 GGUF's logits (saved once).
Prints one table (and --json): file size, bits per weight, PPL, mean KL, and the KL change against
llama-quantize + imatrix. Work files go to $QCONVERT_CACHE/bench-budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("QCONVERT_CACHE", Path.home() / ".cache" / "qconvert"))


def qconvert(*args: object) -> str:
    cmd = [sys.executable, "-m", "qconvert", *map(str, args)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout


def evaluate(path: Path, text: Path, logits: Path, chunks: int, threads: int) -> dict:
    out = qconvert("eval", path, "--dataset", text, "--logits", logits, "--chunks", chunks,
                   "--threads", threads, "--json")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    fixtures = cache_root() / "fixtures"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=fixtures / "smollm2-135m-instruct")
    ap.add_argument("--calib", type=Path, default=fixtures / "calib.txt")
    ap.add_argument("--text", type=Path, default=fixtures / "eval.txt")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M"])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = cache_root() / "bench-budget" / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    imx = work / "imatrix.gguf"
    if not imx.exists():
        qconvert("imatrix", args.model, "--dataset", args.calib, "-o", imx, "--threads", args.threads)
    bf16, logits = work / "BF16.gguf", work / "BF16.logits"
    if not bf16.exists():
        qconvert("convert", args.model, "--type", "BF16", "-o", bf16)
    if not logits.exists():
        qconvert("eval", bf16, "--dataset", args.text, "--chunks", args.chunks, "--threads", args.threads,
                 "--save-logits", logits, "--json")
    rows = []
    for t in args.types:
        plain, with_im, sized = work / f"{t}.gguf", work / f"{t}-imatrix.gguf", work / f"{t}-target-size.gguf"
        qconvert("convert", args.model, "--type", t, "-o", plain, "--threads", args.threads)
        qconvert("convert", args.model, "--type", t, "--imatrix", imx, "-o", with_im,
                 "--threads", args.threads)
        size = with_im.stat().st_size
        qconvert("convert", args.model, "--type", t, "--imatrix", imx, "--target-size", size, "-o", sized,
                 "--threads", args.threads, "--save-config", work / f"{t}-target-size.yaml")
        for label, path in (("llama-quantize", plain), ("llama-quantize + imatrix", with_im),
                            ("--target-size (imatrix)", sized)):
            r = evaluate(path, args.text, logits, args.chunks, args.threads)
            rows.append({"type": t, "file": label, "bytes": path.stat().st_size,
                         "ppl": r["perplexity"], "kl": r["kl_divergence"]["mean"]})
    base = {r["type"]: r["kl"] for r in rows if r["file"] == "llama-quantize + imatrix"}
    if args.json:
        print(json.dumps({"model": str(args.model), "chunks": args.chunks, "rows": rows}))
        return
    print(f"{args.model.name}: eval {args.text.name}, {args.chunks} chunks x 512, KL vs BF16 (llama.cpp)")
    print(f"{'type':8s} {'file':26s} {'MiB':>8s} {'PPL':>9s} {'mean KL':>9s} {'KL vs +imatrix':>15s}")
    for r in rows:
        rel = (r["kl"] / base[r["type"]] - 1) * 100 if base[r["type"]] else float("nan")
        print(f"{r['type']:8s} {r['file']:26s} {r['bytes'] / 2**20:8.2f} {r['ppl']:9.4f} "
              f"{r['kl']:9.5f} {rel:+14.1f}%")


if __name__ == "__main__":
    main()
