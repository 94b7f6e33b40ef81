"""convert --target-bpw / --target-size: per-tensor types to a size budget (formats/gguf/budget.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.errors import BadInput
from qconvert.formats.gguf import budget
from qconvert.formats.gguf.budget import Candidate, Measured
from qconvert.formats.gguf.imatrix import Imatrix, write_imatrix_gguf
from qconvert.kernels import dequantize
from qconvert.pipelines.convert import ConvertOptions, convert
from tests.helpers import run_cli

Q = gguf.GGMLQuantizationType


def test_parse_size_units():
    assert budget.parse_size("1234") == 1234
    assert budget.parse_size("2.1GB") == 2_100_000_000
    assert budget.parse_size("900MiB") == 900 * 2**20
    assert budget.parse_size(" 3 kib ") == 3072
    for bad in ("", "1.2.3GB", "12 parsecs", "-5MB", "0"):
        with pytest.raises(BadInput, match="--target-size"):
            budget.parse_size(bad)


def _measured(rng: np.random.Generator, n: int) -> list[Measured]:
    out = []
    for i in range(n):
        sizes = np.sort(rng.choice(np.arange(10, 100), 4, replace=False))
        errors = np.sort(rng.uniform(0, 50, 4))[::-1] + 1
        out.append(Measured(f"t{i}", tuple(Candidate(Q.Q4_0, int(b), float(e))
                                           for b, e in zip(sizes, errors, strict=True))))
    return out


def test_allocate_stays_within_budget_and_is_near_the_optimum():
    """Brute force over every assignment of 5 tensors x 4 types: the greedy hull walk never exceeds the
    budget, and its error is within one step of the true optimum (the knapsack's integrality gap)."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        ms = _measured(rng, 5)
        lo = sum(m.candidates[0].nbytes for m in ms)
        hi = sum(m.candidates[-1].nbytes for m in ms)
        for b in np.linspace(lo, hi, 7).astype(int):
            got = budget.allocate(ms, int(b))
            assert sum(c.nbytes for c in got.values()) <= b
            best = min(sum(c.error for c in combo) for combo in itertools.product(*(m.candidates for m in ms))
                       if sum(c.nbytes for c in combo) <= b)
            step = max(m.candidates[0].error - m.candidates[-1].error for m in ms)
            assert sum(c.error for c in got.values()) <= best + step + 1e-9
        assert all(got[m.name] == m.candidates[-1] for m in ms)  # at the top budget: every best type


def test_allocate_refuses_an_impossible_budget():
    ms = _measured(np.random.default_rng(1), 3)
    with pytest.raises(BadInput, match="smallest types need"):
        budget.allocate(ms, sum(m.candidates[0].nbytes for m in ms) - 1)


def test_measured_error_is_the_imatrix_weighted_error_of_the_real_kernel():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    w = rng.gamma(2.0, 1.0, (1, 512)).astype(np.float32)
    m = budget.measure_tensor("blk.0.ffn_up.weight", x, (512, 64), w)
    assert {c.qtype for c in m.candidates} == set(budget.fitting_types(512))
    keys = [(c.nbytes, c.error) for c in m.candidates]
    assert keys == sorted(keys)  # cheapest first, the better of equal sizes first
    from qconvert.kernels import quantize

    for c in m.candidates:  # 64 rows: the sample is every row
        d = dequantize(quantize(x, c.qtype, w[0]), c.qtype).astype(np.float64) - x
        assert c.error == pytest.approx(float(np.sum(d * d * w.astype(np.float64))), rel=1e-12)
    q8 = next(c for c in m.candidates if c.qtype == Q.Q8_0)
    q2 = next(c for c in m.candidates if c.qtype == Q.Q2_K)
    assert q8.error < q2.error


def _imatrix(bf16: Path, path: Path) -> Path:
    rng = np.random.default_rng(0)
    entries = {t.name: (rng.gamma(2.0, 1.0, (1, int(t.shape[0]))).astype(np.float32) * 50,
                        np.array([50.0], np.float32))
               for t in gguf.GGUFReader(bf16).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    write_imatrix_gguf(path, Imatrix(entries, datasets=["calib.txt"], chunk_count=50, chunk_size=512))
    return path


@pytest.fixture
def model_and_imatrix(synthetic_dir, tmp_path) -> tuple[Path, Path]:
    model = synthetic_dir("llama")
    bf16 = tmp_path / "bf16.gguf"
    convert(str(model), ConvertOptions(file_type="BF16", output=bf16))
    return model, _imatrix(bf16, tmp_path / "imatrix.gguf")


def _bpw(path: Path) -> float:
    r = gguf.GGUFReader(path)
    return 8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


def test_target_bpw_file_is_valid_reproducible_and_within_budget(model_and_imatrix, tmp_path):
    """The file meets the target, decodes identically with gguf-py and our kernels, loads in llama.cpp,
    its saved recipe reproduces it byte for byte through --config, and the thread count changes nothing."""
    from tests.helpers import llama_logits

    model, imx = model_and_imatrix
    out, recipe = tmp_path / "b.gguf", tmp_path / "recipe.yaml"
    convert(str(model), ConvertOptions(file_type="Q4_K_M", output=out, imatrix=imx, target_bpw=4.8,
                                       save_config=recipe, threads=1))
    assert _bpw(out) <= 4.8
    types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert len(types - {Q.F32}) >= 2, types  # a real mixture, not one type
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type not in (Q.F32, Q.F16, Q.BF16):
            ours = dequantize(np.asarray(t.data).reshape(-1, t.data.shape[-1]), t.tensor_type)
            assert np.array_equal(ours.reshape(-1), gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))
    logits = llama_logits(out, [1, 17, 400, 1021, 33])
    assert np.isfinite(logits).all()

    again = tmp_path / "again.gguf"
    convert(str(model), ConvertOptions(config=recipe, output=again, imatrix=imx, threads=2))
    assert again.read_bytes() == out.read_bytes()
    threads2 = tmp_path / "t2.gguf"
    convert(str(model), ConvertOptions(file_type="Q4_K_M", output=threads2, imatrix=imx, target_bpw=4.8,
                                       threads=2))
    assert threads2.read_bytes() == out.read_bytes()


def test_target_size_is_a_file_size_bound(model_and_imatrix, tmp_path):
    model, imx = model_and_imatrix
    ref = tmp_path / "ref.gguf"
    convert(str(model), ConvertOptions(file_type="Q4_K_M", output=ref, imatrix=imx))
    out = tmp_path / "sized.gguf"
    size = ref.stat().st_size
    convert(str(model), ConvertOptions(file_type="Q4_K_M", output=out, imatrix=imx, target_size=str(size)))
    assert out.stat().st_size <= size
    assert out.read_bytes() != ref.read_bytes()


@pytest.mark.parametrize("extra, message", [
    ([], "--imatrix"),
    (["--imatrix", "IMX", "--target-size", "1MB"], "not both"),
    (["--imatrix", "IMX", "--pure"], "--pure"),
    (["--imatrix", "IMX", "--target-bpw", "0.5"], "between 1 and 16"),
])
def test_bad_budget_options_are_one_line_errors(model_and_imatrix, tmp_path, capsys, extra, message):
    model, imx = model_and_imatrix
    out = tmp_path / "o.gguf"
    args = ["convert", str(model), "--target-bpw", "4.5", "-o", str(out)]
    if "--target-bpw" in extra:
        args = ["convert", str(model), "-o", str(out)]
    args += [str(imx) if a == "IMX" else a for a in extra]
    code, stdout, err = run_cli(capsys, *args)
    text = stdout + err
    assert code == 2, text
    assert message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not out.exists()


def test_a_budget_below_the_smallest_types_writes_nothing(model_and_imatrix, tmp_path, capsys):
    model, imx = model_and_imatrix
    out, recipe = tmp_path / "o.gguf", tmp_path / "r.yaml"
    code, stdout, err = run_cli(capsys, "convert", model, "--imatrix", imx, "--target-size", "10KB",
                                "-o", out, "--save-config", recipe)
    text = stdout + err
    assert code == 2, text
    assert "smallest types need" in text
    assert not out.exists() and not recipe.exists()
