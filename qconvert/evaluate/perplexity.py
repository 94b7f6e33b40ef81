"""Perplexity exactly as llama-perplexity computes it (tools/perplexity/perplexity.cpp, ``perplexity()``).

* The whole text is tokenized once, BOS first if the vocab adds BOS (``common_tokenize(text, true)``); one
  trailing newline of the file is dropped, as llama.cpp's ``-f`` does.
* At least ``2*ctx`` tokens are required; the stream is cut into ``len // ctx`` chunks (``--chunks`` caps it).
* If the vocab adds BOS, the first token of every chunk is replaced by BOS.
* Only the second half is scored: logits at positions ``first = ctx//2 .. ctx-2`` predict tokens
  ``first+1 .. ctx-1`` (``ctx - first - 1`` tokens per chunk).
* ``nll`` and ``nll²`` are summed in double; PPL = exp(mean nll) and its error is
  ``ppl * sqrt((mean(nll²) - mean(nll)²) / (count - 1))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qconvert.errors import BadInput


def make_chunks(tokens: list[int], ctx: int, n_chunks: int | None, add_bos: bool, bos_id: int | None,
                source: object = None) -> np.ndarray:
    """int32 [n, ctx]: the chunks as evaluated (BOS substituted). Too short a text is a BadInput."""
    if len(tokens) < 2 * ctx:
        raise BadInput(f"the text tokenizes to only {len(tokens)} tokens; --ctx-size {ctx} needs at least "
                       f"{2 * ctx} (two chunks)", source)
    n_max = len(tokens) // ctx
    n = n_max if not n_chunks or n_chunks < 0 else min(n_chunks, n_max)
    chunks = np.asarray(tokens[: n * ctx], dtype=np.int32).reshape(n, ctx).copy()
    if add_bos and bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def first_scored(ctx: int) -> int:
    return ctx // 2


def score_rows(logits: torch.Tensor, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the scored rows and their target tokens for one chunk.

    logits: float32 [ctx - first, n_vocab] for positions first .. ctx-1 (the last row is not scored).
    Returns (logprobs float32 [ctx-first-1, n_vocab], targets int64 [ctx-first-1]).
    """
    first = first_scored(len(chunk))
    rows = logits[: len(chunk) - first - 1].float()
    targets = torch.from_numpy(chunk[first + 1:].astype(np.int64))
    return torch.log_softmax(rows, dim=-1), targets


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """float64 [rows]: -log p(target)."""
    return -logprobs.gather(-1, targets[:, None])[:, 0].double().numpy()


@dataclass
class NllStats:
    """Running sums of llama-perplexity: nll, nll² (double) and the token count."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())
        self.count += int(v.size)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count) if self.count else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of the PPL estimate, as llama-perplexity's 'PPL = x +/- y'."""
        if self.count < 2:
            return math.nan
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.perplexity * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0
