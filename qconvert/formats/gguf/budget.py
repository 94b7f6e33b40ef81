"""Per-tensor GGUF types chosen to a size budget (`convert --target-bpw 4.5`, `--target-size 2.1GB`).

llama-quantize's file types are fixed recipes: every model of an architecture gets the same mixture. Here
each quantizable tensor gets the type that buys the most accuracy per byte, measured on this model:

1. measure: every candidate type (those whose blocks fit the rows, never a fallback) quantizes a fixed,
   evenly spaced sample of the tensor's rows with the real kernels and the imatrix, as the file would hold
   them. The error is the imatrix-weighted squared error of the dequantized rows, Σᵢⱼ wⱼ (Wᵢⱼ − Ŵᵢⱼ)²,
   scaled from the sample to all rows: the diagonal-Hessian estimate of E‖(W − Ŵ) x‖² per token, which
   makes tensors comparable (they read activations of different sizes). This is an *estimated* error, not
   a measured KL: one read of each tensor, no forward passes.
2. allocate: a multiple-choice knapsack over the candidates' (bytes, error) points. Starting from every
   tensor's cheapest type, the upgrade with the largest error drop per byte is taken while it fits (the
   greedy path over each tensor's lower convex hull, which is the Lagrangian solution at every budget).

What stays as llama-quantize chooses it: tensors it copies unchanged (norms, 1-D), the token embedding and
the output head (no imatrix entry puts them on the same scale; llama.cpp treats both specially), any tensor
the user typed with --tensor-type / --token-embedding-type / --output-tensor-type, and any tensor the
imatrix has no entry for. The result is a list of exact-name `tensor_types`, so the plan is an ordinary
mixture recipe (`--save-config`), and `--config RECIPE` reproduces the file without measuring again.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qconvert.errors import BadInput

# The types a budget chooses among, cheapest first: the K-quants and Q8_0 for 256-multiple rows, the
# 32-block types for the rest (576-wide SmolLM2). A type must fit a tensor's rows to be a candidate.
CANDIDATES: tuple[T, ...] = (T.Q2_K, T.Q3_K, T.IQ4_NL, T.Q4_0, T.IQ4_XS, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K,
                             T.Q6_K, T.Q8_0)
SAMPLE_ROWS = 256  # rows measured per tensor (per expert matrix for stacked experts, at least 16)
PINNED_NAMES = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """'2100000000', '2.1GB', '900MiB' -> bytes (decimal units are powers of 10, *iB of 2)."""
    m = _SIZE_RE.fullmatch(str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise BadInput(f"--target-size {text!r}: expected bytes or a number with a unit "
                       "(KB, MB, GB, KiB, MiB, GiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise BadInput(f"--target-size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class Candidate:
    qtype: T
    nbytes: int
    error: float


@dataclass(frozen=True)
class Measured:
    """One tensor the budget may re-type: its candidates, cheapest first."""

    name: str
    candidates: tuple[Candidate, ...]


def tensor_bytes(qtype: T, ne: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * size


def fitting_types(ne0: int) -> list[T]:
    """The candidates whose blocks divide the rows (none of them needs an imatrix to exist)."""
    return [t for t in CANDIDATES if ne0 % GGML_QUANT_SIZES[t][0] == 0]


def sample_rows(x: np.ndarray, n_mat: int) -> np.ndarray:
    """Evenly spaced rows of each of the n_mat stacked matrices, as [n_mat * k, ne0] (k rows each)."""
    mats = x.reshape(n_mat, -1, x.shape[-1])
    k = min(mats.shape[1], max(16, SAMPLE_ROWS // n_mat))
    idx = np.unique(np.linspace(0, mats.shape[1] - 1, k).round().astype(np.int64))
    return np.ascontiguousarray(mats[:, idx, :].reshape(-1, x.shape[-1]))


def measure_tensor(name: str, x: np.ndarray, ne: Sequence[int], weights: np.ndarray,
                   threads: int | None = None) -> Measured:
    """The candidates of one tensor: x float32 in numpy order, weights [n_mat, ne0] (the imatrix)."""
    from qconvert.kernels import dequantize, quantize

    n_mat = weights.shape[0]
    rows = sample_rows(x, n_mat)
    scale = float(np.prod(ne[1:], dtype=np.int64)) / rows.shape[0]  # sampled rows -> all rows
    w = np.repeat(weights.astype(np.float64), rows.shape[0] // n_mat, axis=0)
    out = []
    for qtype in fitting_types(int(ne[0])):
        q = quantize(rows, qtype, weights if n_mat > 1 else weights[0], threads)
        d = dequantize(q, qtype).astype(np.float64) - rows
        out.append(Candidate(qtype, tensor_bytes(qtype, ne), float(np.sum(d * d * w)) * scale))
    return Measured(name, tuple(sorted(out, key=lambda c: (c.nbytes, c.error))))


def _hull(cands: Sequence[Candidate]) -> list[Candidate]:
    """The lower convex hull of (bytes, error), cheapest first: the only points an optimum uses."""
    pts: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.nbytes, c.error)):
        if pts and c.error >= pts[-1].error:
            continue  # costs more, not better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a-c: it is never the best trade
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(c)
    return pts


def allocate(measured: Sequence[Measured], budget: int) -> dict[str, Candidate]:
    """The type of each measured tensor with total bytes <= budget and small total error (see module doc).
    Ties break by tensor order, so the plan is deterministic."""
    hulls = [_hull(m.candidates) for m in measured]
    level = [0] * len(hulls)
    total = sum(h[0].nbytes for h in hulls)
    if total > budget:
        raise BadInput(f"the size target leaves {max(budget, 0) / 2**20:.1f} MiB for the quantized tensors; "
                       f"their smallest types need {total / 2**20:.1f} MiB")

    def push(heap: list, i: int) -> None:
        h, k = hulls[i], level[i]
        if k + 1 < len(h):
            gain = (h[k].error - h[k + 1].error) / (h[k + 1].nbytes - h[k].nbytes)
            heapq.heappush(heap, (-gain, i))

    heap: list[tuple[float, int]] = []
    for i in range(len(hulls)):
        push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        h, k = hulls[i], level[i]
        extra = h[k + 1].nbytes - h[k].nbytes
        if total + extra > budget:
            continue  # this tensor's next step does not fit; smaller steps of others still may
        total += extra
        level[i] = k + 1
        push(heap, i)
    return {m.name: hulls[i][level[i]] for i, m in enumerate(measured)}


def recipe(file_type: str, assignment: dict[str, Candidate], comment: str) -> str:
    """A mixture recipe (formats/gguf/mixture.load_config) that reproduces the plan: exact-name patterns."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"type: {file_type}", "tensor_types:"]
    for name, c in assignment.items():
        lines.append(f"  - {{pattern: '^{re.escape(name)}$', type: {c.qtype.name}}}")
    return "\n".join(lines) + "\n"


def write_recipe(path: Path, text: str) -> None:
    from qconvert.formats.output import atomic_file, check_output_path

    check_output_path(path)
    with atomic_file(path, "recipe") as tmp:
        tmp.write_text(text, encoding="utf-8")

