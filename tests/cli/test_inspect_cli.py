"""`qconvert inspect` end to end: tables on stdout (every row, even when piped), --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qconvert.cli import main

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qconvert", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180)


def test_tables_show_every_tensor_when_piped(tmp_path):
    n = 1500
    long_name = "model.layers.0.block_sparse_moe.experts.0.very_long_projection_name_for_width.weight"
    tensors = {f"model.layers.{i}.mlp.w[{i}]": np.zeros(2, np.float32) for i in range(n)}
    tensors[long_name] = np.zeros((3, 4), np.float16)
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path), metadata={"note": "[bold]not markup[/bold]"})
    r = _run("inspect", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for i in (0, 777, n - 1):  # brackets in names are text, not rich markup
        assert any(f"model.layers.{i}.mlp.w[{i}]" in line for line in lines), i
    assert sum("mlp.w[" in line for line in lines) == n
    assert any(long_name in line and "[3, 4]" in line for line in lines)  # not cut, not wrapped
    assert "[bold]not markup[/bold]" in r.stdout
    assert "Totals" in r.stdout and "bits per weight" in r.stdout


def test_json_flag_and_table_on_a_quantized_checkpoint(tmp_path):
    d = tmp_path / "gptq"
    d.mkdir()
    k, n = 256, 64
    save_file({"l.qweight": np.zeros((k // 8, n), np.int32), "l.qzeros": np.zeros((2, n // 8), np.int32),
               "l.scales": np.ones((2, n), np.float16), "l.g_idx": np.zeros(k, np.int32)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}}))
    r = _run("inspect", str(d), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["parameters"] == k * n and s["quantized_layers"][0]["bits"] == 4
    r = _run("inspect", str(d))
    assert r.returncode == 0 and "Quantized layers" in r.stdout and "gptq" in r.stdout


def test_missing_argument_and_missing_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert "Missing argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "absent.gguf")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "absent.gguf" in err
