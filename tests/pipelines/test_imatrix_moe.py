"""`qconvert imatrix` on Mixture-of-Experts checkpoints: per-expert Σx² and counts from the tokens the router
sends to each expert, in llama-imatrix's layout for expert tensors; checked against llama-imatrix on the
converter's BF16 GGUF, and fed to convert --imatrix against llama-quantize with the same file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from qconvert.formats.gguf.imatrix import read_imatrix
from qconvert.load import open_checkpoint
from qconvert.pipelines.convert import ConvertOptions, convert
from qconvert.pipelines.imatrix import compute_imatrix, write
from tests.helpers import assert_same_gguf
from tests.oracle.convert_hf import convert_hf_to_gguf
from tests.oracle.llamacpp import model_quantize
from tests.pipelines.test_convert_moe import MOE
from tests.pipelines.test_imatrix_run import _cos

CTX, CHUNKS = 128, 4
# qwen3_moe: 8 experts, top-2; qwen2_moe: shared expert and its gate; mixtral: the block_sparse_moe names
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral"]


def _llama_imatrix(bin_dir: Path, gguf_path: Path, text: Path, out: Path) -> None:
    cmd = [str(bin_dir / "llama-imatrix"), "-m", str(gguf_path), "-f", str(text), "-o", str(out),
           "-c", str(CTX), "--chunks", str(CHUNKS), "-t", "1", "-b", str(CTX * CHUNKS),
           "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_llama_imatrix(arch, llamacpp_bin, llamacpp_converter, synthetic_dir, calib_text, tmp_path):
    model = synthetic_dir(arch)
    bf16 = convert_hf_to_gguf(llamacpp_converter, model, tmp_path / "bf16.gguf", MOE[arch])
    # Routing is a discrete choice: llama.cpp's defaults (BF16 weights times bf16-rounded activations, an
    # F16 KV cache, flash attention) move the hidden states enough to flip the top-k of a few tokens whose
    # two best experts are nearly tied (1-3 of 1024 pairs here). The F32 GGUF holds the same weights (bf16 ->
    # f32 is exact); with an F32 cache and no flash attention llama.cpp computes in float32 as our float32
    # forward does, and every token goes to the same experts.
    f32 = convert_hf_to_gguf(llamacpp_converter, model, tmp_path / "f32.gguf", MOE[arch], outtype="f32")
    ref_path = tmp_path / "ref.gguf"
    _llama_imatrix(llamacpp_bin, f32, calib_text, ref_path)
    ref = read_imatrix(ref_path)

    run = compute_imatrix(open_checkpoint(model), str(calib_text), ctx_size=CTX, chunks=CHUNKS, device="cpu",
                          dtype="f32", threads=1, batch_tokens=CTX * CHUNKS, compute_ppl=False)
    ours = run.imatrix
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    assert set(ours.entries) == set(ref.entries)
    experts = [n for n in ref.entries if "_exps." in n]
    assert experts and all(ref.entries[n][1].size > 1 for n in experts)
    worst = 1.0
    for name, (ref_sums, ref_counts) in ref.entries.items():
        sums, counts = ours.entries[name]
        assert sums.shape == ref_sums.shape, name
        assert np.array_equal(counts, ref_counts), (name, counts, ref_counts)  # per expert: routed pairs
        seen = ref_counts > 0
        for j in np.flatnonzero(seen):
            worst = min(worst, _cos(sums[j] / counts[j], ref_sums[j] / ref_counts[j]))
    assert worst >= 0.999, f"lowest per-entry cosine similarity {worst:.6f}"

    # the file drives convert --imatrix exactly as it drives llama-quantize
    imx_path = write(tmp_path / "ours.imatrix.gguf", ours)
    out = tmp_path / "ours.gguf"
    convert(str(model), ConvertOptions(file_type="IQ2_XS", output=out, threads=1, imatrix=imx_path))
    back = read_imatrix(imx_path)
    kvs = {"quantize.imatrix.file": str(imx_path), "quantize.imatrix.dataset": str(calib_text),
           "quantize.imatrix.entries_count": len(back.entries),
           "quantize.imatrix.chunks_count": back.chunk_count}
    ref_q = tmp_path / "ref-q.gguf"
    model_quantize(bf16, ref_q, int(gguf.LlamaFileType.MOSTLY_IQ2_XS),
                   imatrix={n: back.weights(n) for n in back.entries}, kv_overrides=kvs)
    assert_same_gguf(out, ref_q)
