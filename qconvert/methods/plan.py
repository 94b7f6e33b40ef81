"""What the quantize shell hands a method: the Linears to quantize, the typed options every calibrated
method shares, and the writer's hands (``Job``).

A method module (rtn, gptq_layerwise, awq_block, fp8) defines ``Config`` (its typed options) and
``run(job)``. Data-free methods call ``job.stream`` (tensor by tensor, checkpoint order); calibrated ones
walk the decoder layers and call ``job.emit`` per quantized Linear. The shell writes everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qconvert.calib.experts import MIN_EXPERT_TOKENS
from qconvert.errors import BadInput
from qconvert.methods.types import SCHEMES, FP4Spec, FP4Tensor, FP8Spec, FP8Tensor, QuantizedTensor, QuantSpec

Spec = QuantSpec | FP8Spec | FP4Spec
Quantized = QuantizedTensor | FP8Tensor | FP4Tensor
Progress = Callable[[int, int, str], None]  # (decoder layers done, total, "layers.3 mlp.down_proj err 0.012")


@dataclass
class LayerPlan:
    prefix: str  # module name, e.g. model.layers.3.mlp.down_proj
    weight: str  # tensor name (prefix + ".weight")
    layer: int | None  # decoder layer index (None for lm_head)
    shape: tuple[int, int]  # (N, K)
    spec: Spec | None  # None = kept in its source dtype

    def label(self, error: float) -> str:
        """Progress text: "layers.3 mlp.down_proj err 0.012"."""
        short = self.prefix.split(f"layers.{self.layer}.", 1)[-1] if self.layer is not None else self.prefix
        where = f"layers.{self.layer}" if self.layer is not None else "head"
        return f"{where} {short} err {error:.4g}"


# the weight grid of the --scheme values the integer methods find (methods.types.SCHEMES): int schemes fix
# (bits, group_size, sym); FP4 ones are their own grid
SCHEME_GRIDS: dict[str, tuple[int, int, bool] | FP4Spec] = {
    "w8a8": (8, -1, True),
    "nvfp4a16": FP4Spec("nvfp4"),
    "mxfp4a16": FP4Spec("mxfp4"),
    "nvfp4": FP4Spec("nvfp4", activations=True),
    "mxfp4": FP4Spec("mxfp4", activations=True),
}


@dataclass(frozen=True)
class IntOptions:
    """The integer weight grid every integer method quantizes to, or a --scheme that fixes it."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    mse: bool = False  # search scales on a shrink grid minimising |Q(w)-w|^2.4
    scheme: str | None = None  # w8a8 | nvfp4a16 | mxfp4a16 | nvfp4 | mxfp4 (SCHEMES entries listing it)

    def spec(self) -> QuantSpec | FP4Spec:
        grid = SCHEME_GRIDS.get(self.scheme) if self.scheme else None
        if isinstance(grid, FP4Spec):
            return grid
        bits, group, sym = grid or (self.bits, self.group_size, self.sym)
        return QuantSpec(bits=bits, group_size=group, sym=sym, mse=2.4 if self.mse else 0.0)

    def check_scheme(self) -> None:
        """--bits/--group-size/--sym/--mse that contradict the --scheme are refused, not silently dropped
        (a value left at its default is taken as not given)."""
        if not self.scheme:
            return
        if self.scheme not in SCHEME_GRIDS:
            raise BadInput(f"--scheme {self.scheme} is not an integer-method scheme")
        grid = SCHEME_GRIDS[self.scheme]
        defaults = IntOptions()
        given = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        fixed = dict(zip(given, grid, strict=True)) if isinstance(grid, tuple) else {}
        bad = [k for k, v in given.items() if v != getattr(defaults, k) and fixed.get(k) != v]
        if isinstance(grid, FP4Spec) and self.mse:
            bad.append("mse")
        if bad:
            flags = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym", "mse": "--mse"}
            raise BadInput(f"--scheme {self.scheme} fixes the weight grid ({SCHEMES[self.scheme].help}): "
                           "drop " + " ".join(flags[k] for k in bad))


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration text and how the calibration engine runs it."""

    dataset: str | None = None  # FILE.txt|.jsonl|.parquet|hf:NAME
    num_samples: int = 128
    seq_len: int = 512
    device: str = "auto"  # auto (GPU if present), cpu, cuda, cuda:N
    calib_dtype: str = "bf16"  # the forward's dtype (Hessians and sums stay float32)
    kv_cache: str | None = None  # fp8: k/v scales from the calibration data (the shell computes them)

    def check_calibration(self) -> None:
        from qconvert.calib.runner import resolve_device, resolve_dtype

        resolve_dtype(self.calib_dtype)
        if self.dataset:
            resolve_device(self.device)

    def tokens(self, ckpt) -> torch.Tensor:
        from qconvert.calib.datasets import load_calibration, load_tokenizer

        return load_calibration(self.dataset, load_tokenizer(ckpt), seq_len=self.seq_len,
                                num_samples=self.num_samples).tokens


@dataclass(frozen=True)
class ExpertOptions:
    """MoE calibration: which tokens each expert's statistics see, and how few make an expert uncalibrated."""

    all_experts: bool = False  # every expert over every token (the layer output still top-k routed)
    min_expert_tokens: int = MIN_EXPERT_TOKENS  # fewer rows: RTN (gptq) / unit scales (awq), named in notes

    def check_experts(self) -> None:
        if self.min_expert_tokens < 0:
            raise BadInput(f"--min-expert-tokens {self.min_expert_tokens}: must be 0 or more")

    def expert_notes(self, tokens: dict[str, int], fallbacks: dict[str, int], fallback: str) -> list[str]:
        """The summary's lines on a MoE model: routed tokens per expert (none given: no line), and every
        expert below the minimum with what was done to it (``fallback``)."""
        from qconvert.calib.experts import token_report

        report = token_report(tokens, self.min_expert_tokens)
        every = " (statistics over every token: --all-experts)" if self.all_experts else ""
        notes = [report + every] if report else []
        if fallbacks:
            names = ", ".join(f"{e} ({n})" for e, n in fallbacks.items())
            notes.append(f"{len(fallbacks)} expert(s) saw fewer than {self.min_expert_tokens} calibration "
                         f"tokens and {fallback} (--all-experts calibrates them on every token): {names}")
        return notes


