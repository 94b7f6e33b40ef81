"""calibrate, GPTQ and AWQ on Mixture-of-Experts checkpoints: per-expert statistics from the tokens routed to
each expert, the all-experts option, and the fallbacks for experts too rarely routed (GPTQ: RTN; AWQ: unit
scales, no clipping).

The router of a synthetic qwen3_moe is rewritten so that two experts never win the top-2: three pairs of
experts get opposite router rows (+c·u, -c·u), so for every token three experts have a logit > 0, while
experts 3 and 7 get a zero row (logit 0, never in the top 2). Those two see no token."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert.calib.stats import StatsFile
from qconvert.kernels import packing
from qconvert.methods.rtn import rtn_quantize
from qconvert.methods.types import QuantSpec
from tests.helpers import read_tensors, run_cli

UNROUTED = (3, 7)
PAIRS = ((0, 1), (2, 4), (5, 6))
TOKENS = 512
SMALL = ("--num-samples", "8", "--seq-len", "64")  # TOKENS tokens, 2 x TOKENS (token, expert) pairs


@pytest.fixture(scope="module")
def biased_moe(synthetic_dir, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("biased") / "qwen3_moe"
    shutil.copytree(synthetic_dir("qwen3_moe"), out)
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if not name.endswith(".mlp.gate.weight"):
            continue
        router = torch.zeros_like(w, dtype=torch.float32)
        for a, b in PAIRS:
            u = torch.randn(w.shape[1], generator=gen)
            router[a], router[b] = u, -u
        tensors[name] = router.to(w.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _layers(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["num_hidden_layers"]


def _calibrate(capsys, model: Path, text: Path, out: Path, *extra: str) -> tuple[StatsFile, str]:
    code, stdout, err = run_cli(capsys, "calibrate", model, "--dataset", text, "-o", out, "--dtype", "f32",
                                "--device", "cpu", *SMALL, *extra)
    assert code == 0, err
    return StatsFile(out), stdout


def test_calibrate_counts_routed_tokens_per_expert(biased_moe, calib_text, capsys, tmp_path):
    stats, stdout = _calibrate(capsys, biased_moe, calib_text, tmp_path / "routed.safetensors")
    tokens = json.loads(stats.meta["expert_tokens"])
    n = _layers(biased_moe)
    assert len(tokens) == 8 * n
    assert json.loads(stats.meta["all_experts"]) is False
    for layer in range(n):
        per = [tokens[f"model.layers.{layer}.mlp.experts.{e}"] for e in range(8)]
        assert sum(per) == TOKENS * 2  # top-2: every token counted at two experts
        for e in range(8):
            st = stats.read(f"model.layers.{layer}.mlp.experts.{e}.gate_proj")
            assert st.count == per[e]  # the expert's Linears saw exactly its routed tokens
            assert bool(torch.isfinite(st.hessian).all() and torch.isfinite(st.abs_max).all())
            if e in UNROUTED:
                assert per[e] == 0 and not st.hessian.any() and not st.abs_max.any() and not st.sq_sum.any()
            else:
                assert per[e] > 0 and st.hessian.diagonal().gt(0).all()
            down = stats.read(f"model.layers.{layer}.mlp.experts.{e}.down_proj")
            assert down.count == per[e] and down.in_features == 256
    # the summary line names the unrouted experts with their count
    for layer in range(n):
        for e in UNROUTED:
            assert f"model.layers.{layer}.mlp.experts.{e} (0)" in stdout or "more" in stdout


def test_calibrate_all_experts_gives_every_expert_every_token(biased_moe, calib_text, capsys, tmp_path):
    stats, stdout = _calibrate(capsys, biased_moe, calib_text, tmp_path / "all.safetensors", "--all-experts")
    assert "--all-experts" in stdout
    routed = json.loads(stats.meta["expert_tokens"])
    for layer in range(_layers(biased_moe)):
        router = stats.read(f"model.layers.{layer}.mlp.gate")  # the MoE block's input, every token
        assert router.count == TOKENS
        assert routed[f"model.layers.{layer}.mlp.experts.3"] == 0  # the routing itself is unchanged
        for e in range(8):
            st = stats.read(f"model.layers.{layer}.mlp.experts.{e}.gate_proj")
            assert st.count == TOKENS
            torch.testing.assert_close(st.hessian, router.hessian, rtol=0, atol=0)
            down = stats.read(f"model.layers.{layer}.mlp.experts.{e}.down_proj")
            assert down.count == TOKENS and down.hessian.diagonal().gt(0).all()


def _gptq(capsys, model: Path, text: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = run_cli(capsys, "quantize", model, "--method", "gptq", "--dataset", text, "-o", out,
                                "--calib-dtype", "f32", "--device", "cpu", "--group-size", "64", "--json",
                                *SMALL, *extra)
    assert code == 0, err
    return json.loads(stdout)


def _dequantized(out: Path, prefix: str) -> np.ndarray:
    got = read_tensors(out)
    parts = [got[f"{prefix}.{s}"].float().numpy() if s == "scales" else got[f"{prefix}.{s}"].numpy()
             for s in ("qweight", "qzeros", "scales", "g_idx")]
    return packing.gptq_dequantize(*parts, bits=4, v2=False)


def test_gptq_falls_back_to_rtn_for_unrouted_experts(biased_moe, calib_text, capsys, tmp_path):
    summary = _gptq(capsys, biased_moe, calib_text, tmp_path / "routed")
    n = _layers(biased_moe)
    report = next(line for line in summary["notes"] if line.startswith("experts: "))
    assert report.startswith(f"experts: {8 * n} in {n} layers; routed tokens per expert min 0 ")
    fallback = next(line for line in summary["notes"] if "quantized with RTN" in line)
    fell = dict(re.findall(r"(model\.layers\.\d+\.mlp\.experts\.\d+) \((\d+)\)", fallback))
    assert all(int(c) < 32 for c in fell.values())
    for layer in range(n):
        for e in UNROUTED:
            assert fell[f"model.layers.{layer}.mlp.experts.{e}"] == "0"
    # every expert Linear is quantized under the checkpoint's per-expert name; the router is not
    names = {r["name"] for r in summary["layers"]}
    assert {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(n) for e in range(8)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert not any(name.endswith("mlp.gate") for name in names)
    src = read_tensors(biased_moe)
    spec = QuantSpec(bits=4, group_size=64, scale_dtype="float16")
    calibrated = [f"model.layers.{i}.mlp.experts.{e}" for i in range(n) for e in range(8)
                  if f"model.layers.{i}.mlp.experts.{e}" not in fell]
    assert len(calibrated) >= 4 * n
    for expert in (*fell, calibrated[0]):
        prefix = f"{expert}.down_proj"
        rtn = rtn_quantize(src[f"{prefix}.weight"], spec).dequantize()
        same = np.array_equal(_dequantized(tmp_path / "routed", prefix), rtn)
        assert same == (expert in fell), expert  # RTN exactly where it fell back, a real GPTQ elsewhere


def test_gptq_all_experts_calibrates_every_expert(biased_moe, calib_text, capsys, tmp_path):
    summary = _gptq(capsys, biased_moe, calib_text, tmp_path / "all", "--all-experts")
    assert not any("quantized with RTN" in line for line in summary["notes"])
    src = read_tensors(biased_moe)
    spec = QuantSpec(bits=4, group_size=64, scale_dtype="float16")
    for layer in range(_layers(biased_moe)):
        for p in ("gate_proj", "down_proj"):
            prefix = f"model.layers.{layer}.mlp.experts.3.{p}"
            rtn = rtn_quantize(src[f"{prefix}.weight"], spec).dequantize()
            assert not np.array_equal(_dequantized(tmp_path / "all", prefix), rtn)  # its own Hessian
    errors = {r["name"]: r["error"] for r in summary["layers"]}
    assert errors["model.layers.0.mlp.experts.3.down_proj"] > 0


def test_min_expert_tokens_zero_keeps_gptq_everywhere(biased_moe, calib_text, capsys, tmp_path):
    # with no minimum an unrouted expert's GPTQ runs on an all-zero Hessian: damping alone, a finite result
    summary = _gptq(capsys, biased_moe, calib_text, tmp_path / "none", "--min-expert-tokens", "0")
    assert not any("quantized with RTN" in line for line in summary["notes"])
    deq = _dequantized(tmp_path / "none", "model.layers.0.mlp.experts.3.down_proj")
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("source", ["stats", "not-sequential"])
def test_gptq_from_one_statistics_pass_falls_back_too(source, biased_moe, calib_text, capsys, tmp_path):
    # --stats (a calibrate file) and --no-true-sequential take the expert's row count from the statistics
    if source == "stats":
        _calibrate(capsys, biased_moe, calib_text, tmp_path / "s.safetensors", "--stats", "hessian")
        code, stdout, err = run_cli(capsys, "quantize", biased_moe, "--method", "gptq", "--stats",
                                    tmp_path / "s.safetensors", "-o", tmp_path / "q", "--group-size", "64",
                                    "--json")
    else:
        code, stdout, err = run_cli(capsys, "quantize", biased_moe, "--method", "gptq", "--dataset",
                                    calib_text, "-o", tmp_path / "q", "--group-size", "64", "--json",
                                    "--calib-dtype", "f32", "--device", "cpu", "--no-true-sequential",
                                    *SMALL)
    assert code == 0, err
    fallback = next(line for line in json.loads(stdout)["notes"] if "quantized with RTN" in line)
    for layer in range(_layers(biased_moe)):
        for e in UNROUTED:
            assert f"model.layers.{layer}.mlp.experts.{e} (0)" in fallback


def _awq(capsys, model: Path, text: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = run_cli(capsys, "quantize", model, "--method", "awq", "--dataset", text, "-o", out,
                                "--calib-dtype", "f32", "--device", "cpu", "--group-size", "64", "--json",
                                "--format", "awq", *SMALL, *extra)
    assert code == 0, err
    return json.loads(stdout)


def _awq_dequantized(out: Path, prefix: str) -> np.ndarray:
    got = read_tensors(out)
    return packing.awq_dequantize(got[f"{prefix}.qweight"].numpy(), got[f"{prefix}.qzeros"].numpy(),
                                  got[f"{prefix}.scales"].numpy())


def test_awq_keeps_unit_scales_for_unrouted_experts(biased_moe, calib_text, capsys, tmp_path):
    from qconvert.methods.awq import awq_quantize

    summary = _awq(capsys, biased_moe, calib_text, tmp_path / "routed")
    n = _layers(biased_moe)
    assert any(line.startswith(f"experts: {8 * n} in {n} layers") for line in summary["notes"])
    fallback = next(line for line in summary["notes"] if "kept unit AWQ scales" in line)
    fell = dict(re.findall(r"(model\.layers\.\d+\.mlp\.experts\.\d+) \((\d+)\)", fallback))
    assert all(int(c) < 32 for c in fell.values())
    for layer in range(n):
        for e in UNROUTED:
            assert fell[f"model.layers.{layer}.mlp.experts.{e}"] == "0"
    names = {r["name"] for r in summary["layers"]}
    assert {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(n) for e in range(8)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert not any(name.endswith("mlp.gate") for name in names)
    src, got = read_tensors(biased_moe), read_tensors(tmp_path / "routed")
    for layer in range(n):
        router = f"model.layers.{layer}.mlp.gate.weight"  # unquantized, its columns balanced with the experts
        assert got[router].dtype == src[router].dtype and not torch.equal(got[router], src[router])
    spec = QuantSpec(bits=4, group_size=64, sym=False)  # AWQ: zero point
    calibrated = [f"model.layers.{i}.mlp.experts.{e}" for i in range(n) for e in range(8)
                  if f"model.layers.{i}.mlp.experts.{e}" not in fell]
    assert len(calibrated) >= 4 * n
    for expert in (*fell, calibrated[0]):
        # down_proj: its inputs are only ever scaled by the expert's own up -> down group
        prefix = f"{expert}.down_proj"
        plain = awq_quantize(src[f"{prefix}.weight"].float(), spec).dequantize()
        same = np.array_equal(_awq_dequantized(tmp_path / "routed", prefix), plain)
        assert same == (expert in fell), expert  # unit scales, unclipped exactly where it fell back


def test_awq_all_experts_calibrates_every_expert(biased_moe, calib_text, capsys, tmp_path):
    from qconvert.methods.awq import awq_quantize

    summary = _awq(capsys, biased_moe, calib_text, tmp_path / "all", "--all-experts")
    assert not any("kept unit AWQ scales" in line for line in summary["notes"])
    assert any("--all-experts" in line for line in summary["notes"] if line.startswith("experts: "))
    src = read_tensors(biased_moe)
    spec = QuantSpec(bits=4, group_size=64, sym=False)  # AWQ: zero point
    for layer in range(_layers(biased_moe)):
        prefix = f"model.layers.{layer}.mlp.experts.3.down_proj"
        plain = awq_quantize(src[f"{prefix}.weight"].float(), spec).dequantize()
        assert not np.array_equal(_awq_dequantized(tmp_path / "all", prefix), plain)  # searched and clipped
