"""Per-linear-input activation statistics, and the stats file (`qconvert calibrate -o stats.safetensors`).

For every linear layer the engine sees inputs x (rows = tokens, columns = input channels) and accumulates:

    hessian  Σ x xᵀ            float32 [in, in]   (GPTQ)
    abs_sum  Σ |x| per channel  float32 [in]       (AWQ: mean |x| = abs_sum / count)
    sq_sum   Σ x² per channel   float32 [in]       (imatrix: llama.cpp's in_sum2)
    abs_max  max |x| per channel float32 [in]      (static FP8 activation scales)
    token_max max |x| per token  float32 [count]   (static FP8 with a percentile; only when asked for)
    count    number of tokens (rows)

Linears that receive the very same input tensor (q/k/v, gate/up) share one `LinearStats` object: the numbers
are identical, so they are computed and stored once. The file records which names are aliases of which.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert.errors import BadInput, IOFailure

STAT_KINDS = ("hessian", "abs_sum", "sq_sum", "abs_max", "token_max")
DEFAULT_KINDS = ("hessian", "abs_sum", "sq_sum", "abs_max")  # token_max grows with the token count: opt-in
FILE_KIND = "qconvert-calibration-stats"
FILE_VERSION = "1"
# config.json keys that change when a checkpoint is re-saved without changing the model
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "architectures",
}


def parse_kinds(kinds: Iterable[str] | str | None) -> frozenset[str]:
    """Normalise a request such as "sq_sum,abs_max" or ["hessian"]; None = the default four, "all" = every
    statistic."""
    if kinds is None:
        return frozenset(DEFAULT_KINDS)
    if kinds == "all":
        return frozenset(STAT_KINDS)
    items = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    unknown = sorted(set(items) - set(STAT_KINDS))
    if unknown or not items:
        raise BadInput(
            f"unknown statistic {', '.join(unknown) or '(none)'}; choose from {', '.join(STAT_KINDS)}"
        )
    return frozenset(items)


@dataclass
class LinearStats:
    """Running sums over the inputs of one linear layer (float32, on the device they were computed on)."""

    in_features: int
    kinds: frozenset[str]
    count: int = 0
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    token_max: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs x [..., in_features] (any float dtype; sums are float32)."""
        x = x.reshape(-1, self.in_features)
        xf = x if x.dtype == torch.float32 else x.float()
        if "hessian" in self.kinds:
            if self.hessian is None:
                self.hessian = torch.zeros(
                    self.in_features, self.in_features, dtype=torch.float32, device=x.device
                )
            self.hessian.addmm_(xf.T, xf)
        if self.kinds & {"abs_sum", "abs_max", "token_max"}:
            a = xf.abs()
            if "token_max" in self.kinds:
                m = a.amax(1)
                self.token_max = m if self.token_max is None else torch.cat([self.token_max, m])
            if "abs_sum" in self.kinds:
                self.abs_sum = _acc(self.abs_sum, a.sum(0))
            if "abs_max" in self.kinds:
                m = a.amax(0)
                self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "sq_sum" in self.kinds:  # last: squares our own float copy in place (never the caller's tensor)
            self.sq_sum = _acc(self.sq_sum, (xf.square_() if xf is not x else xf.square()).sum(0))
        self.count += x.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in STAT_KINDS if getattr(self, k) is not None}
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def _acc(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


@dataclass
class CalibStats:
    """What `calibrate` produces and `load_stats` returns: stats per linear (HF module name) + provenance."""

    linears: dict[str, LinearStats]
    meta: dict[str, str] = field(default_factory=dict)

    def aliases(self) -> dict[str, str]:
        """name -> the first name (in insertion order) that shares its LinearStats object."""
        first: dict[int, str] = {}
        out = {}
        for name, st in self.linears.items():
            out[name] = first.setdefault(id(st), name)
        return out


def config_hash(config: dict) -> str:
    """sha256 of the model's config.json, ignoring keys that do not describe the model itself."""
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_stats(path: str | Path, stats: CalibStats) -> Path:
    """Write stats to one safetensors file (temp file next to the target, renamed on success)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    aliases = {}
    for name, leader in stats.aliases().items():
        if name != leader:
            aliases[name] = leader
            continue
        st = stats.linears[name]
        for kind, t in st.tensors().items():
            tensors[f"{name}.{kind}"] = t
        tensors[f"{name}.count"] = torch.tensor([st.count], dtype=torch.int64)
    meta = {**stats.meta, "format": FILE_KIND, "format_version": FILE_VERSION, "aliases": json.dumps(aliases)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IOFailure(f"cannot write stats file: {e.strerror or e}", path) from e
    return path


def load_stats(path: str | Path, ckpt=None) -> CalibStats:
    """Read a stats file; with `ckpt` (a load-stage Checkpoint), refuse a file made for another model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput("stats file not found", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise IOFailure(f"cannot read stats file: {e.strerror or e}", path) from e
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise BadInput(f"not a safetensors stats file ({e})", path) from e
    if meta.get("format") != FILE_KIND:
        raise BadInput("not a qconvert calibration stats file (made by 'qconvert calibrate')", path)
    if ckpt is not None:
        _check_model(path, meta, ckpt)
    return CalibStats(_linears_from_tensors(raw, json.loads(meta.get("aliases", "{}"))), meta)


def _check_model(path: Path, meta: dict[str, str], ckpt) -> None:
    want = config_hash(ckpt.config)
    if meta.get("config_sha256") != want:
        raise BadInput(
            f"stats were collected on model '{meta.get('model', '?')}' "
            f"(config {meta.get('config_sha256', '?')[:12]}), "
            f"not on '{ckpt.name}' (config {want[:12]}); run 'qconvert calibrate' on this model",
            path,
        )


def _linears_from_tensors(raw: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, LinearStats]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        name, _, kind = key.rpartition(".")
        grouped.setdefault(name, {})[kind] = t
    out: dict[str, LinearStats] = {}
    for name, parts in grouped.items():
        kinds = frozenset(k for k in STAT_KINDS if k in parts)
        some = next((parts[k] for k in DEFAULT_KINDS if k in parts), None)
        if some is None:
            raise BadInput(f"stats for {name} have no per-channel statistic ({', '.join(sorted(parts))})")
        st = LinearStats(in_features=some.shape[-1], kinds=kinds, count=int(parts["count"][0]))
        for k in kinds:
            setattr(st, k, parts[k])
        out[name] = st
    for name, leader in aliases.items():
        out[name] = out[leader]
    return out