def input_maxima(ckpt, cfg, prefixes: list[str], what: str) -> dict[str, torch.Tensor]:
    """max |x| per input channel of each Linear named (lm_head included): from a stats file (``cfg.stats``)
    or one pass of the calibration engine over the original model (``cfg.dataset``). ``what`` names the
    option that needs them in errors."""
    from qconvert.arch.tensors import LM_HEAD

    if cfg.stats:
        from qconvert.calib.stats import StatsFile

        sf = StatsFile(cfg.stats, ckpt)
        out = {}
        for prefix in prefixes:
            found = sf.read(prefix, ("abs_max",)).abs_max if "abs_max" in sf.kinds(prefix) else None
            out[prefix] = check_maxima(prefix, found, what, cfg.stats)
        return out
    from qconvert.calib.runner import LayerwiseRunner

    runner = LayerwiseRunner(ckpt, device=cfg.device, dtype=cfg.calib_dtype)
    stats = runner.run(cfg.tokens(ckpt), kinds=("abs_max",), lm_head_stats=LM_HEAD in prefixes)
    return {p: check_maxima(p, stats[p].abs_max if p in stats else None, what, None) for p in prefixes}


def check_maxima(prefix: str, abs_max: torch.Tensor | None, what: str, where: str | None) -> torch.Tensor:
    if abs_max is None:
        lm = " --lm-head" if prefix == "lm_head" else ""
        raise BadInput(f"{what}: no abs_max statistics for {prefix}; collect them with "
                       f"'qconvert calibrate --stats abs_max{lm}'", where)
    if not bool(torch.isfinite(abs_max).all()):
        raise BadInput(f"{what}: the calibration inputs of {prefix} contain NaN or Inf", where)
    return abs_max


Emit = Callable[[LayerPlan, Quantized, float, "torch.Tensor | None"], None]
QuantizeTensor = Callable[[LayerPlan, torch.Tensor], tuple[Quantized, float]]


@dataclass
class Job:
    """One quantize run as a method sees it."""

    ckpt: Any  # load.checkpoint.Checkpoint
    config: Any  # the method's Config
    layers: list[LayerPlan]  # every candidate Linear; spec None = kept dense
    n_layers: int  # decoder layers (progress total)
    emit: Emit  # pack one quantized Linear in the output format and write it
    write: Callable[[str, torch.Tensor], None]  # write one tensor as is (e.g. AWQ's rescaled norms)
    progress: Progress | None = None
    written: set[str] = field(default_factory=set)  # tensor names written so far
    notes: list[str] = field(default_factory=list)  # lines for the summary (e.g. MoE experts that fell back)

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.spec is not None]

    def stream(self, quantize: QuantizeTensor, input_scales: dict[str, torch.Tensor] | None = None) -> None:
        """Every tensor of the checkpoint not written yet, in checkpoint order, each Linear to quantize
        replaced by what `quantize(plan, weight)` returns; one tensor in memory at a time. Data-free methods
        stream the whole model; calibrated ones what their layer walk left (lm_head, embeddings, norms)."""
        wanted = {p.weight: p for p in self.quantized}
        done: set[int] = set()
        for name in self.ckpt.tensors:
            if name in self.written:
                continue
            p = wanted.get(name)
            if p is None:
                self.write(name, self.ckpt.read(name))
                continue
            qt, err = quantize(p, self.ckpt.read(name))
            self.emit(p, qt, err, (input_scales or {}).get(p.prefix))
            if p.layer is not None:
                done.add(p.layer)
            if self.progress:
                self.progress(len(done), self.n_layers, p.label(err))
