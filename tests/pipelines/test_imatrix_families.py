"""`qconvert imatrix` on the 2026 families: hybrid stacks (LFM2: short-convolution layers beside attention;
Falcon-H1: a Mamba-2 mixer beside attention in every layer), whose mixer projections are matmuls
llama-imatrix collects too, and a dense one (SmolLM3: NoPE layers).
Checked against llama-imatrix on the converter's F32 GGUF of the same synthetic checkpoint: the same entries,
identical counts, cosine >= 0.999."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.formats.gguf.imatrix import read_imatrix
from qconvert.load import open_checkpoint
from qconvert.pipelines.imatrix import compute_imatrix
from tests.pipelines.test_convert_families import converter_gguf
from tests.pipelines.test_imatrix_moe import CHUNKS, CTX, _llama_imatrix
from tests.pipelines.test_imatrix_run import _cos

# the entries of each family's non-attention mixers: LFM2's short-conv projections on its conv layers,
# Falcon-H1's Mamba-2 in/out projections on every layer
MIXER = {"lfm2": {f"blk.{i}.shortconv.{p}.weight" for i in (0, 2) for p in ("in_proj", "out_proj")},
         "falcon_h1": {f"blk.{i}.ssm_{p}.weight" for i in range(4) for p in ("in", "out")},
         "qwen3_5": {f"blk.{i}.ssm_{p}.weight" for i in range(3) for p in ("alpha", "beta", "out")},
         "smollm3": set()}


@pytest.mark.parametrize("family", sorted(MIXER))
def test_matches_llama_imatrix(family, llamacpp_bin, llamacpp_converter, fixtures_lib, calib_text, tmp_path):
    model = fixtures_lib.synthetic_dir(family)
    f32 = converter_gguf(llamacpp_converter, fixtures_lib, family, tmp_path / "f32.gguf", "f32")
    ref_path = tmp_path / "ref.gguf"
    _llama_imatrix(llamacpp_bin, f32, calib_text, ref_path)
    ref = read_imatrix(ref_path)

    ours = compute_imatrix(open_checkpoint(model), str(calib_text), ctx_size=CTX, chunks=CHUNKS, device="cpu",
                           dtype="f32", threads=1, batch_tokens=CTX * CHUNKS, compute_ppl=False).imatrix
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    assert set(ours.entries) == set(ref.entries)
    assert {n for n in ref.entries if ".shortconv." in n or ".ssm_" in n} == MIXER[family]
    worst = 1.0
    for name, (ref_sums, ref_counts) in ref.entries.items():
        sums, counts = ours.entries[name]
        assert sums.shape == ref_sums.shape, name
        assert np.array_equal(counts, ref_counts), (name, counts, ref_counts)
        worst = min(worst, _cos(sums[0] / counts[0], ref_sums[0] / ref_counts[0]))
    assert worst >= 0.999, f"lowest per-entry cosine similarity {worst:.6f}"
