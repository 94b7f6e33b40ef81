"""`qconvert imatrix`: llama-imatrix's file, names and semantics; checked against llama.cpp itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from qconvert.cli.imatrix import imatrix_command
from qconvert.errors import BadInput
from qconvert.formats.gguf.imatrix import read_imatrix
from qconvert.load import open_checkpoint
from qconvert.pipelines.imatrix import combine, compute_imatrix, write

CHUNKS = 4  # one llama.cpp batch (n_seq = 4): keeps the test short


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_matches_llama_imatrix(
    llamacpp_bin: Path, smollm2_bf16_gguf: Path, smollm2_dir: Path, calib_text: Path, tmp_path: Path
) -> None:
    ref_path = tmp_path / "ref.gguf"
    proc = subprocess.run(
        [
            str(llamacpp_bin / "llama-imatrix"),
            "-m",
            str(smollm2_bf16_gguf),
            "-f",
            str(calib_text),
            "-o",
            str(ref_path),
            "-c",
            "512",
            "--chunks",
            str(CHUNKS),
            "-t",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = read_imatrix(ref_path)
    ref_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr).group(1))

    run = compute_imatrix(
        open_checkpoint(smollm2_dir), str(calib_text), ctx_size=512, chunks=CHUNKS, device="cpu", threads=2
    )
    ours = run.imatrix
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (
        ref.chunk_count,
        ref.chunk_size,
        ref.datasets,
    )
    assert set(ours.entries) == set(ref.entries) and len(ours.entries) == 30 * 7
    worst = 1.0
    for name, (ref_sums, ref_counts) in ref.entries.items():
        sums, counts = ours.entries[name]
        assert np.array_equal(counts, ref_counts), name  # counts = tokens, identical
        worst = min(worst, _cos(sums / counts[:, None], ref_sums / ref_counts[:, None]))
    assert worst >= 0.999, f"lowest per-entry cosine similarity {worst:.6f}"
    assert abs(run.ppl - ref_ppl) / ref_ppl < 0.02, (run.ppl, ref_ppl)


def test_names_output_entry_and_formats(synthetic_dir, calib_text: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(calib_text.read_text()[:12000])
    untied = open_checkpoint(synthetic_dir("llama", tied=False))
    run = compute_imatrix(
        untied, str(text), ctx_size=64, chunks=4, process_output=True, device="cpu", dtype="f32"
    )
    names = set(run.imatrix.entries)
    assert "output.weight" in names and "blk.0.attn_q.weight" in names and "blk.3.ffn_down.weight" in names
    assert all(n.startswith("blk.") or n == "output.weight" for n in names)
    assert all(c.tolist() == [4 * 64] for _, c in run.imatrix.entries.values())
    assert run.imatrix.entries["blk.0.ffn_down.weight"][0].shape == (
        1,
        int(untied.config["intermediate_size"]),
    )
    # a tied lm_head reuses token_embd: llama-imatrix collects nothing for it
    tied = compute_imatrix(
        open_checkpoint(synthetic_dir("llama")),
        str(text),
        ctx_size=64,
        chunks=4,
        process_output=True,
        device="cpu",
        compute_ppl=False,
    )
    assert "output.weight" not in tied.imatrix.entries and tied.notes and tied.ppl is None
    # phi3 keeps its fused projections
    phi = compute_imatrix(
        open_checkpoint(synthetic_dir("phi3")), str(text), ctx_size=64, chunks=2, device="cpu"
    )
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= set(
        phi.imatrix.entries
    )

    g = write(tmp_path / "a.gguf", run.imatrix)
    d = write(tmp_path / "a.dat", run.imatrix, "dat")
    back_g, back_d = read_imatrix(g), read_imatrix(d)
    for name, (sums, counts) in run.imatrix.entries.items():
        assert np.array_equal(back_g.entries[name][0], sums)
        np.testing.assert_allclose(back_d.weights(name), (sums / counts[:, None]).ravel(), rtol=1e-6)
    merged = combine(None, [str(g), str(g)], 64)  # --in-file a,a: sums and counts add up
    assert merged.chunk_count == 8
    for name, (sums, counts) in run.imatrix.entries.items():
        assert np.array_equal(merged.entries[name][1], 2 * counts)
        np.testing.assert_allclose(merged.entries[name][0], 2 * sums, rtol=1e-6)


def test_too_short_text(synthetic_dir, tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("Only a few words here.")
    with pytest.raises(BadInput, match=r"at least 1024 tokens are needed \(2 chunks of 512 tokens\)"):
        compute_imatrix(open_checkpoint(synthetic_dir("llama")), str(f), device="cpu")


def test_cli_merge_and_errors(synthetic_dir, calib_text: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(imatrix_command)
    text = tmp_path / "t.txt"
    text.write_text(calib_text.read_text()[:8000])
    model = str(synthetic_dir("qwen2"))
    first = tmp_path / "one.gguf"
    res = CliRunner().invoke(
        app,
        [model, "-f", str(text), "-o", str(first), "-c", "64", "--chunks", "2", "--dtype", "f32", "-t", "2"],
    )
    assert res.exit_code == 0, res.output
    assert "2 chunks of 64 tokens" in res.output and first.is_file()
    dat = tmp_path / "conv.dat"
    res = CliRunner().invoke(
        app, ["--in-file", str(first), "-o", str(dat), "--output-format", "dat", "-c", "64"]
    )
    assert res.exit_code == 0, res.output
    assert read_imatrix(dat).legacy and set(read_imatrix(dat).entries) == set(read_imatrix(first).entries)
    res = CliRunner().invoke(app, ["-o", str(tmp_path / "x.gguf")])
    assert isinstance(res.exception, BadInput) and "--in-file" in str(res.exception)
    # refused before the pass (after it, the write would fail as IOFailure "cannot write imatrix")
    for bad, needle in [(tmp_path, "output path is a directory"), (tmp_path / "no" / "x.gguf", "not exist")]:
        res = CliRunner().invoke(app, [model, "-f", str(text), "-o", str(bad), "-c", "64", "--chunks", "2"])
        assert isinstance(res.exception, BadInput) and needle in str(res.exception), res.output
