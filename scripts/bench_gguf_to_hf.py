#!/usr/bin/env python3
"""Time and peak RSS of `qconvert convert model.gguf --to hf` (GGUF -> safetensors).

    python scripts/bench_gguf_to_hf.py [--model HF_DIR] [--type Q4_K_M] [--dtype bf16] [--threads 2] [--json]

Runs, each as its own child process (peak RSS from wait4's rusage):
  1. qconvert convert HF_DIR --type TYPE -o work/model-TYPE.gguf   (the input; timed, not the figure)
  2. qconvert convert work/model-TYPE.gguf --to hf -o work/hf --dtype DTYPE
and prints the second's wall time, peak RSS and output size. Default model: the 1.1B llama benchmark
checkpoint (tests/fixtures.py bench_1b_dir: hidden 2048, 22 layers, vocab 32000). Work files go to a temp
dir under the cache (QCONVERT_CACHE), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("QCONVERT_CACHE", Path.home() / ".cache" / "qconvert"))


def run(cmd: list[str]) -> dict:
    """Run cmd; wall seconds and peak RSS (MiB) of that child."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def default_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import bench_1b_dir

    return bench_1b_dir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model or default_model()
    qc = [sys.executable, "-m", "qconvert", "convert"]
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf2hf-", dir=cache_root()))
    try:
        gguf = work / f"model-{args.type}.gguf"
        make = run([*qc, str(model), "--type", args.type, "-o", str(gguf), "--threads", str(args.threads)])
        out = work / "hf"
        back = run([*qc, str(gguf), "--to", "hf", "-o", str(out), "--dtype", args.dtype])
        size = sum(f.stat().st_size for f in out.iterdir())
        result = {"model": str(model), "type": args.type, "dtype": args.dtype,
                  "gguf_bytes": gguf.stat().st_size, "make_gguf": make, "to_hf": back, "hf_bytes": size}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.type} GGUF ({result['gguf_bytes'] / 2**20:.0f} MiB, made in {make['seconds']} s) -> "
              f"HF {args.dtype} ({size / 2**20:.0f} MiB): {back['seconds']} s, "
              f"peak RSS {back['peak_rss_mib']} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
