#!/usr/bin/env python3
"""Time and peak RSS of `qconvert convert` against llama.cpp's llama-quantize.

    python scripts/bench_convert.py [--model HF_DIR] [--type Q4_K_M ...] [--imatrix FILE] [--threads 2]
                                    [--repeat 1] [--json]

Runs, each as its own child process (peak RSS from wait4's rusage):
  1. qconvert convert HF_DIR --type BF16          (the file llama-quantize needs; also timed, once)
and for each --type (with --imatrix FILE also given to every command when set):
  2. qconvert convert HF_DIR --type TYPE          (one step: HF → quantized)
  3. qconvert convert BF16.gguf --type TYPE       (drop-in for llama-quantize)
  4. llama-quantize BF16.gguf OUT TYPE THREADS    (NATIVE=1 scripts/build_llamacpp_tools.sh; --portable)
and checks that 2, 3 and 4 wrote the same bytes. With --two-step, also llama.cpp's own first step,
  5. convert_hf_to_gguf.py HF_DIR --outtype bf16  (kept beside the tools by scripts/build_llamacpp_tools.sh)
whose time plus llama-quantize's is what users pay today. Default model: the SmolLM2 fixture. Work files go
to a temp dir under the cache (QCONVERT_CACHE), removed at the end.

--libllama runs step 4 as llama_model_quantize from the oracle wheel's libllama (tests/oracle/llamacpp.py;
what llama-quantize's main() calls, same nthread) and step 5 as the sdist's converter (tests/fixtures.py
llamacpp_source; --pre-tokenizer names the pre-tokenizer for a synthetic tokenizer, as the MoE oracle tests
do), so nothing has to be compiled. A synthetic MoE benchmark model: `python tests/fixtures.py bench-moe`
(qwen3_moe, hidden 2048, 16 layers, 32 experts, top-4, expert FFN 512: ~1.9B parameters, 3.8 GB), or
tests/fixtures.py build_streamed_moe with smaller sizes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("QCONVERT_CACHE", Path.home() / ".cache" / "qconvert"))


def run(cmd: list[str]) -> dict:
    """Run cmd; wall seconds, peak RSS (MiB) of that child, exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def qconvert(
    model: Path | str, file_type: str, out: Path, threads: int, imatrix: Path | None = None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "qconvert",
        "convert",
        str(model),
        "--type",
        file_type,
        "-o",
        str(out),
        "--threads",
        str(threads),
    ]
    return cmd + (["--imatrix", str(imatrix)] if imatrix else [])


def llama_quantize_bin(given: str | None, portable: bool = False) -> Path:
    """The llama-quantize to compare with: the native build (-DGGML_NATIVE=ON, what users run) unless
    --portable; scripts/build_llamacpp_tools.sh builds it once into the cache."""
    if given:
        return Path(given)
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llamacpp_tools.sh")],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "NATIVE": "0" if portable else "1"},
    )
    return Path(built.stdout.strip().splitlines()[-1]) / "llama-quantize"


def build_kind(quantize_bin: Path | None) -> str:
    """Which llama.cpp the baseline is: the build script's BUILD stamp, or the oracle wheel's libllama."""
    if quantize_bin is None:
        return "portable (oracle wheel libllama, -DGGML_NATIVE=OFF)"
    stamp = quantize_bin.parent.parent / "BUILD"
    return stamp.read_text().strip() if stamp.is_file() else f"unknown ({quantize_bin})"


def _fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qconvert_bench_fixtures", ROOT / "tests" / "fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def default_model() -> Path:
    return _fixtures().smollm2_dir()


# step 4 through libllama: the argument list of llama-quantize (IN OUT TYPE NTHREAD), no --imatrix
_LIBLLAMA_QUANTIZE = (
    "import sys, gguf; sys.path.insert(0, sys.argv[1]); from tests.oracle.llamacpp import model_quantize; "
    "model_quantize(sys.argv[2], sys.argv[3], int(getattr(gguf.LlamaFileType, 'MOSTLY_' + sys.argv[4])), "
    "nthread=int(sys.argv[5]))"
)


def libllama_quantize_cmd(extra: list[str]) -> list[str]:
    if extra:
        raise SystemExit("--libllama does not pass an imatrix; use the llama-quantize tool for --imatrix")
    return [sys.executable, "-c", _LIBLLAMA_QUANTIZE, str(ROOT)]


