#!/usr/bin/env python
"""Benchmark `qconvert imatrix` against llama.cpp's `llama-imatrix`, and a 128 x 512 calibration run.

    python scripts/bench_imatrix.py [--threads 2] [--ctx 512] [--chunks N] [--skip-calibrate] [--json]
    python scripts/bench_imatrix.py --skip-imatrix --samples 16 \
        --calibrate-model ~/.cache/qconvert/fixtures/bench/llama-1b
        (calibrate's peak RSS against the model's size; target: well below it)

Model: the SmolLM2 fixture (bf16 checkpoint; llama.cpp runs its BF16 GGUF written by `qconvert convert`).
Text: the calibration fixture text. Both tools run as subprocesses with the same thread count; wall time
and peak RSS (process tree, sampled every 50 ms) are reported, with both perplexity estimates.
Target: qconvert imatrix <= 0.25 x native llama-imatrix wall time (#21; --portable: the
-DGGML_NATIVE=OFF build). The calibrate run (all default statistics,
Hessians included) reports its wall time and peak RSS next to the size of the model's weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _fixtures():
    spec = importlib.util.spec_from_file_location("qconvert_bench_fixtures", ROOT / "tests" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def llamacpp_bin(portable: bool = False) -> Path:
    """The llama.cpp tools to compare with: the native build (-DGGML_NATIVE=ON, what users run) unless
    --portable; scripts/build_llamacpp_tools.sh builds it once into the cache."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llamacpp_tools.sh")],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "NATIVE": "0" if portable else "1"},
    )
    return Path(out.stdout.strip().splitlines()[-1])


def build_kind(tools: Path) -> str:
    """The build script's BUILD stamp (compile flags, commit) of the tools directory."""
    stamp = tools.parent / "BUILD"
    return stamp.read_text().strip() if stamp.is_file() else f"unknown ({tools})"


def bf16_gguf(model_dir: Path, cache: Path) -> Path:
    target = cache / "bench" / f"{model_dir.name}-BF16.gguf"
    if not target.exists():
        from qconvert.pipelines.convert import ConvertOptions, convert

        target.parent.mkdir(parents=True, exist_ok=True)
        convert(str(model_dir), ConvertOptions(file_type="BF16", output=target))
    return target


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, peak RSS of the process tree, and the combined output of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    output, _ = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20, 1), "output": output}


def qconvert_imatrix_cmd(
    model: Path, text: Path, out: Path, ctx: int, chunks: int | None, threads: int
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "qconvert",
        "imatrix",
        str(model),
        "-f",
        str(text),
        "-o",
        str(out),
        "-c",
        str(ctx),
        "-t",
        str(threads),
        "--device",
        "cpu",
    ]
    return cmd + (["--chunks", str(chunks)] if chunks else [])


def qconvert_calibrate_cmd(model: Path, text: Path, out: Path, n: int, seq: int, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qconvert",
        "calibrate",
        str(model),
        "--dataset",
        str(text),
        "-o",
        str(out),
        "--num-samples",
        str(n),
        "--seq-len",
        str(seq),
        "-t",
        str(threads),
        "--device",
        "cpu",
    ]


def _ppl(output: str) -> float | None:
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None, help="default: the whole text")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (x --ctx tokens)")
    ap.add_argument("--skip-calibrate", action="store_true")
    ap.add_argument("--skip-imatrix", action="store_true")
    ap.add_argument("--calibrate-model", type=Path, default=None, help="default: the SmolLM2 fixture")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--portable", action="store_true",
                    help="compare with the portable build (-DGGML_NATIVE=OFF) instead of the native one")
    args = ap.parse_args()

    fx = _fixtures()
    text = fx.calib_text()
    need_fixture = not args.skip_imatrix or (not args.skip_calibrate and args.calibrate_model is None)
    model = fx.smollm2_dir() if need_fixture else None
    cache = fx.cache_root()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict = {"threads": args.threads, "ctx": args.ctx, "chunks": args.chunks}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_imatrix:
            results["imatrix"] = bench_imatrix(model, text, cache, tmp, args, env)
        if not args.skip_calibrate:
            cal_model = (args.calibrate_model or model).expanduser()
            out = Path(tmp) / "stats.safetensors"
            cal = measure(
                qconvert_calibrate_cmd(cal_model, text, out, args.samples, args.ctx, args.threads), env
            )
            results["calibrate"] = {
                "model": str(cal_model),
                "model_mib": round(sum(f.stat().st_size for f in cal_model.glob("*.safetensors")) / 2**20, 1),
                "stats_file_mib": round(out.stat().st_size / 2**20, 1),
                "samples": args.samples,
                "seq_len": args.ctx,
                **{k: cal[k] for k in ("wall_s", "peak_rss_mib")},
            }
    if args.json:
        print(json.dumps(results))
        return
    if "imatrix" in results:
        im = results["imatrix"]
        print(f"imatrix, {im['chunks']} chunks x {args.ctx} tokens, {args.threads} threads; "
              f"llama.cpp: {im['build']}")
        for who in ("llama_imatrix", "qconvert"):
            r = im[who]
            print(f"  {who:14s} {r['wall_s']:8.2f} s  peak RSS {r['peak_rss_mib']:8.1f} MiB  PPL {r['ppl']}")
        print(f"  ratio qconvert / llama-imatrix = {im['ratio']:.3f} (target <= 0.25)")
    if "calibrate" in results:
        c = results["calibrate"]
        print(
            f"calibrate {c['model']}: {c['samples']} x {c['seq_len']} tokens (default statistics): "
            f"{c['wall_s']:.2f} s, peak RSS {c['peak_rss_mib']:.1f} MiB; "
            f"model weights {c['model_mib']:.1f} MiB, stats file {c['stats_file_mib']:.1f} MiB"
        )


def bench_imatrix(model: Path, text: Path, cache: Path, tmp: str, args, env: dict) -> dict:
    gguf_path = bf16_gguf(model, cache)
    tools = llamacpp_bin(args.portable)
    ref_cmd = [
        str(tools / "llama-imatrix"),
        "-m",
        str(gguf_path),
        "-f",
        str(text),
        "-o",
        f"{tmp}/ref.gguf",
        "-c",
        str(args.ctx),
        "-t",
        str(args.threads),
    ] + (["--chunks", str(args.chunks)] if args.chunks else [])
    ref = measure(ref_cmd, env)
    ours = measure(
        qconvert_imatrix_cmd(model, text, Path(tmp) / "ours.gguf", args.ctx, args.chunks, args.threads),
        env,
    )
    from qconvert.formats.gguf.imatrix import read_imatrix

    chunks = read_imatrix(Path(tmp) / "ours.gguf").chunk_count
    return {
        "chunks": chunks,
        "build": build_kind(tools),
        "llama_imatrix": {k: ref[k] for k in ("wall_s", "peak_rss_mib")} | {"ppl": _ppl(ref["output"])},
        "qconvert": {k: ours[k] for k in ("wall_s", "peak_rss_mib")} | {"ppl": _ppl(ours["output"])},
        "ratio": round(ours["wall_s"] / ref["wall_s"], 3),
    }


if __name__ == "__main__":
    main()
