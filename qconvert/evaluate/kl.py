"""KL divergence of a model's next-token distribution from a reference's, and the reference logits file.

KL is KL(P_ref ‖ Q_model) = Σ_i p_i (log p_i − log q_i) per scored token (llama-perplexity's direction),
reported as mean and 99th percentile (linear interpolation, like llama-perplexity's ``percentile``), with
top-1 agreement (reference argmax == model argmax, llama-perplexity's "Same top p").

Reference distributions are streamed to a logits file (``--save-logits``; a temporary one otherwise), so a
long text never holds more than one chunk of distributions in memory. The file is plain safetensors, written
incrementally through a memory map (the header is known up front) and read back the same way:

    tokens     int32   [n_chunks, ctx]         chunks as evaluated (BOS substituted); a candidate must match
    nll        float32 [n_chunks, s]           reference -log p(target), s = ctx - ctx/2 - 1 scored tokens
    top1       int32   [n_chunks, s]           reference argmax (from float32 logits)
    logprobs   float16 [n_chunks, s, k]        log-softmax; k = n_vocab (full, the default) or the top-k
    ids        int32   [n_chunks, s, k]        token ids of the top-k (top-k files only), descending
    tail       float32 [n_chunks, s]           log of the mass outside the top-k (top-k files only)
    __metadata__: format "qconvert-logits", version "1", ctx_size, n_vocab, top_k (0 = full), source, backend

Size per 512-token chunk: 255 × n_vocab × 2 bytes (49k vocab: 25 MB; llama-perplexity's kld file is the same
order), or 255 × k × 6 bytes with ``--kl-top-k k``.

Log-probabilities are stored in float16 and the candidate's are rounded the same way before comparing, so a
model against itself gives exactly 0 and the rounding adds nothing measurable (|Δ log p| ≤ 2⁻¹¹|log p|).
With top-k, everything outside the reference's top-k is one "tail" event of mass 1 − Σ top-k:
``KL_k = Σ_top-k p (log p − log q) + P_tail log(P_tail / Q_tail)``, a lower bound (merging events never
increases KL). It is noticeably low — measured on SmolLM2-135M Q4_K_M vs BF16: top-256 −9 %, top-1024 −3 % —
so the default keeps the full distribution.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qconvert.errors import BadInput, IOFailure
from qconvert.formats.output import AtomicFile, atomic_file
from qconvert.load.dtypes import name_of_numpy, numpy_values

FORMAT = "qconvert-logits"
VERSION = "1"
DEFAULT_TOP_K = 0  # full distribution


def scored_per_chunk(ctx: int) -> int:
    return ctx - ctx // 2 - 1


def _layout(n: int, ctx: int, n_vocab: int, top_k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    s = scored_per_chunk(ctx)
    k = n_vocab if top_k == 0 else min(top_k, n_vocab)
    out = {"tokens": (np.dtype(np.int32), (n, ctx)), "nll": (np.dtype(np.float32), (n, s)),
           "top1": (np.dtype(np.int32), (n, s)), "logprobs": (np.dtype(np.float16), (n, s, k))}
    if top_k:
        out["ids"] = (np.dtype(np.int32), (n, s, k))
        out["tail"] = (np.dtype(np.float32), (n, s))
    return out


@dataclass
class RefLogits:
    """A reference logits file, open for writing (``create``) or reading (``load_logits``)."""

    path: Path
    ctx: int
    n_vocab: int
    top_k: int  # 0 = full distribution
    source: str = ""
    backend: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # memory maps
    _pending: AtomicFile | None = None  # while writing: the temp file `path` is, to be renamed by finish

    @property
    def n_chunks(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @property
    def full(self) -> bool:
        return self.top_k == 0

    @classmethod
    def create(cls, path: str | Path, n_chunks: int, ctx: int, n_vocab: int, top_k: int, source: str = "",
               backend: str = "") -> RefLogits:
        """Preallocate the file (a temp name next to `path`) and map its tensors for filling."""
        out = atomic_file(path, "logits file")
        tmp = out.tmp
        layout = _layout(n_chunks, ctx, n_vocab, top_k)
        meta = {"format": FORMAT, "version": VERSION, "ctx_size": str(ctx), "n_vocab": str(n_vocab),
                "top_k": str(top_k), "source": source, "backend": backend}
        header: dict = {"__metadata__": meta}
        offset = 0
        for name, (dt, shape) in layout.items():
            size = int(np.prod(shape)) * dt.itemsize
            header[name] = {"dtype": name_of_numpy(dt), "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        base = 8 + len(raw)
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(base + offset)
        except OSError as e:
            raise out.fail(e) from e
        ref = cls(tmp, ctx, n_vocab, top_k, source, backend, _pending=out)
        ref.arrays = {name: np.memmap(tmp, dtype=dt, mode="r+", offset=base + header[name]["data_offsets"][0],
                                      shape=shape) for name, (dt, shape) in layout.items()}
        return ref

    def put(self, i: int, chunk: np.ndarray, logprobs: torch.Tensor, nll: np.ndarray) -> None:
        """Store chunk i from its scored log-softmax rows float32 [s, n_vocab]."""
        a = self.arrays
        a["tokens"][i] = chunk
        a["nll"][i] = nll
        a["top1"][i] = logprobs.argmax(-1).numpy()
        if self.full:
            a["logprobs"][i] = logprobs.numpy()
        else:
            vals, idx = torch.topk(logprobs, a["ids"].shape[-1], dim=-1, sorted=True)
            a["logprobs"][i] = vals.numpy()
            a["ids"][i] = idx.numpy()
            a["tail"][i] = _tail_logmass(logprobs, idx).numpy()

    def finish(self) -> None:
        """Flush and move the finished file into place (atomic)."""
        for arr in self.arrays.values():
            arr.flush()
        if self._pending is not None:
            try:
                self._pending.commit()
            except IOFailure:
                self.arrays = {}
                raise
            self.path, self._pending = self._pending.target, None

    def discard(self) -> None:
        self.arrays = {}
        self.path.unlink(missing_ok=True)


def _tail_logmass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ p over the tokens not in `ids` (a logsumexp, so no 1 − Σ cancellation); -inf if none."""
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def kl_rows(ref: RefLogits, i: int, logprobs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL(ref ‖ model) float64 [s] and top-1 agreement bool [s] for chunk i."""
    lq = logprobs.half().double()  # rounded exactly as the reference was stored
    lp = torch.from_numpy(np.array(ref.arrays["logprobs"][i])).double()
    p = lp.exp()
    if ref.full:
        kl = (p * (lp - lq)).sum(-1)
    else:
        ids = torch.from_numpy(np.array(ref.arrays["ids"][i])).long()
        kl = (p * (lp - lq.gather(-1, ids))).sum(-1)
        lp_tail = torch.from_numpy(np.array(ref.arrays["tail"][i])).double()
        lq_tail = _tail_logmass(logprobs, ids).double()
        tail = lp_tail.exp() * (lp_tail - lq_tail)
        kl = kl + torch.where(torch.isfinite(lp_tail), tail, 0.0)
    agree = logprobs.argmax(-1).numpy() == np.asarray(ref.arrays["top1"][i])
    return kl.numpy(), agree


@dataclass
class KlStats:
    values: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    count: int = 0

    def add(self, kl: np.ndarray, agree: np.ndarray) -> None:
        self.values.append(np.asarray(kl, np.float64))
        self.agree += int(np.count_nonzero(agree))
        self.count += int(agree.size)

    def summary(self) -> dict[str, float]:
        v = np.concatenate(self.values) if self.values else np.full(1, np.nan)
        return {"mean": float(v.mean()), "p99": float(np.percentile(v, 99.0)), "median": float(np.median(v)),
                "max": float(v.max())}

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.count if self.count else float("nan")


# ------------------------------------------------------------------------------------------------------------
# reading


def _header(path: Path) -> tuple[dict, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput("not a qconvert logits file (too short)", path)
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 1 << 24):
                raise BadInput("not a qconvert logits file (bad safetensors header)", path)
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput("not a qconvert logits file (unreadable header)", path) from None
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path) from None
    if not isinstance(header, dict):
        raise BadInput("not a qconvert logits file (unreadable header)", path)
    return header, 8 + n


def load_logits(path: str | Path) -> RefLogits:
    """Open a logits file for reading (memory-mapped); every shape is checked against its metadata."""
    path = Path(path)
    if not path.exists():
        raise BadInput("logits file not found", path)
    if not path.is_file():
        raise BadInput("not a file", path)
    header, base = _header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise BadInput(f"not a qconvert logits file (format {meta.get('format')!r})", path)
    if meta.get("version") != VERSION:
        raise BadInput(f"logits file version {meta.get('version')!r} is not supported (expected {VERSION})",
                       path)
    try:
        ctx, n_vocab, top_k = int(meta["ctx_size"]), int(meta["n_vocab"]), int(meta["top_k"])
        n = int(header["tokens"]["shape"][0])
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise BadInput(f"logits file metadata is incomplete ({e})", path) from None
    if n < 1:
        raise BadInput("logits file holds no chunks", path)
    ref = RefLogits(path, ctx, n_vocab, top_k, meta.get("source", ""), meta.get("backend", ""))
    size = path.stat().st_size
    for name, (dt, shape) in _layout(n, ctx, n_vocab, top_k).items():
        info = header.get(name)
        if not isinstance(info, dict):
            raise BadInput(f"logits file lacks tensor {name!r}", path)
        begin, end = info.get("data_offsets", [0, 0])
        if tuple(info.get("shape", ())) != shape or numpy_values(info.get("dtype")) != dt:
            raise BadInput(f"logits file tensor {name!r} is {info.get('dtype')} {info.get('shape')}, "
                           f"expected {name_of_numpy(dt)} {list(shape)}", path)
        if end - begin != int(np.prod(shape)) * dt.itemsize or base + end > size:
            raise BadInput(f"logits file tensor {name!r} runs past the end of the file (truncated?)", path)
        ref.arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=base + begin, shape=shape)
    return ref