def bench(
    model: Path,
    file_type: str,
    threads: int,
    repeat: int,
    quantize_bin: Path | None,
    work: Path,
    imatrix: Path | None = None,
) -> dict:
    bf16 = work / "model-BF16.gguf"
    tag = file_type + ("+imatrix" if imatrix else "")
    names = [
        "qconvert HF→BF16",
        f"qconvert HF→{tag}",
        f"qconvert BF16.gguf→{tag}",
        f"llama-quantize BF16→{tag}",
    ]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    outs = [work / "one-step.gguf", work / "drop-in.gguf", work / "llama.gguf"]
    extra = ["--imatrix", str(imatrix)] if imatrix else []
    for _ in range(repeat):
        if not bf16.exists():
            rows["qconvert HF→BF16"].append(run(qconvert(model, "BF16", bf16, threads)))
        rows[f"qconvert HF→{tag}"].append(run(qconvert(model, file_type, outs[0], threads, imatrix)))
        rows[f"qconvert BF16.gguf→{tag}"].append(run(qconvert(bf16, file_type, outs[1], threads, imatrix)))
        tool = libllama_quantize_cmd(extra) if quantize_bin is None else [str(quantize_bin), *extra]
        rows[f"llama-quantize BF16→{tag}"].append(
            run([*tool, str(bf16), str(outs[2]), file_type, str(threads)])
        )
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in rows.items() if v}
    same = all(filecmp.cmp(outs[0], o, shallow=False) for o in outs[1:])
    size = outs[0].stat().st_size
    for o in outs:
        o.unlink()
    return {
        "model": str(model),
        "type": tag,
        "threads": threads,
        "repeat": repeat,
        "output_bytes": size,
        "identical_outputs": same,
        "runs": best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: the SmolLM2 fixture)")
    ap.add_argument("--type", action="append", help="file type (repeatable; default Q4_K_M)")
    ap.add_argument("--imatrix", type=Path, help="importance matrix given to every quantizing command")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest is reported")
    ap.add_argument("--llama-quantize", help="llama-quantize path (default: scripts/build_llamacpp_tools.sh)")
    ap.add_argument("--portable", action="store_true",
                    help="compare with the portable build (-DGGML_NATIVE=OFF) instead of the native one")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--two-step", action="store_true", help="also time convert_hf_to_gguf.py --outtype bf16")
    ap.add_argument("--libllama", action="store_true",
                    help="llama_model_quantize through the oracle wheel and the sdist's converter (no build)")
    ap.add_argument("--pre-tokenizer", help="with --libllama --two-step: the converter's pre-tokenizer name")
    args = ap.parse_args()
    model = args.model or default_model()
    quantize_bin = None if args.libllama else llama_quantize_bin(args.llama_quantize, args.portable)
    baseline = build_kind(quantize_bin)
    cache_root().mkdir(parents=True, exist_ok=True)
    reports: list[dict] = []
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix="bench-convert-") as tmp:
        if args.two_step:
            out = Path(tmp) / "hf-converter-BF16.gguf"
            converter = _fixtures().llamacpp_source() if quantize_bin is None else \
                quantize_bin.parent.parent / "converter"
            args_out = [str(model), "--outtype", "bf16", "--outfile", str(out)]
            if args.pre_tokenizer:  # the converter's hash does not know a synthetic tokenizer
                driver = ROOT / "tests" / "oracle" / "convert_hf.py"
                cmd = [sys.executable, str(driver), str(converter), args.pre_tokenizer, *args_out]
            else:
                env_py = f"PYTHONPATH={converter / 'gguf-py'}"
                cmd = ["env", env_py, sys.executable, str(converter / "convert_hf_to_gguf.py"), *args_out]
            reports.append(
                {
                    "model": str(model),
                    "type": "BF16 (llama.cpp converter)",
                    "threads": 1,
                    "repeat": 1,
                    "output_bytes": 0,
                    "identical_outputs": None,
                    "runs": {"convert_hf_to_gguf.py --outtype bf16": run(cmd)},
                }
            )
            reports[-1]["output_bytes"] = out.stat().st_size
            out.unlink()
        for file_type in args.type or ["Q4_K_M"]:
            reports.append(
                bench(model, file_type, args.threads, args.repeat, quantize_bin, Path(tmp), args.imatrix)
            )
    for report in reports:
        report["llama_cpp_build"] = baseline
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    print(f"llama.cpp baseline: {baseline}")
    for report in reports:
        print(
            f"{report['model']} → {report['type']}, {report['threads']} threads, "
            f"output {report['output_bytes'] / 2**20:.1f} MiB, "
            f"identical outputs: {report['identical_outputs']}"
        )
        print(f"{'command':<40} {'seconds':>9} {'peak RSS MiB':>13}")
        for name, r in report["runs"].items():
            print(f"{name:<40} {r['seconds']:>9.2f} {r['peak_rss_mib']:>13.1f}")


if __name__ == "__main__":
    main()
