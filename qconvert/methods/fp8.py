"""FP8 E4M3 weight quantization: one scale per tensor, per output channel, or per 128×128 block.

    scale = amax / 448          (rounded to the dtype the format stores it in, then used as stored)
    q     = e4m3(clamp(w / scale, -448, 448))          dequant = e4m3 value × scale

The clamp is explicit because casts only saturate on some torch versions, and because a scale rounded down
to bfloat16 can put w / scale a hair above 448. A zero scale (an all-zero row or block) becomes the scale
dtype's eps, as compressed-tensors does, so that nothing divides by zero. The numpy spec of the codes is
kernels/fp8.py; this module uses its torch twin, which tests hold to the same bits.

Static activation scales: amax of the layer's input over the calibration tokens / 448 — the max of the
per-channel maxima, or a percentile of the per-token maxima to ignore rare outlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.kernels import fp8 as fp8_kernel
from qconvert.kernels.fp8 import E4M3_MAX
from qconvert.methods.plan import CalibrationOptions, Job, LayerPlan
from qconvert.methods.types import FP8_STRATEGIES, FP8Spec, FP8Tensor, PackOptions, expand_scale, scale_dtype

STRATEGIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class Config(CalibrationOptions):
    """``--method fp8``:

    --scheme dynamic  per-channel weight scales, dynamic per-token activations; no data
    --scheme static   per-tensor weight scale; per-tensor input scale from the calibration engine's max |x|
                      (or --percentile of per-token maxima); --dataset, or --stats from 'qconvert calibrate'
    --scheme block    128×128 weight blocks, dynamic activations; layers whose shapes don't divide refuse
    """

    scheme: str = "dynamic"
    percentile: float = 100.0  # static: input scale from this percentile of per-token max |x|
    stats: str | None = None  # static: max |x| from a `qconvert calibrate` file instead of --dataset

    def spec(self) -> FP8Spec:
        return FP8Spec(strategy=FP8_STRATEGIES[self.scheme])

    def check(self) -> None:
        if self.scheme not in FP8_STRATEGIES:
            raise BadInput(f"--scheme {self.scheme!r}: choose one of {', '.join(FP8_STRATEGIES)}")
        if not 0 < self.percentile <= 100:
            raise BadInput(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.scheme == "static":
            if self.dataset and self.stats:
                raise BadInput(
                    "give either --dataset (calibrate now) or --stats (a 'qconvert calibrate' file)"
                )
            if not self.dataset and not self.stats:
                raise BadInput(
                    "--scheme static needs activation statistics: --dataset FILE.txt|.jsonl|.parquet|hf:NAME "
                    "(or --stats FILE from 'qconvert calibrate')"
                )
        elif (self.dataset or self.stats) and not self.kv_cache:
            raise BadInput(
                f"--scheme {self.scheme} needs no data; --dataset/--stats only serve --scheme static "
                "and --kv-cache"
            )
        elif self.percentile != 100:
            raise BadInput("--percentile only applies to --scheme static")
        self.check_calibration()

    def pack_options(self, lm_head: bool) -> PackOptions:
        return PackOptions(method="fp8", lm_head=lm_head, static_inputs=self.scheme == "static")


def run(job: Job) -> None:
    """Tensor by tensor; --scheme static first finds every input scale (a calibration pass or stats file)."""
    cfg: Config = job.config
    ckpt = job.ckpt
    in_scales = _input_scales(ckpt, cfg, job.quantized) if cfg.scheme == "static" else {}

    def quantize(p: LayerPlan, w: torch.Tensor) -> tuple[FP8Tensor, float]:
        assert isinstance(p.spec, FP8Spec)
        try:
            qt = fp8_quantize(w, p.spec, p.prefix)
        except BadInput as e:  # name the file the bad tensor is in
            raise BadInput(str(e), ckpt.tensors[p.weight].file) from None
        return qt, relative_error(w, qt)

    job.stream(quantize, in_scales)


def _input_scales(ckpt, cfg: Config, layers: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """Per-tensor input scale of every Linear to quantize, from a stats file or a calibration pass."""
    kinds = ("abs_max",) if cfg.percentile >= 100 else ("abs_max", "token_max")
    scale_dtype = layers[0].spec.scale_dtype  # type: ignore[union-attr]
    if cfg.stats:
        from qconvert.calib.stats import StatsFile

        sf = StatsFile(cfg.stats, ckpt)
        stats = {p.prefix: sf.read(p.prefix, kinds) for p in layers if sf.kinds(p.prefix)}
        where = cfg.stats
    else:
        from qconvert.calib.runner import LayerwiseRunner

        runner = LayerwiseRunner(ckpt, device=cfg.device, dtype=cfg.calib_dtype)
        stats = runner.run(cfg.tokens(ckpt), kinds=kinds, lm_head_stats=any(p.layer is None for p in layers))
        where = None
    out = {}
    for p in layers:
        st = stats.get(p.prefix)
        missing = [k for k in kinds if st is None or getattr(st, k) is None]
        if missing:
            raise BadInput(
                f"no {', '.join(missing)} statistics for {p.prefix}; collect them with 'qconvert calibrate "
                f"--stats {','.join(kinds)}{' --lm-head' if p.layer is None else ''}'",
                where,
            )
        scale = input_scale(st.abs_max, st.token_max, cfg.percentile, scale_dtype)
        if not torch.isfinite(scale).all():  # NaN/Inf activations would be written as a NaN/Inf scale
            raise BadInput(
                f"{p.prefix}: its calibration inputs contain NaN or Inf (input scale {scale.item()}); "
                "check the model's weights, or use --scheme dynamic",
                where,
            )
        out[p.prefix] = scale
    return out


def round_scale(scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 scale → the value it has once stored in `dtype` (zeros become that dtype's eps)."""
    tdtype = scale_dtype(dtype)
    stored = scale.to(tdtype)
    stored = torch.where(stored == 0, torch.tensor(torch.finfo(tdtype).eps, dtype=tdtype), stored)
    return stored.float()


