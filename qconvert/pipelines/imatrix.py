"""`qconvert imatrix`: llama.cpp-compatible importance matrices, collected by the layer-sequential engine.

Semantics of llama-imatrix (reference/gguf.md §4.2), followed exactly:
* the text is tokenized once (BOS in front if the vocabulary adds BOS) and cut into ctx_size chunks; the first
  token of every chunk is replaced by BOS (if the vocabulary adds BOS); at least 2*ctx_size tokens are needed;
  `from_chunk` drops whole chunks first, `chunks` caps their number;
* per matmul input x: Σx² per input channel (float32), counts = tokens; only `blk.*` weights, plus
  `output.weight` with process_output (only if the GGUF has one: a tied lm_head reuses token_embd, which
  llama-imatrix never collects);
* chunks are evaluated n_seq = max(1, 2048 // ctx_size) at a time; perplexity on the second half of each
  chunk;
* entry names are the GGUF tensor names `convert --to gguf` writes; chunk_size = ctx_size,
  chunk_count = chunks processed; `--in-file` inputs are merged first (llama-imatrix --in-file).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qconvert.arch.tensors import expert_slot, gguf_tensor_name, input_order, writes_output_tensor
from qconvert.calib.datasets import load_calibration, load_tokenizer
from qconvert.calib.runner import LayerwiseRunner, Progress
from qconvert.calib.stats import LinearStats
from qconvert.errors import BadInput
from qconvert.formats.gguf.imatrix import (
    Imatrix,
    merge_imatrices,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from qconvert.load.config import text_config

DEFAULT_CTX = 512
N_BATCH = 2048  # llama-imatrix's default logical batch (-b): n_seq = n_batch / n_ctx chunks per pass
OUTPUT_FORMATS = ("gguf", "dat")


@dataclass
class ImatrixRun:
    imatrix: Imatrix
    chunks: int  # chunks computed from the dataset (0 when only merging)
    tokens: int  # tokens that went through the model
    ppl: float | None  # final perplexity estimate (second half of each chunk), None if not computed
    notes: list[str]


OnPpl = Callable[[int, float], None]  # (chunks scored so far, running perplexity)


def compute_imatrix(
    ckpt,
    dataset: str,
    *,
    ctx_size: int = DEFAULT_CTX,
    chunks: int | None = None,
    from_chunk: int = 0,
    process_output: bool = False,
    compute_ppl: bool = True,
    parse_special: bool = False,
    device: str | None = "auto",
    dtype: str = "bf16",
    threads: int | None = None,
    batch_tokens: int = N_BATCH,
    progress: Progress | None = None,
    on_ppl: OnPpl | None = None,
) -> ImatrixRun:
    """Collect an importance matrix over `dataset` (see the module docstring for the exact semantics)."""
    if ctx_size < 16:
        raise BadInput(
            f"--ctx-size must be at least 16 (llama-imatrix ignores smaller batches), got {ctx_size}"
        )
    if chunks is not None and chunks < 1:
        raise BadInput(f"--chunks must be positive, got {chunks}")
    from qconvert.formats.packed.dense import dense_source

    ckpt = dense_source(ckpt)  # a quantized source runs as its dequantized checkpoint
    tok = load_tokenizer(ckpt)
    data = load_calibration(
        dataset,
        tok,
        seq_len=ctx_size,
        num_samples=chunks,
        parse_special=parse_special,
        min_tokens=2 * ctx_size,
        shuffle_chunks=False,
        skip_chunks=from_chunk,
    )
    notes: list[str] = []
    want_output = process_output and writes_output_tensor(ckpt.config, ckpt.tensors)
    if process_output and not want_output:
        notes.append(
            "the model has no separate output.weight (tied embeddings): no output entry, as in llama.cpp"
        )
    scorer = _PplScorer(ckpt.config, ctx_size, on_ppl) if compute_ppl else None
    runner = LayerwiseRunner(
        ckpt, device=device, dtype=dtype, threads=threads, batch_size=max(1, batch_tokens // ctx_size)
    )
    stats = runner.run(
        data.tokens,
        kinds=("sq_sum",),
        lm_head_stats=want_output,
        on_final=scorer if scorer is not None else None,
        progress=progress,
    )
    entries = _entries(ckpt.config, stats)
    imat = Imatrix(entries, [dataset], data.num_samples, ctx_size)
    return ImatrixRun(
        imat, data.num_samples, int(data.tokens.numel()), scorer.ppl() if scorer else None, notes
    )


def combine(computed: Imatrix | None, in_files: Sequence[str | Path], ctx_size: int = DEFAULT_CTX) -> Imatrix:
    """llama-imatrix --in-file: the inputs (GGUF or legacy .dat) summed, then the freshly computed data."""
    mats = [read_imatrix(p) for p in in_files]
    if computed is not None:
        mats.append(computed)
    if not mats:
        raise BadInput("nothing to do: give --dataset and/or --in-file")
    if len(mats) == 1 and not mats[0].legacy and computed is not None:
        return computed
    return merge_imatrices(mats, chunk_size=ctx_size)


def write(path: str | Path, imat: Imatrix, output_format: str = "gguf") -> Path:
    if output_format not in OUTPUT_FORMATS:
        raise BadInput(f"unknown --output-format '{output_format}' (use gguf or dat)")
    (write_imatrix_gguf if output_format == "gguf" else write_imatrix_dat)(path, imat)
    return Path(path)


# -- helpers ---------------------------------------------------------------------------------------------


def _entries(config: dict, stats: dict[str, LinearStats]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    experts: dict[str, list[tuple[int, LinearStats]]] = {}
    n_exp: dict[str, int] = {}
    for hf_module, st in stats.items():
        slot = expert_slot(config, hf_module)
        if slot is not None:  # one expert's slice of a stacked ffn_*_exps tensor
            name, x, n = slot
            experts.setdefault(name, []).append((x, st))
            n_exp[name] = n
            continue
        name = gguf_tensor_name(config, f"{hf_module}.weight")
        if name is None:
            raise BadInput(f"linear layer {hf_module} has no GGUF tensor name")
        if not (name.startswith("blk.") or name == "output.weight"):
            continue
        sums = _sums(name, hf_module, st)
        if (order := input_order(config, f"{hf_module}.weight")) is not None:
            sums = sums[order]  # the GGUF tensor's column order (the converter reordered the inputs)
        out[name] = (sums.reshape(1, -1), np.array([st.count], dtype=np.float32))
    for name, parts in experts.items():
        out[name] = _expert_entry(name, parts, n_exp[name])
    return out


def _sums(name: str, hf_module: str, st: LinearStats) -> np.ndarray:
    sums = st.sq_sum.detach().to("cpu", torch.float32).numpy().copy() if st.sq_sum is not None else None
    if sums is None:
        return np.zeros(st.in_features, dtype=np.float32)
    if not np.isfinite(sums).all():
        raise BadInput(f"non-finite activations in {name}: the model overflows in {hf_module}")
    return sums.reshape(-1)


def _expert_entry(name: str, parts: list[tuple[int, LinearStats]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """llama-imatrix's layout for a MUL_MAT_ID weight: in_sum2 [n_expert, row], counts [n_expert] = the
    (token, expert) pairs the router chose; an expert no token reached keeps zeros (written, not dropped)."""
    width = parts[0][1].in_features
    sums = np.zeros((n, width), dtype=np.float32)
    counts = np.zeros(n, dtype=np.float32)
    for x, st in parts:
        sums[x] = _sums(name, f"expert {x}", st)
        counts[x] = st.count
    return sums, counts


class _PplScorer:
    """Running perplexity over the second half of each chunk (llama-imatrix's estimate)."""

    def __init__(self, config: dict, ctx_size: int, on_ppl: OnPpl | None):
        cfg = text_config(config)
        self.softcap = cfg.get("final_logit_softcapping")
        self.first = ctx_size // 2
        self.ctx = ctx_size
        self.on_ppl = on_ppl
        self.nll = 0.0
        self.count = 0
        self.chunks = 0

    def __call__(self, _b: int, normed: torch.Tensor, tokens: torch.Tensor, lm_head) -> None:
        for row in range(normed.shape[0]):  # one chunk at a time: bounded memory, printed like llama.cpp
            logits = lm_head(normed[row, self.first : self.ctx - 1]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            target = tokens[row, self.first + 1 : self.ctx].to(logits.device)
            picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            self.nll += float((torch.logsumexp(logits, dim=-1) - picked).double().sum())
            self.count += self.ctx - 1 - self.first
            self.chunks += 1
            if self.on_ppl is not None:
                self.on_ppl(self.chunks, self.ppl())

    def ppl(self) -> float | None:
        return math.exp(self.nll / self.count) if self.count else None
