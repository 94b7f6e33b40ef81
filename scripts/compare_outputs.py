"""Byte identity across commits: run the same conversions at two commits and compare every output's sha256.

    python scripts/compare_outputs.py --old 06425ad [--new HEAD] [--only gguf,rtn] [--keep DIR [--reuse]]

Each commit is checked out as a detached git worktree under a temp directory and run with this venv's
interpreter (its own package on sys.path first), on the real fixture model (SmolLM2-135M) and, for FP8
blocks (whose 128x128 tiles SmolLM2's widths do not divide), the 256-wide synthetic llama. Jobs:

    imatrix (4 chunks); convert BF16, Q8_0, Q4_K_M, Q6_K, IQ4_XS and Q4_K_M with that imatrix;
    calibrate (stats file); quantize rtn in every integer format, gptq (gptq, gptq_v2, compressed-tensors,
    --stats), awq (awq, gptq, compressed-tensors), fp8 dynamic/static/block in both fp8 formats.

Every file an output holds is hashed (directories file by file). Prints one line per output and exits 1
if any differs, so a refactor that claims "no output byte changes" can show it. With --keep DIR --reuse, a
commit's outputs already in DIR (hashes.json records them per commit) are not made again: a baseline is
run once, and later comparisons against it run the new commit only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fixtures  # noqa: E402

CALIB = ("--num-samples", "4", "--seq-len", "128")


def jobs(model: Path, synth: Path, calib: Path) -> list[tuple[str, str, list[str]]]:
    """(group, output name, qconvert arguments with {out} for the output path and {work} for the run dir)."""
    m, s, c = str(model), str(synth), str(calib)
    out: list[tuple[str, str, list[str]]] = [
        ("gguf", "imatrix.gguf", ["imatrix", m, "--dataset", c, "--chunks", "4", "-o", "{out}"]),
    ]
    for t in ("BF16", "Q8_0", "Q4_K_M", "Q6_K", "IQ4_XS"):
        out.append(("gguf", f"{t}.gguf", ["convert", m, "--type", t, "-o", "{out}"]))
    # relative to the run directory (the cwd): the path is stored in quantize.imatrix.file, and old and new
    # run in different directories
    out.append(("gguf", "Q4_K_M-imatrix.gguf",
                ["convert", m, "--type", "Q4_K_M", "--imatrix", "imatrix.gguf", "-o", "{out}"]))
    out.append(("calib", "stats.safetensors",
                ["calibrate", m, "--dataset", c, *CALIB, "-o", "{out}"]))
    for fmt in ("gptq", "gptq_v2", "compressed-tensors", "awq"):
        out.append(("rtn", f"rtn-{fmt}", ["quantize", m, "--method", "rtn", "--format", fmt, "--group-size",
                                          "64", "-o", "{out}"]))
    out.append(("rtn", "rtn-ct-asym-mse", ["quantize", m, "--method", "rtn", "--format", "compressed-tensors",
                                           "--asym", "--mse", "--bits", "8", "--group-size", "64",
                                           "-o", "{out}"]))
    for fmt in ("gptq", "gptq_v2", "compressed-tensors"):
        out.append(("gptq", f"gptq-{fmt}", ["quantize", m, "--method", "gptq", "--format", fmt,
                                            "--group-size",
                                            "64", "--dataset", c, *CALIB, "-o", "{out}"]))
    out.append(("gptq", "gptq-actorder", ["quantize", m, "--method", "gptq", "--act-order", "--group-size",
                                          "64", "--dataset", c, *CALIB, "-o", "{out}"]))
    out.append(("gptq", "gptq-stats", ["quantize", m, "--method", "gptq", "--stats",
                                       "{work}/stats.safetensors", "--group-size", "64", "-o", "{out}"]))
    for fmt in ("awq", "gptq", "compressed-tensors"):
        out.append(("awq", f"awq-{fmt}", ["quantize", m, "--method", "awq", "--format", fmt, "--group-size",
                                          "64", "--dataset", c, *CALIB, "-o", "{out}"]))
    for fmt in ("compressed-tensors", "fp8"):
        out.append(("fp8", f"fp8-dynamic-{fmt}", ["quantize", m, "--method", "fp8", "--format", fmt,
                                                  "-o", "{out}"]))
        out.append(("fp8", f"fp8-static-{fmt}", ["quantize", m, "--method", "fp8", "--scheme", "static",
                                                 "--format", fmt, "--dataset", c, *CALIB, "-o", "{out}"]))
        out.append(("fp8", f"fp8-block-{fmt}", ["quantize", s, "--method", "fp8", "--scheme", "block",
                                                "--format", fmt, "-o", "{out}"]))
    return out


def digest(path: Path) -> str:
    """sha256 of a file, or of a directory's files (name + content, sorted by name)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run_commit(commit: str, work: Path, selected: list[tuple[str, str, list[str]]],
               done: dict[str, str]) -> dict[str, str]:
    """Hashes of every selected output at `commit`; those in `done` (kept from an earlier run) are not
    made again."""
    hashes = dict(done)
    todo = [job for job in selected if job[1] not in hashes]
    if not todo:
        return hashes
    tree = work / "tree"
    if tree.exists():  # left by a killed run
        shutil.rmtree(tree)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), commit],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "QCONVERT_DEBUG": "1"}
    launcher = "import sys; from qconvert.cli import main; main(sys.argv[1:])"
    check = subprocess.run([sys.executable, "-P", "-c", "import qconvert; print(qconvert.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not check.startswith(str(tree)):
        raise SystemExit(f"{commit}: imported qconvert from {check}, not from the worktree")
    try:
        for _group, name, args in todo:
            target = work / name
            argv = [a.replace("{out}", str(target)).replace("{work}", str(work)) for a in args]
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-P", "-c", launcher, *argv], env=env, cwd=work,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                raise SystemExit(f"{commit}: {name} failed (exit {proc.returncode}): {tail}")
            hashes[name] = digest(target)
            (work / "hashes.json").write_text(json.dumps({"commit": commit, "hashes": hashes}, indent=1))
            print(f"  {commit[:10]} {name:28s} {time.perf_counter() - t0:6.1f} s  {hashes[name][:16]}",
                  flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)
    return hashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="baseline commit")
    ap.add_argument("--new", default="HEAD", help="commit to compare (default HEAD)")
    ap.add_argument("--only", default="", help="comma-separated groups: gguf, calib, rtn, gptq, awq, fp8")
    ap.add_argument("--keep", type=Path, help="keep the outputs under this directory")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse a commit's outputs kept there")
    args = ap.parse_args()
    selected = jobs(fixtures.smollm2_dir(), fixtures.synthetic_dir("llama"), fixtures.calib_text())
    if args.only:
        groups = set(args.only.split(","))
        # imatrix and stats feed later jobs: always run them when their consumers run
        selected = [j for j in selected if j[0] in groups or j[1] in ("imatrix.gguf", "stats.safetensors")]
    base = args.keep or Path(tempfile.mkdtemp(prefix="qconvert-compare-"))
    results = {}
    for label, commit in (("old", args.old), ("new", args.new)):
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], check=True, capture_output=True,
                             text=True).stdout.strip()
        print(f"{label}: {commit} = {sha}", flush=True)
        work = base / label
        done = _kept(work, sha) if args.reuse and args.keep else {}
        if not done and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        results[label] = run_commit(sha, work, selected, done)
    differ = [n for n in results["old"] if results["old"][n] != results["new"].get(n)]
    for _g, name, _a in selected:
        same = "same" if name not in differ else "DIFFERENT"
        print(f"{name:28s} {same:9s} {results['old'][name][:16]} {results['new'][name][:16]}")
    print(f"{len(selected) - len(differ)}/{len(selected)} outputs byte-identical")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if differ else 0


def _kept(work: Path, sha: str) -> dict[str, str]:
    """Hashes of the outputs a run of `sha` left in `work`, when they are still there."""
    try:
        record = json.loads((work / "hashes.json").read_text())
    except (OSError, ValueError):
        return {}
    if record.get("commit") != sha:
        return {}
    return {name: h for name, h in record["hashes"].items() if (work / name).exists()}


if __name__ == "__main__":
    sys.exit(main())