def weight_amax(w: torch.Tensor, spec: FP8Spec) -> torch.Tensor:
    a = w.abs()
    if spec.strategy == "tensor":
        return a.amax().reshape(1)
    if spec.strategy == "channel":
        return a.amax(dim=1, keepdim=True)
    n, k = a.shape
    bn, bk = spec.block
    return a.reshape(n // bn, bn, k // bk, bk).amax(dim=(1, 3))


def fp8_quantize(w: torch.Tensor | np.ndarray, spec: FP8Spec, name: str = "weight") -> FP8Tensor:
    """Quantize one [N, K] weight. NaN/Inf refuse with the tensor's name (they would poison a whole scale)."""
    w = torch.as_tensor(w)
    if w.ndim != 2:
        raise BadInput(f"{name}: FP8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    w32 = w.float()
    spec.check_shape(name, *w32.shape)
    amax = weight_amax(w32, spec)
    if not torch.isfinite(amax).all():  # amax propagates NaN and Inf: no separate pass over w
        raise BadInput(f"{name}: weight contains NaN or Inf values; refusing to quantize it")
    scale = round_scale(amax / E4M3_MAX, spec.scale_dtype)
    codes = fp8_kernel.quantize_fp8_torch(w32, expand_scale(scale, tuple(w32.shape), spec))
    return FP8Tensor(codes, scale, spec)


def relative_error(w: torch.Tensor | np.ndarray, qt: FP8Tensor) -> float:
    w32 = torch.as_tensor(w).float()
    denom = torch.linalg.vector_norm(w32)
    return float(torch.linalg.vector_norm(qt.dequantize().sub_(w32)) / denom) if denom > 0 else 0.0


def input_scale(
    abs_max: torch.Tensor,
    token_max: torch.Tensor | None = None,
    percentile: float = 100.0,
    scale_dtype: str = "float32",
) -> torch.Tensor:
    """Static per-tensor activation scale [1] (stored-dtype value, as float32).

    percentile 100: the largest |x| seen (llm-compressor's static min-max observer). Below 100: that
    percentile of the per-token maxima (needs the calibration engine's token_max statistic)."""
    if percentile >= 100.0:
        amax = abs_max.float().max()
    else:
        if token_max is None or token_max.numel() == 0:
            raise ValueError("a percentile needs per-token maxima (stat kind token_max)")
        # numpy: torch.quantile refuses more than 2^24 values (~16 M calibration tokens)
        amax = torch.tensor(float(np.quantile(token_max.float().flatten().numpy(), percentile / 100.0)))
    return round_scale((amax / E4M3_MAX).reshape(1), scale_dtype)
