"""calibrate, imatrix and quantize on a MoE checkpoint saved fused, as transformers 5 writes it
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]): each expert's Linears are read
as slices of the fused tensors (load.expert_slices), so every output equals the one of the per-expert (hub)
form of the same weights, and the quantized experts are written under the per-expert names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qconvert.load import open_checkpoint
from qconvert.pipelines.imatrix import compute_imatrix
from tests.helpers import read_tensors, run_cli
from tests.pipelines.test_convert_moe import _edit, _fuse

SMALL = ("--num-samples", "4", "--seq-len", "64")


@pytest.fixture(scope="module")
def forms(synthetic_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the per-expert qwen3_moe, the same weights fused)."""
    model = synthetic_dir("qwen3_moe")
    return model, _fuse(model, tmp_path_factory.mktemp("fused") / "qwen3_moe")


def test_fused_form_has_no_per_expert_tensors(forms):
    _, fused = forms
    names = list(open_checkpoint(fused).tensors)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n for n in names)


def test_imatrix_is_the_same(forms, calib_text):
    a, b = (compute_imatrix(open_checkpoint(m), str(calib_text), ctx_size=64, chunks=2, device="cpu",
                            dtype="f32", threads=1, compute_ppl=False).imatrix for m in forms)
    assert any("_exps." in n for n in a.entries) and set(a.entries) == set(b.entries)
    for name, (sums, counts) in a.entries.items():
        assert np.array_equal(sums, b.entries[name][0]) and np.array_equal(counts, b.entries[name][1]), name


def _stats(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as st:
        return {k: st.get_tensor(k) for k in st.keys()}, dict(st.metadata())


def test_calibrate_stats_are_the_same(forms, calib_text, capsys, tmp_path):
    got = []
    for i, model in enumerate(forms):
        out = tmp_path / f"{i}.safetensors"
        code, _, err = run_cli(capsys, "calibrate", model, "--dataset", calib_text, "-o", out,
                               "--dtype", "f32", "--device", "cpu", *SMALL)
        assert code == 0, err
        got.append(_stats(out))
    (ta, ma), (tb, mb) = got
    assert any(".experts.5.down_proj" in k for k in ta) and sorted(ta) == sorted(tb)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    ma.pop("model"), mb.pop("model")  # the directory name
    assert ma == mb


@pytest.mark.parametrize("method", [("--method", "rtn", "--format", "compressed-tensors"),
                                    ("--method", "fp8", "--format", "compressed-tensors"),
                                    ("--method", "gptq", "--calib-dtype", "f32", "--device", "cpu",
                                     *SMALL)], ids=["rtn", "fp8", "gptq"])
def test_quantized_output_is_the_same(method, forms, calib_text, capsys, tmp_path):
    extra = ("--dataset", calib_text) if "gptq" in method else ()
    outs = []
    for i, model in enumerate(forms):
        out = tmp_path / str(i)
        code, stdout, err = run_cli(capsys, "quantize", model, *method, *extra, "-o", out)
        assert code == 0, err
        outs.append(out)
    if "gptq" not in method:
        assert "per-expert tensors" in stdout, stdout  # the fused form's note
    a, b = (read_tensors(o) for o in outs)
    assert any(".experts.7.gate_proj" in k for k in a) and not any("gate_up_proj" in k for k in b)
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    configs = [json.loads((o / "config.json").read_text()) for o in outs]
    assert configs[0] == configs[1]


def _bad(forms, tmp_path) -> Path:
    def drop_expert(t):
        name = "model.layers.0.mlp.experts.gate_up_proj"
        t[name] = t[name][:7].clone()

    shutil.rmtree(tmp_path / "bad", ignore_errors=True)
    return _edit(forms[1], tmp_path / "bad", drop_expert)


@pytest.mark.parametrize("command", [("calibrate", "--dataset", "{text}", *SMALL),
                                     ("imatrix", "--dataset", "{text}", "--chunks", "1"),
                                     ("quantize", "--method", "rtn"),
                                     ("quantize", "--method", "gptq", "--dataset", "{text}", *SMALL)],
                         ids=["calibrate", "imatrix", "rtn", "gptq"])
def test_fused_tensor_of_the_wrong_shape_is_one_line(command, forms, calib_text, capsys, tmp_path):
    model = _bad(forms, tmp_path)
    out = tmp_path / "out"
    args = [a.format(text=calib_text) for a in command]
    code, stdout, err = run_cli(capsys, args[0], model, *args[1:], "-o", out)
    assert code == 2, (stdout, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "fused expert tensor model.layers.0.mlp.experts.gate_up_proj has shape " \
        "[7, 512, 256], expected [E, 2*I, H] with E=8" in lines[0], err
    assert not out.exists()
