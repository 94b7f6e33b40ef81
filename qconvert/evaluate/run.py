"""`qconvert eval` without the CLI: perplexity of MODEL, and with a reference (a model or a logits file)
KL divergence, top-1 agreement and the reference's perplexity.

Order of work, cheapest checks first: read the text, open both models' vocabularies, tokenize with each,
refuse a vocabulary or token-stream mismatch, then run the reference (its compact logits kept in memory or
saved), free it, then run MODEL. Only one model's weights are in memory at a time.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qconvert.calib.datasets import read_text
from qconvert.errors import BadInput
from qconvert.evaluate.backends import Backend, check_ctx, open_backend
from qconvert.evaluate.kl import DEFAULT_TOP_K, KlStats, RefLogits, kl_rows, load_logits
from qconvert.evaluate.perplexity import NllStats, first_scored, make_chunks, score_rows, token_nll

# progress(label, total) -> advance(n): the CLI draws a bar, the library default draws nothing
Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class EvalResult:
    model: str
    backend: str
    ctx_size: int
    chunks: int
    tokens: int  # scored tokens
    perplexity: float
    perplexity_stderr: float
    reference: str | None = None
    reference_perplexity: float | None = None
    reference_perplexity_stderr: float | None = None
    kl_divergence: dict[str, float] | None = None
    top1_agreement: float | None = None
    kl_top_k: int | None = None
    saved_logits: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


def _label(b: Backend) -> str:
    return f"{b.path} ({b.kind})"


def _check_vocab(model: Backend, n_vocab: int, ref_name: str) -> None:
    if model.n_vocab != n_vocab:
        raise BadInput(f"vocabulary mismatch: {model.path} has {model.n_vocab} tokens, the reference "
                       f"{ref_name} has {n_vocab}; KL divergence needs the same vocabulary")


def _check_tokens(model: Backend, chunks: np.ndarray, ref_chunks: np.ndarray, ref_name: str) -> None:
    if chunks.shape[1] != ref_chunks.shape[1]:
        raise BadInput(f"context size mismatch: {chunks.shape[1]} here, {ref_chunks.shape[1]} in the "
                       f"reference {ref_name}")
    n = chunks.shape[0]
    if ref_chunks.shape[0] < n:
        raise BadInput(f"the reference {ref_name} holds {ref_chunks.shape[0]} chunks, {n} were asked for "
                       f"(--chunks {ref_chunks.shape[0]} or fewer)")
    diff = np.flatnonzero(chunks.reshape(-1) != ref_chunks[:n].reshape(-1))
    if diff.size:
        i = int(diff[0])
        raise BadInput(f"token streams differ: {model.path} ({model.kind} tokenizer) and the reference "
                       f"{ref_name} disagree at token {i} ({int(chunks.reshape(-1)[i])} vs "
                       f"{int(ref_chunks.reshape(-1)[i])}); KL divergence needs identical tokens")


def _tokens(b: Backend, text: str, ctx: int, n_chunks: int | None, dataset: Path) -> np.ndarray:
    return make_chunks(b.tokenize(text), ctx, n_chunks, b.add_bos, b.bos_id, dataset)


def _run(b: Backend, chunks: np.ndarray, progress: Progress, label: str, ref: RefLogits | None = None,
         record: RefLogits | None = None) -> tuple[NllStats, KlStats]:
    """Evaluate every chunk: NLL stats, KL against `ref`, and/or store the distributions into `record`."""
    ctx = chunks.shape[1]
    first = first_scored(ctx)
    per_call = b.seqs_per_call(ctx)
    nll, kls = NllStats(), KlStats()
    b.load()
    advance = progress(label, chunks.shape[0])
    for start in range(0, chunks.shape[0], per_call):
        batch = chunks[start:start + per_call]
        logits = b.logits(batch, first)
        for j, chunk in enumerate(batch):
            lp, targets = score_rows(logits[j], chunk)
            values = token_nll(lp, targets)
            nll.add(values)
            if ref is not None:
                kls.add(*kl_rows(ref, start + j, lp))
            if record is not None:
                record.put(start + j, chunk, lp, values)
            advance(1)
        del logits
    return nll, kls


def cache_dir() -> Path:
    return Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert")


def _new_record(save_to: str | Path | None, b: Backend, chunks: np.ndarray, top_k: int) -> RefLogits:
    """The file the reference distributions stream into: --save-logits, or a temporary one in the cache."""
    if save_to is None:
        tmp = cache_dir() / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_to = tmp / f"ref-logits-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    return RefLogits.create(save_to, chunks.shape[0], chunks.shape[1], b.n_vocab, top_k, source=str(b.path),
                            backend=b.kind)


def evaluate(model: str | Path, dataset: str | Path, *, reference: str | Path | None = None,
             logits: str | Path | None = None, save_logits_to: str | Path | None = None, ctx: int = 512,
             chunks: int | None = None, top_k: int = DEFAULT_TOP_K, loader: str = "auto",
             threads: int | None = None, progress: Progress = _no_progress) -> EvalResult:
    """Perplexity of `model`; with `reference` (a model) or `logits` (a saved logits file) also KL divergence.

    `save_logits_to` keeps the reference's distributions (MODEL's own when there is no reference), so later
    candidates can be compared with `logits=` without re-running the reference.
    """
    check_ctx(ctx)
    if reference is not None and logits is not None:
        raise BadInput("give either --reference or --logits, not both")
    if logits is not None and save_logits_to is not None:
        raise BadInput("--save-logits needs --reference or no reference at all, not --logits")
    if top_k < 0:
        raise BadInput(f"--kl-top-k must be >= 0 (0 = full distribution), got {top_k}")
    if chunks is not None and chunks < 1:
        raise BadInput(f"--chunks must be >= 1, got {chunks}")
    dataset = Path(dataset)
    text = read_text(dataset)
    stored = load_logits(logits) if logits is not None else None
    if stored is not None and stored.ctx != ctx:
        raise BadInput(f"the logits file was made with --ctx-size {stored.ctx}, not {ctx}", logits)
    if stored is not None and chunks is None:
        chunks = stored.n_chunks

    with contextlib.ExitStack() as stack:
        ref_b = None
        if reference is not None:
            ref_b = open_backend(reference, ctx, loader=loader, threads=threads)
            stack.callback(ref_b.close)
        model_b = open_backend(model, ctx, loader=loader, threads=threads)
        stack.callback(model_b.close)
        return _evaluate(model_b, ref_b, stored, text, dataset, ctx, chunks, top_k, save_logits_to, progress)


def _evaluate(model_b: Backend, ref_b: Backend | None, stored: RefLogits | None, text: str, dataset: Path,
              ctx: int, chunks: int | None, top_k: int, save_to, progress: Progress) -> EvalResult:
    model_chunks = _tokens(model_b, text, ctx, chunks, dataset)
    ref, ref_nll = stored, None
    if ref_b is not None:
        _check_vocab(model_b, ref_b.n_vocab, str(ref_b.path))
        ref_chunks = _tokens(ref_b, text, ctx, chunks, dataset)
        _check_tokens(model_b, model_chunks, ref_chunks, str(ref_b.path))
        ref = _new_record(save_to, ref_b, ref_chunks, top_k)
        try:
            ref_nll, _ = _run(ref_b, ref_chunks, progress, "reference", record=ref)
            ref.finish()
            ref_b.close()  # free its weights before MODEL loads
            return _score_model(model_b, model_chunks, ref, ref_nll, _label(ref_b), save_to, progress)
        finally:
            if save_to is None or ref._pending is not None:  # temporary, or never finished
                ref.discard()
    if stored is not None:
        _check_vocab(model_b, stored.n_vocab, str(stored.path))
        _check_tokens(model_b, model_chunks, np.asarray(stored.arrays["tokens"]), str(stored.path))
        ref_nll = NllStats()
        for values in stored.arrays["nll"][: model_chunks.shape[0]]:
            ref_nll.add(values)
        label = f"{stored.path} (logits of {stored.source}, {stored.backend})"
        return _score_model(model_b, model_chunks, stored, ref_nll, label, None, progress)
    record = _new_record(save_to, model_b, model_chunks, top_k) if save_to is not None else None
    try:
        nll, _ = _run(model_b, model_chunks, progress, "model", record=record)
        if record is not None:
            record.finish()
    except BaseException:
        if record is not None:
            record.discard()
        raise
    return _result(model_b, model_chunks, nll, save_to)


def _result(model_b: Backend, chunks: np.ndarray, nll: NllStats, save_to) -> EvalResult:
    return EvalResult(model=_label(model_b), backend=model_b.kind, ctx_size=int(chunks.shape[1]),
                      chunks=int(chunks.shape[0]), tokens=nll.count, perplexity=nll.perplexity,
                      perplexity_stderr=nll.stderr,
                      saved_logits=str(save_to) if save_to is not None else None)


def _score_model(model_b: Backend, chunks: np.ndarray, ref: RefLogits, ref_nll: NllStats, ref_label: str,
                 save_to, progress: Progress) -> EvalResult:
    nll, kls = _run(model_b, chunks, progress, "model", ref=ref)
    result = _result(model_b, chunks, nll, save_to)
    result.reference = ref_label
    result.reference_perplexity = ref_nll.perplexity
    result.reference_perplexity_stderr = ref_nll.stderr
    result.kl_divergence = kls.summary()
    result.top1_agreement = kls.top1_agreement
    result.kl_top_k = ref.top_k
    return result
