"""The records methods return and formats pack: what one tensor's quantization is, and its result.

Methods (rtn, gptq, awq, fp8) fill them without knowing the output format; formats pack them without
knowing how they were found. Orientation follows the Linear weight ``W [N=out, K=in]`` and
compressed-tensors: integer ``scales``/``zeros`` are ``[N, G]`` (the GPTQ / AWQ packers transpose).

Integer codes are unsigned with an explicit zero point (``dequant = scale * (code - zero)``), the one
convention every integer format can be derived from: symmetric tensors have ``zero = 2^(bits-1)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qconvert.errors import BadInput
from qconvert.load import dtypes

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

@dataclass(frozen=True)
class Scheme:
    """A ``--scheme``: a number format named as llm-compressor names its preset, the methods that find it
    and the kind of packed format that writes it (formats/packed FORMATS ``kind``)."""

    name: str
    kind: str  # fp8 | nvfp4 | mxfp4 | w8a8
    methods: tuple[str, ...]
    preset: str  # llm-compressor / compressed-tensors preset name
    help: str


SCHEMES = {s.name: s for s in (
    Scheme("dynamic", "fp8", ("fp8",), "FP8_DYNAMIC", "per-channel weights, per-token activations, no data"),
    Scheme("static", "fp8", ("fp8",), "FP8",
           "per-tensor weight and input scales; needs --dataset or --stats"),
    Scheme("block", "fp8", ("fp8",), "FP8_BLOCK", "128×128 weight blocks"),
    Scheme("nvfp4a16", "nvfp4", ("rtn",), "NVFP4A16",
           "FP4 E2M1 weights, E4M3 scale per 16, float32 global scale; bf16 activations; no data"),
    Scheme("mxfp4a16", "mxfp4", ("rtn",), "MXFP4A16", "FP4 E2M1 weights, E8M0 scale per 32; no data"),
    Scheme("w8a8", "w8a8", ("rtn", "gptq"), "W8A8",
           "int8 per-channel symmetric weights, dynamic per-token int8 activations"),
    Scheme("nvfp4", "nvfp4", ("rtn",), "NVFP4",
           "NVFP4A16's weights; FP4 activations, E4M3 scale per 16 at run time under a calibrated float32 "
           "global scale per Linear; needs --dataset or --stats"),
    Scheme("mxfp4", "mxfp4", ("rtn",), "MXFP4", "MXFP4A16's weights; dynamic MXFP4 activations; no data"),
)}
# fp8 --scheme -> the weight-scale strategy (a format may coarsen it: vLLM fp8 stores one scale per tensor)
FP8_STRATEGIES = {"dynamic": "channel", "static": "tensor", "block": "block"}


def scale_dtype(name: str) -> torch.dtype:
    """The torch dtype a scale is stored in ("float16", "bfloat16", "float32")."""
    return dtypes.TORCH_BY_NAME[name]  # the attribute imports torch on first use, not this module


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (independent of the method and of the output format)."""

    bits: int = 4
    group_size: int = 128  # -1 = one group per output channel
    sym: bool = True
    mse: float = 0.0  # norm exponent of the MSE grid search (2.4 in the references); 0 = plain min/max
    grid: int = 100
    maxshrink: float = 0.8
    scale_dtype: str = "float16"
    min_zero: int = 0  # 1 for gptq format v1, which stores zero-1 and cannot hold a zero of 0

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_for(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def fits(self, n: int, k: int) -> bool:
        return k % self.group_for(k) == 0

    def misfit(self, bad: list[tuple[str, tuple[int, int]]]) -> str:
        """Why the first of the Linears that do not fit cannot be quantized, and what to do."""
        prefix, (_, k) = bad[0]
        return (f"{prefix}: group size {self.group_for(k)} does not divide its {k} input columns; choose a "
                f"group that divides {k} or skip it with --ignore '{re.escape(prefix)}'")


@dataclass
class QuantizedTensor:
    codes: np.ndarray  # uint8 [N, K], 0 .. 2^bits-1, columns in the original (unpermuted) order
    scales: np.ndarray  # float32 [N, G]; values are exactly representable in `scale_dtype`
    zeros: np.ndarray  # int32 [N, G]; true zero points (symmetric: 2^(bits-1))
    bits: int
    group_size: int  # as requested; -1 = one group spanning K (per output channel)
    sym: bool
    g_idx: np.ndarray | None = None  # int32 [K] group of each input column; None = sequential k // group
    scale_dtype: str = "float16"  # the dtype the scales were rounded to ("float16", "bfloat16", "float32")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def group(self) -> int:
        """Effective group length (K for group_size -1)."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def sequential(self) -> bool:
        """True when column k belongs to group k // group (no act-order g_idx needed on disk)."""
        return self.g_idx is None or bool(np.array_equal(self.g_idx, self.group_index(sequential=True)))

    def group_index(self, sequential: bool = False) -> np.ndarray:
        """int32 [K]: the group of each input column (what GPTQ calls g_idx)."""
        if self.g_idx is not None and not sequential:
            return self.g_idx.astype(np.int32)
        return (np.arange(self.shape[1]) // self.group).astype(np.int32)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] — the weights every reader reconstructs."""
        g = self.group_index()
        return self.scales[:, g] * (self.codes.astype(np.float32) - self.zeros[:, g].astype(np.float32))

    def validate(self) -> None:
        """Internal consistency (shapes, ranges); a failure is a bug in a method, not user input."""
        n, k = self.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != n:
            raise ValueError(
                f"scales {self.scales.shape} / zeros {self.zeros.shape} do not fit codes {self.shape}"
            )
        if self.g_idx is None and k % self.group:
            raise ValueError(f"group {self.group} does not divide K={k}")
        if self.codes.size and int(self.codes.max()) >= 1 << self.bits:
            raise ValueError(f"codes exceed {self.bits} bits")


@dataclass(frozen=True)
class FP8Spec:
    strategy: str = "channel"  # tensor | channel | block
    block: tuple[int, int] = (128, 128)  # rows × columns per scale (block strategy only)
    scale_dtype: str = "float32"  # how the format stores scales; quantization uses the stored value

    def fits(self, n: int, k: int) -> bool:
        return self.strategy != "block" or not (n % self.block[0] or k % self.block[1])

    def misfit(self, bad: list[tuple[str, tuple[int, int]]]) -> str:
        prefix, (n, k) = bad[0]
        return (f"--scheme block: {len(bad)} Linear(s) do not divide into {self.block[0]}×{self.block[1]} "
                f"blocks (first: {prefix}, {n}×{k}); skip them with --ignore (e.g. --ignore "
                f"'{re.escape(prefix)}$') or use --scheme dynamic")

    def check_shape(self, name: str, n: int, k: int) -> None:
        if self.strategy == "block" and (n % self.block[0] or k % self.block[1]):
            bn, bk = self.block
            raise BadInput(
                f"{name}: shape {n}×{k} is not divisible into {bn}×{bk} blocks; skip it with "
                f"--ignore '{re.escape(name)}' or use --scheme dynamic"
            )


@dataclass
class FP8Tensor:
    """The method's result, before any format names it."""

    codes: torch.Tensor  # uint8 E4M3 bit patterns [N, K]
    scale: torch.Tensor  # float32 values of the stored scales: [1], [N, 1] or [N/bn, K/bk]
    spec: FP8Spec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def stored_scale(self) -> torch.Tensor:
        return self.scale.to(scale_dtype(self.spec.scale_dtype))

    def float8(self) -> torch.Tensor:
        import torch
        return self.codes.view(torch.float8_e4m3fn)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] = e4m3 × scale (exact in float32: 4 × 8 significant bits at most)."""
        import torch
        return self.codes.view(torch.float8_e4m3fn).float() * expand_scale(self.scale, self.shape, self.spec)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], spec: FP8Spec) -> torch.Tensor:
    """A scale grid broadcast against an [N, K] weight."""
    if spec.strategy != "block":
        return scale  # [1] and [N, 1] broadcast as they are
    bn, bk = spec.block
    return scale.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


@dataclass(frozen=True)
class FP4Spec:
    """compressed-tensors FP4 weights: NVFP4 (E4M3 scale per 16 and a float32 global scale) or MXFP4 (E8M0
    scale per 32). The scales are computed in the weight's own dtype (kernels/fp4.py), so nothing here
    says how they are stored: the format fixes that."""

    variant: str  # nvfp4 | mxfp4
    activations: bool = False  # FP4 activations too (presets NVFP4 / MXFP4); nvfp4's need a global scale

    @property
    def group_size(self) -> int:
        return 16 if self.variant == "nvfp4" else 32

    def fits(self, n: int, k: int) -> bool:
        return k % self.group_size == 0

    def misfit(self, bad: list[tuple[str, tuple[int, int]]]) -> str:
        prefix, (_, k) = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return (f"{self.variant}: {prefix} has {k} input columns, not a multiple of {self.group_size}{more}; "
                f"skip it with --ignore '{re.escape(prefix)}$'")


@dataclass
class FP4Tensor:
    """An FP4 method result: E2M1 codes and the group scales as their stored bytes."""

    codes: np.ndarray  # uint8 [N, K] E2M1 codes (bit 3 = sign)
    scales: np.ndarray  # uint8 [N, K/g]: E4M3 bit patterns (nvfp4) or E8M0 exponents (mxfp4)
    global_scale: float | None  # nvfp4: the float32 divisor shared by the fused group; mxfp4: None
    spec: FP4Spec

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        from qconvert.kernels import fp4

        if self.spec.variant == "nvfp4":
            from qconvert.kernels.fp8 import decode_e4m3

            assert self.global_scale is not None
            return fp4.nvfp4_dequantize(self.codes, decode_e4m3(self.scales), self.global_scale)
        return fp4.mxfp4_dequantize(self.codes, self.scales)


@dataclass(frozen=True)
class PackOptions:
    """What a method tells the format about how the weights were found (recorded in the config)."""

    method: str
    lm_head: bool = False  # lm_head is quantized too
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01  # GPTQ's defaults: the gptq config records them for every method, as GPTQModel does
    true_sequential: bool = True
    static_inputs: bool = False  # fp8 static: a calibrated input scale per Linear
