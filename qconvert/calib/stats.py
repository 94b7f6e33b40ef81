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
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert.errors import BadInput, IOFailure
from qconvert.formats.output import atomic_file, check_output_path
from qconvert.formats.safetensors_out import SafetensorsStream

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
                # an expert no token was routed to sees zero rows: max |x| of nothing is 0, like its sums
                m = a.amax(0) if a.shape[0] else a.new_zeros(self.in_features)
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


def config_hash(config: dict) -> str:
    """sha256 of the model's config.json, ignoring keys that do not describe the model itself."""
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class StatsFileWriter:
    """Writes statistics into one safetensors file as they are finished, so only the statistics handed to one
    `add` (one decoder layer's) need be in memory:

        with StatsFileWriter(path) as w:
            w.add(layer_stats) ...
            w.commit(meta)

    The file is built next to the target under a temp name and renamed into place by `commit`; leaving the
    block without a commit (an error, Ctrl-C) removes it and leaves the target untouched."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.aliases: dict[str, str] = {}  # name -> the name whose statistics it shares
        self.names: list[str] = []  # every linear added, aliases included
        self._stream: SafetensorsStream | None = None
        self._out = atomic_file(self.path, "stats file")  # nothing is touched before __enter__

    def __enter__(self) -> StatsFileWriter:
        check_output_path(self.path)  # now, not after the whole calibration pass
        self._stream = SafetensorsStream(self._out.tmp)
        return self

    def __exit__(self, *exc) -> None:
        self._abort()  # not committed

    def add(self, linears: dict[str, LinearStats]) -> None:
        """Write these statistics; linears that share one LinearStats object are stored once (aliases)."""
        assert self._stream is not None, "use StatsFileWriter as a context manager"
        first: dict[int, str] = {}
        for name, st in linears.items():
            leader = first.setdefault(id(st), name)
            self.names.append(name)
            if leader != name:
                self.aliases[name] = leader
                continue
            parts = {**st.tensors(), "count": torch.tensor([st.count], dtype=torch.int64)}
            for kind, t in parts.items():
                self._io(lambda k=f"{name}.{kind}", t=t: self._stream.add(k, t))  # type: ignore[union-attr]

    def commit(self, meta: dict[str, str]) -> dict[str, str]:
        """Finish the file with `meta` (plus the format fields) and move it into place; returns the metadata
        written."""
        assert self._stream is not None, "use StatsFileWriter as a context manager"
        meta = {**meta, "format": FILE_KIND, "format_version": FILE_VERSION, "linears": str(len(self.names))}
        meta["aliases"] = json.dumps(self.aliases)
        stream = self._stream
        self._io(lambda: stream.finish(meta))  # created by open(): the usual umask mode
        self._stream = None
        self._out.commit()
        return meta

    def _io(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            self._abort()
            raise self._out.fail(e) from e

    def _abort(self) -> None:
        """Remove what was written: the stream's data file and the temp file."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None


def save_stats(path: str | Path, stats: CalibStats) -> Path:
    """Write stats (all in memory) to one safetensors file, atomically (see StatsFileWriter)."""
    with StatsFileWriter(path) as w:
        w.add(stats.linears)
        w.commit(stats.meta)
    return Path(path)


class StatsFile:
    """An open stats file: its metadata and names from the header; a linear's tensors are read only when asked
    for (a 1B model's Hessians take several GB; a pass needs one at a time). With `ckpt` (a load-stage
    Checkpoint), a file made for another model is refused."""

    def __init__(self, path: str | Path, ckpt=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput("stats file not found", self.path)
        with self._open() as f:
            self.meta: dict[str, str] = dict(f.metadata() or {})
            keys = list(f.keys())
        if self.meta.get("format") != FILE_KIND:
            raise BadInput("not a qconvert calibration stats file (made by 'qconvert calibrate')", self.path)
        if ckpt is not None:
            _check_model(self.path, self.meta, ckpt)
        self._keys: dict[str, list[str]] = {}  # stored name -> its tensor keys
        for key in keys:
            self._keys.setdefault(key.rpartition(".")[0], []).append(key)
        self.aliases: dict[str, str] = json.loads(self.meta.get("aliases", "{}"))

    def names(self) -> list[str]:
        """Every linear with statistics, aliases included."""
        return [*self._keys, *self.aliases]

    def kinds(self, name: str) -> frozenset[str]:
        """The statistics stored for `name` (empty if it has none)."""
        keys = self._keys.get(self.aliases.get(name, name), [])
        return frozenset(k.rpartition(".")[2] for k in keys) & frozenset(STAT_KINDS)

    def read(self, name: str, kinds: Iterable[str] | str | None = None) -> LinearStats:
        """One linear's statistics, all or only `kinds` (KeyError if the file has none for it)."""
        stored = self.aliases.get(name, name)
        keys = self._keys[stored]
        if kinds is not None:
            want = {*parse_kinds(kinds), "count"}
            keys = [k for k in keys if k.rpartition(".")[2] in want]
        with self._open() as f:
            parts = {key.rpartition(".")[2]: f.get_tensor(key) for key in keys}
        return _linear_from_tensors(stored, parts)

    def read_all(self) -> CalibStats:
        linears = {name: self.read(name) for name in self._keys}
        for name, leader in self.aliases.items():
            linears[name] = linears[leader]
        return CalibStats(linears, self.meta)

    @contextmanager
    def _open(self):
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.path), framework="pt")  # reads and checks the header
        except OSError as e:
            raise IOFailure(f"cannot read stats file: {e.strerror or e}", self.path) from e
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise BadInput(f"not a safetensors stats file ({e})", self.path) from e
        with handle as f:
            yield f


def load_stats(path: str | Path, ckpt=None) -> CalibStats:
    """Read a whole stats file into memory (see StatsFile to read one linear at a time)."""
    return StatsFile(path, ckpt).read_all()


def _check_model(path: Path, meta: dict[str, str], ckpt) -> None:
    want = config_hash(ckpt.config)
    if meta.get("config_sha256") != want:
        raise BadInput(
            f"stats were collected on model '{meta.get('model', '?')}' "
            f"(config {meta.get('config_sha256', '?')[:12]}), "
            f"not on '{ckpt.name}' (config {want[:12]}); run 'qconvert calibrate' on this model",
            path,
        )


def _linear_from_tensors(name: str, parts: dict[str, torch.Tensor]) -> LinearStats:
    kinds = frozenset(k for k in STAT_KINDS if k in parts)
    if "count" not in parts:
        raise BadInput(f"stats for {name} have no token count ({', '.join(sorted(parts))})")
    per_channel = next((parts[k] for k in STAT_KINDS if k in parts and k != "token_max"), None)
    in_features = per_channel.shape[-1] if per_channel is not None else 0  # 0: token_max alone
    st = LinearStats(in_features=in_features, kinds=kinds, count=int(parts["count"][0]))
    for k in kinds:
        setattr(st, k, parts[k])
    return st
