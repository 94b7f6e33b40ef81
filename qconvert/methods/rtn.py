"""Round-to-nearest: per-group min/max (or MSE-grid) scales, no calibration data; or, with --scheme
nvfp4a16 / mxfp4a16, compressed-tensors FP4 (kernels/fp4.py is the spec; the scales are computed in the
weight's own dtype as compressed-tensors does). NVFP4's global scale is shared by the Linears vLLM fuses
(q/k/v, gate/up: arch.tensors.fused_groups), so their max |w| is read first, one tensor at a time.

--scheme w8a8 is the integer path with the grid int8 / per channel / symmetric; ``--smoothquant ALPHA``
first finds smoothing factors from the calibration engine's max |x| (--dataset, or --stats from a calibrate
file), folds them into the norms and scales the balanced Linears' columns before rounding
(methods/smoothquant.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qconvert.arch.tensors import fused_groups
from qconvert.errors import BadInput
from qconvert.methods import smoothquant as sq
from qconvert.methods.plan import CalibrationOptions, IntOptions, Job, LayerPlan, input_maxima
from qconvert.methods.quantizer import find_params, grouped_tensor
from qconvert.methods.types import FP4Spec, FP4Tensor, PackOptions, QuantizedTensor, QuantSpec

# the dtypes compressed-tensors computes FP4 scales in (anything else is quantized as float32)
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class Config(IntOptions, CalibrationOptions):
    """``--method rtn``: no data, unless the scheme needs activation statistics (--smoothquant)."""

    stats: str | None = None  # a `qconvert calibrate` file instead of --dataset
    smoothquant: float | None = None  # SmoothQuant's α (--scheme w8a8)

    def check(self) -> None:
        self.check_scheme()
        if self.smoothquant is not None:
            sq.check_alpha(self.smoothquant)
            if self.scheme != "w8a8":
                raise BadInput("--smoothquant applies to --scheme w8a8 (int8 activations)")
        if not self.needs_data:
            if self.dataset or self.stats:
                raise BadInput(f"--method rtn --scheme {self.scheme or 'int'} needs no data; "
                               "--dataset/--stats serve --smoothquant, --scheme nvfp4 and --kv-cache")
            return
        if self.dataset and self.stats:
            raise BadInput("give either --dataset (calibrate now) or --stats (a 'qconvert calibrate' file)")
        if not self.dataset and not self.stats:
            what = ("--smoothquant" if self.smoothquant is not None else "--kv-cache fp8" if self.kv_cache
                    else f"--scheme {self.scheme}")
            raise BadInput(f"{what} needs activation statistics: --dataset FILE.txt|.jsonl|.parquet|"
                           "hf:NAME (or --stats FILE from 'qconvert calibrate')")
        self.check_calibration()

    @property
    def needs_data(self) -> bool:
        return self.smoothquant is not None or self.scheme == "nvfp4" or self.kv_cache is not None

    def pack_options(self, lm_head: bool) -> PackOptions:
        return PackOptions(method="rtn", lm_head=lm_head)


def run(job: Job) -> None:
    """Tensor by tensor: no data, so nothing but the weight itself."""
    if any(isinstance(p.spec, FP4Spec) for p in job.quantized):
        _run_fp4(job)
        return
    columns = _smooth(job) if job.config.smoothquant is not None else {}

    def quantize(p: LayerPlan, w: torch.Tensor) -> tuple[QuantizedTensor, float]:
        assert isinstance(p.spec, QuantSpec)
        s = columns.get(p.prefix)
        return rtn_quantize_with_error(w if s is None else sq.scale_columns(w, s), p.spec)

    job.stream(quantize)


def _smooth(job: Job) -> dict[str, torch.Tensor]:
    """SmoothQuant: the norms folded and written now; the quantized Linears scaled as they stream by."""
    groups = sq.model_groups(job.ckpt.config, job.layers)
    sq.check_tensors(job.ckpt, groups)
    return sq.fold_from_maxima(job, groups)


def _run_fp4(job: Job) -> None:
    shared = _shared_global_scales(job)
    inputs = _input_global_scales(job)

    def quantize(p: LayerPlan, w: torch.Tensor) -> tuple[FP4Tensor, float]:
        assert isinstance(p.spec, FP4Spec)
        qt = fp4_quantize(w, p.spec, shared.get(p.prefix), p.prefix)
        return qt, fp4_relative_error(w, qt)

    job.stream(quantize, inputs)


def _input_global_scales(job: Job) -> dict[str, torch.Tensor]:
    """NVFP4 (W4A4): each Linear's ``input_global_scale`` = 448·6 / max|x| over the calibration inputs,
    computed in the model dtype as llm-compressor's static_minmax observer does (q/k/v and gate/up see the
    same input: equal by construction)."""
    plans = [p for p in job.quantized if isinstance(p.spec, FP4Spec) and p.spec.variant == "nvfp4"
             and p.spec.activations]
    if not plans:
        return {}
    from qconvert.kernels import fp4 as fp4_kernel

    maxima = input_maxima(job.ckpt, job.config, [p.prefix for p in plans], "--scheme nvfp4")
    dtype = _dtype(job.ckpt.read(plans[0].weight))
    return {p: torch.tensor([fp4_kernel.nvfp4_global_scale(float(a.max()), dtype)], dtype=torch.float32)
            for p, a in maxima.items()}


def _shared_global_scales(job: Job) -> dict[str, float]:
    """NVFP4: one global scale per fused group, from the max |w| over its members. A group quantized only in
    part is refused (vLLM would load one fused layer with two schemes; llm-compressor asserts too)."""
    if not any(isinstance(p.spec, FP4Spec) and p.spec.variant == "nvfp4" for p in job.quantized):
        return {}
    plans = {p.prefix: p for p in job.layers}
    out: dict[str, float] = {}
    for group in fused_groups(p.prefix for p in job.layers):
        kept = [m for m in group if plans[m].spec is None]
        if kept and len(kept) < len(group):
            raise BadInput(f"nvfp4: {kept[0]} is kept dense but its fused siblings are not; vLLM loads "
                           f"{', '.join(m.rpartition('.')[2] for m in group)} as one layer with one global "
                           "scale: --ignore all of them or none")
        if kept:
            continue
        from qconvert.kernels import fp4 as fp4_kernel  # numba: only FP4 runs pay its import

        amax = max(_amax(job.ckpt, plans[m]) for m in group)
        dtype = _dtype(job.ckpt.read(plans[group[0]].weight))
        for m in group:
            out[m] = float(fp4_kernel.nvfp4_global_scale(amax, dtype))
    return out


def _amax(ckpt, p: LayerPlan) -> float:
    amax = float(ckpt.read(p.weight).abs().max())
    if not np.isfinite(amax):
        raise BadInput(f"{p.prefix}: weight contains NaN or Inf values; refusing to quantize it",
                       ckpt.tensors[p.weight].file)
    return amax


def _dtype(w: torch.Tensor) -> str:
    return _DTYPES.get(w.dtype, "float32")


FP4_CHUNK = 1 << 20  # weights per kernel call: the float32 temporaries stay ~4 MB each whatever the tensor


def _row_blocks(n: int, k: int) -> list[slice]:
    step = max(1, FP4_CHUNK // max(k, 1))
    return [slice(i, i + step) for i in range(0, n, step)]


def fp4_quantize(weight: torch.Tensor, spec: FP4Spec, global_scale: float | None = None,
                 name: str = "weight") -> FP4Tensor:
    """One [N, K] weight in the weight's own dtype; NVFP4 without a shared `global_scale` gets its own.
    Rows go through the kernel in blocks (every row is independent once the global scale is known)."""
    from qconvert.kernels import fp4 as fp4_kernel  # numba: only FP4 runs pay its import

    dtype = _dtype(weight)
    w = weight.detach()
    amax = float(w.abs().max()) if w.numel() else 0.0
    if not np.isfinite(amax):
        raise BadInput(f"{name}: weight contains NaN or Inf values; refusing to quantize it")
    n, k = w.shape
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, k // spec.group_size), dtype=np.uint8)
    gs = None
    if spec.variant == "nvfp4":
        gs = fp4_kernel.nvfp4_global_scale(amax, dtype) if global_scale is None else global_scale
    for rows in _row_blocks(n, k):
        block = w[rows].to(torch.float32).numpy()
        if gs is not None:
            codes[rows], scales[rows] = fp4_kernel.nvfp4_quantize_fast(block, gs, dtype)
        else:
            codes[rows], scales[rows] = fp4_kernel.mxfp4_quantize_fast(block, dtype)
    return FP4Tensor(codes, scales, None if gs is None else float(gs), spec)


def fp4_relative_error(weight: torch.Tensor, qt: FP4Tensor) -> float:
    """``||W - deq||/||W||``, accumulated over the same row blocks."""
    err = norm = 0.0
    for rows in _row_blocks(*qt.shape):
        w = weight[rows].detach().to(torch.float32).numpy()
        sub = FP4Tensor(qt.codes[rows], qt.scales[rows], qt.global_scale, qt.spec)
        err += float(np.square(w - sub.dequantize(), dtype=np.float64).sum())
        norm += float(np.square(w, dtype=np.float64).sum())
    return (err / norm) ** 0.5 if norm else 0.0


def _as_float32(weight: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.detach().to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))


def _grouped_rows(weight: np.ndarray | torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int, int, int]:
    """``W [N, K]`` in float32 as one row per group: (rows [N*K/g, g], N, K, g)."""
    w = _as_float32(weight)
    n, k = w.shape
    g = spec.group_for(k)
    if k % g:
        raise ValueError(f"group size {g} does not divide {k} input columns")
    return w.reshape(n * (k // g), g), n, k, g


def rtn_quantize(weight: np.ndarray | torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize ``W [N, K]`` group by group; ``K`` must be a multiple of the group (callers check and name
    the layer)."""
    rows, n, k, _ = _grouped_rows(weight, spec)
    scale, zero = find_params(rows, spec)
    return grouped_tensor(rows, scale, zero, (n, k), spec)


