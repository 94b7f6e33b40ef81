"""`calibrate` output: one safetensors file with provenance; `load_stats` refuses another model's stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qconvert.calib.calibrate import calibrate
from qconvert.calib.stats import load_stats, save_stats
from qconvert.errors import BadInput
from qconvert.load import open_checkpoint


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, calib_text: Path) -> Path:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text(calib_text.read_text()[:20000])
    return f


def test_stats_file_round_trip(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(synthetic_dir("llama"))
    stats = calibrate(
        ckpt, str(small_text), num_samples=3, seq_len=32, dtype="f32", device="cpu", lm_head=True
    )
    out = save_stats(tmp_path / "stats.safetensors", stats)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "llama" and meta["num_samples"] == "3" and meta["seq_len"] == "32"
    assert meta["tokens"] == "96" and meta["dataset"] == str(small_text) and len(meta["config_sha256"]) == 64
    assert "model.layers.0.self_attn.q_proj.hessian" in keys
    assert "model.layers.0.self_attn.k_proj.hessian" not in keys  # stored once, k/v are aliases
    assert json.loads(meta["aliases"])["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"

    back = load_stats(out, ckpt)
    assert set(back.linears) == set(stats.linears)
    for name, st in stats.linears.items():
        b = back.linears[name]
        assert b.count == st.count == 96
        for kind in ("hessian", "abs_sum", "sq_sum", "abs_max"):
            assert torch.equal(getattr(b, kind), getattr(st, kind)), (name, kind)
    assert back.linears["model.layers.1.self_attn.v_proj"] is back.linears["model.layers.1.self_attn.q_proj"]


def test_subset_of_statistics(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(synthetic_dir("qwen2"))
    stats = calibrate(ckpt, str(small_text), num_samples=1, seq_len=32, kinds="sq_sum", device="cpu")
    out = save_stats(tmp_path / "s.safetensors", stats)
    with safe_open(str(out), framework="pt") as f:
        kinds = {k.rsplit(".", 1)[1] for k in f.keys()}
    assert kinds == {"sq_sum", "count"}


def test_stats_for_another_model_are_refused(synthetic_dir, small_text: Path, tmp_path: Path) -> None:
    llama = open_checkpoint(synthetic_dir("llama"))
    stats = calibrate(llama, str(small_text), num_samples=1, seq_len=32, kinds="abs_max", device="cpu")
    out = save_stats(tmp_path / "s.safetensors", stats)
    with pytest.raises(BadInput, match=r"stats were collected on model 'llama' .*not on 'qwen3'"):
        load_stats(out, open_checkpoint(synthetic_dir("qwen3")))
    load_stats(out, llama)  # the right model is accepted


def test_not_a_stats_file(tmp_path: Path, synthetic_dir) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 32)
    with pytest.raises(BadInput, match="junk.safetensors"):
        load_stats(junk)
    other = next(synthetic_dir("llama").glob("*.safetensors"))
    with pytest.raises(BadInput, match="not a qconvert calibration stats file"):
        load_stats(other)
    with pytest.raises(BadInput, match="stats file not found"):
        load_stats(tmp_path / "nope.safetensors")
