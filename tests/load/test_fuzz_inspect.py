"""The inspect fuzz harness (issue 20): seeded mutations of safetensors and GGUF headers (tests/load/fuzz.py).

Every case must end with exit 0 or 2, at most one line on stderr, strict JSON under --json (no NaN or
Infinity), within 2 s, and the worker's peak RSS may grow by at most 200 MB over all cases (so no single case
took more). The harness runs in its own process so that the test session's memory does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz.py")


def _run(seed: int, n: int) -> dict:
    done = subprocess.run([sys.executable, str(HARNESS), str(seed), str(n)], capture_output=True, text=True,
                          timeout=1800, cwd=HARNESS.parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(report: dict, n: int) -> None:
    assert report["cases"] == n and report["runs"] >= n
    assert report["failures"] == [], report["failures"][:10]
    assert report["slowest"][0] <= 2.0, report["slowest"]
    assert report["rss_growth_mb"] <= 200, report["rss_growth_mb"]


def test_two_thousand_mutated_headers():
    _check(_run(seed=1, n=2000), 2000)


@pytest.mark.slow
def test_four_thousand_more_mutated_headers():
    _check(_run(seed=2, n=4000), 4000)


def test_the_mutations_reach_every_kind():
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import fuzz
    finally:
        sys.path.remove(str(HARNESS.parent))
    kinds = {label.split(":")[2] for label, _, _ in fuzz.cases(seed=1, n=2000)}
    st = {"value", "shape", "many", "nan", "deep", "length", "bytes", "trunc"}
    gguf = {"kv-float", "kv-string", "key-bytes", "nested", "array-len", "counts", "tensor", "version",
            "bytes", "trunc", "none"}
    assert kinds == {f"st-{k}" for k in st} | {f"gguf-{k}" for k in gguf}


def test_a_non_finite_value_is_null_and_named(tmp_path, capsys):
    import random

    from qconvert.cli import main

    sys.path.insert(0, str(HARNESS.parent))
    try:
        import fuzz
    finally:
        sys.path.remove(str(HARNESS.parent))
    path = tmp_path / "nan.gguf"
    for seed in range(40):  # the kv-float mutation draws nan, inf or -inf
        path.write_bytes(fuzz._gguf(random.Random(seed), "kv-float"))
        with pytest.raises(SystemExit) as e:
            main(["inspect", str(path), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert e.value.code == 0
        assert out["metadata"]["llama.rope.freq_base"] is None
        assert list(out["non_finite"]) == ["metadata.llama.rope.freq_base"]
        assert out["non_finite"]["metadata.llama.rope.freq_base"] in ("nan", "inf", "-inf")