def rtn_quantize_with_error(weight: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedTensor, float]:
    """``rtn_quantize`` and ``relative_error`` in one pass over the weight: the same codes (quantize_codes'
    operations, in place) and the same dequantized values, without rebuilding them from the numpy record
    (the W8A8 path of a 135M model spent most of its time there)."""
    rows, n, k, g = _grouped_rows(weight, spec)
    scale, zero = find_params(rows, spec)
    s, z = scale[:, None], zero[:, None]
    q = torch.div(rows, s).round_().add_(z).clamp_(0, spec.maxq)  # quantize_codes
    codes = q.to(torch.uint8)
    norm = float(torch.linalg.vector_norm(rows))
    err = float(torch.linalg.vector_norm(rows - q.sub_(z).mul_(s))) / norm if norm else 0.0
    groups = k // g
    qt = QuantizedTensor(codes=codes.reshape(n, k).numpy(), scales=scale.reshape(n, groups).numpy(),
                         zeros=zero.reshape(n, groups).to(torch.int32).numpy(), bits=spec.bits,
                         group_size=spec.group_size, sym=spec.sym, scale_dtype=spec.scale_dtype)
    return qt, err


def relative_error(weight: np.ndarray | torch.Tensor, qt: QuantizedTensor) -> float:
    """``||W - deq(Q)|| / ||W||`` (Frobenius): the number the progress bar and the summary show. Sequential
    groups broadcast their scale and zero over the group (the same products as ``qt.dequantize()``, without
    its [N, K] gathers: they were half of a W8A8 run)."""
    w = _as_float32(weight)
    norm = float(torch.linalg.vector_norm(w))
    if not norm:
        return 0.0
    if not qt.sequential:
        return float(np.linalg.norm(w.numpy() - qt.dequantize())) / norm
    n, k = qt.shape
    groups = qt.n_groups
    codes = torch.from_numpy(qt.codes).reshape(n, groups, k // groups).float()
    zeros = torch.from_numpy(qt.zeros).float().unsqueeze(-1)
    deq = torch.from_numpy(qt.scales).unsqueeze(-1) * (codes - zeros)
    return float(torch.linalg.vector_norm(w.reshape(n, groups, -1) - deq)) / norm
