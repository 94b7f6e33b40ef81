"""Every bad input through `qconvert inspect`: one line on stderr, no traceback, the right exit code, fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qconvert.cli import main
from qconvert.load import safetensors as st

REPO = Path(__file__).resolve().parents[2]


def _inspect(capsys, *args: str) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["inspect", *args])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return e.value.code, out, err, elapsed


def _check_one_line(code, out, err, elapsed, want_code, *fragments):
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qconvert: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert out == ""
    assert elapsed < 2.0


def test_every_bad_safetensors_header(tmp_path, build, capsys, monkeypatch):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    for case, (data, fragment) in build.bad_safetensors().items():
        path = build.write(tmp_path / case.replace(" ", "_") / "model.safetensors", data)
        for arg in (path, path.parent):  # the file itself and its directory
            _check_one_line(*_inspect(capsys, str(arg)), 2, str(path), fragment)


def test_every_bad_gguf_header(tmp_path, build, capsys, monkeypatch):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    for case, (data, fragment) in build.bad_gguf().items():
        path = build.write(tmp_path / f"{case.replace(' ', '_')}.gguf", data)
        _check_one_line(*_inspect(capsys, str(path)), 2, str(path), fragment)


def _sharded(tmp_path, build) -> Path:
    d = tmp_path / "sharded"
    build.write(d / "a.safetensors", build.safetensors_bytes({"x": np.ones(2, np.float32)}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    return d


def test_bad_directories_and_side_files(tmp_path, build, capsys, monkeypatch):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_one_line(*_inspect(capsys, str(tmp_path / "missing")), 2, "missing", "no such file or directory")
    _check_one_line(*_inspect(capsys, str(empty)), 2, str(empty), "directory is empty")
    (empty / "config.json").write_text("{}")
    _check_one_line(*_inspect(capsys, str(empty)), 2, str(empty), "no .safetensors weights")

    d = _sharded(tmp_path, build)
    (d / "config.json").write_text("{not json")
    _check_one_line(*_inspect(capsys, str(d)), 2, str(d / "config.json"), "not valid JSON")
    (d / "config.json").unlink()

    index = d / "model.safetensors.index.json"
    index.write_text("not json")
    _check_one_line(*_inspect(capsys, str(d)), 2, str(index), "not valid JSON")
    index.write_text(json.dumps({"weight_map": {"x": "b.safetensors"}}))
    _check_one_line(*_inspect(capsys, str(d)), 2, str(index), "missing shard 'b.safetensors'")
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    _check_one_line(*_inspect(capsys, str(d)), 2, str(index), "'y'", "no such tensor")

    other = build.write(tmp_path / "notes.txt", b"hello, this is not a checkpoint at all")
    _check_one_line(*_inspect(capsys, str(other)), 2, str(other), "not a safetensors file")


def test_permission_denied_is_exit_1(tmp_path, build, capsys, monkeypatch):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    path = build.write(tmp_path / "m.safetensors", build.safetensors_bytes({"w": np.ones(2, np.float32)}))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(st, "open", denied, raising=False)  # we run as root: chmod would not stop us
    _check_one_line(*_inspect(capsys, str(path)), 1, str(path), "Permission denied")


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_bad_input_in_a_real_process(tmp_path, build, kind):
    cases = build.bad_safetensors() if kind == "safetensors" else build.bad_gguf()
    data, fragment = next(iter(cases.values()))
    path = build.write(tmp_path / f"bad.{kind}", data)
    env = {k: v for k, v in os.environ.items() if k != "QCONVERT_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "qconvert", "inspect", str(path)], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and fragment in r.stderr and "Traceback" not in r.stderr
