"""FP8 checkpoints (checkpoint-formats.md §4): compressed-tensors ``float-quantized`` and vLLM's ``fp8``.

compressed-tensors (llm-compressor's presets; config built with the compressed-tensors classes):
    dynamic  FP8_DYNAMIC  weight [N,K] e4m3, weight_scale [N,1] (model dtype); per-token dynamic inputs
    static   FP8          weight_scale [1]; input_scale [1] from calibration
    block    FP8_BLOCK    weight_scale [N/128, K/128]; inputs dynamic per group of 128
vLLM ``fp8`` (AutoFP8 / DeepSeek layouts; float32 scales):
    dynamic / static  weight_scale 0-d (one per tensor: the only weight granularity this method stores),
                      input_scale 0-d when static; ``activation_scheme``
    block             weight_scale_inv [N/128, K/128] + ``weight_block_size`` (transformers' fine-grained FP8
                      reads it too); block checkpoints must be dynamic

A format adapts the method's FP8Spec (strategy, scale dtype) and names the tensors; it never sees how the
scales were found. Both read as one layout: a float8 weight times its scale grid (``FloatWeightLayout``,
which int8.py shares for W8A8 weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.formats.packed.compressed_tensors import ct_config
from qconvert.kernels.fp8 import decode_table
from qconvert.load.dtypes import round_float32, torch_dtype
from qconvert.methods.types import FP8Spec, FP8Tensor, PackOptions

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

BLOCK = (128, 128)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
FP8_TABLES = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}  # kernels.fp8's decoders


def scheme_of(spec: FP8Spec, options: PackOptions) -> str:
    """The llm-compressor preset a spec is: block, static (calibrated input scales) or dynamic."""
    return "block" if spec.strategy == "block" else "static" if options.static_inputs else "dynamic"


class FloatWeightLayout:
    """A weight stored in a narrow dtype [N, K] times a scale grid: ``weight_scale`` ([] / [1] per tensor,
    [N, 1] per channel, [N, G] per group, [N/bn, K/bk] per block) or DeepSeek's ``weight_scale_inv``."""

    method = "fp8"
    suffixes = ("weight", "weight_scale", "weight_scale_inv", "input_scale")
    dtypes: tuple[str, ...] = FP8_DTYPES

    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, base.TensorInfo], method: str) -> bool:
        return suffix == "weight" and tensors[f"{prefix}.weight"].dtype in self.dtypes

    def detect(self, prefix: str, tensors: Mapping[str, base.TensorInfo], hints: dict[str, Any],
               read_small: base.ReadSmall | None) -> base.QuantizedLayer | None:
        w = tensors[f"{prefix}.weight"]
        if len(w.shape) != 2:
            return None
        n, k = w.shape
        sc = tensors.get(f"{prefix}.weight_scale_inv")
        if sc is None:
            sc = tensors.get(f"{prefix}.weight_scale")
        shape = sc.shape if sc is not None else ()
        if math.prod(shape) <= 1:
            group, gran = None, "tensor"
        elif len(shape) == 2 and shape[0] == n:
            group, gran = base.group_size(k, shape[1], hints.get("group_size"))
        else:
            group, gran = None, "block"
        names = base.members(prefix, self.suffixes, tensors)
        return base.layer(prefix, self.method, 8, group, n, k, names, tensors, gran)

    def check(self, prefix: str, tensors: Mapping[str, base.TensorInfo], qc: dict) -> None:
        """Before any work: the weight has a scale, and its grid is the one its block size implies
        (ValueError, which the dense view turns into one BadInput line)."""
        shape = tensors[f"{prefix}.weight"].shape
        if len(shape) != 2:
            raise ValueError(f"{prefix}.weight has shape {list(shape)}; only 2-D scaled weights are read")
        n, k = shape
        name, grid = _scale(prefix, tensors)
        if grid is None:
            raise ValueError(f"{prefix}.weight is {tensors[f'{prefix}.weight'].dtype} but has no "
                             "weight_scale_inv or weight_scale")
        block = block_of(prefix, tensors, qc)
        if block is not None:
            want = (-(-n // block[0]), -(-k // block[1]))
            if grid != want:
                raise ValueError(f"{name} has shape {list(grid)}; a [{n}, {k}] weight in "
                                 f"{block[0]}x{block[1]} blocks needs {list(want)} (ceil-divided)")
        elif math.prod(grid) > 1 and not (len(grid) == 2 and grid[0] == n and k % grid[1] == 0):
            raise ValueError(f"{name} has shape {list(grid)}, which is no tensor, channel or group scale "
                             f"of a [{n}, {k}] weight")

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.unpack_as(src, prefix, qc, "F32"))

    def unpack_as(self, src: base.Source, prefix: str, qc: dict, dtype: str) -> np.ndarray:
        """float32 [N, K]: weight x scale, each float32 product rounded once to `dtype` (BF16 / F16 / F32), as
        DeepSeek's weight_dequant and transformers' Fp8Dequantize compute it; block grids are ceil-divided,
        the edge tiles partial."""
        self.check(prefix, src.tensors, qc)
        codes = src.read_raw(f"{prefix}.weight").view(np.uint8)
        values = code_values(src.tensors[f"{prefix}.weight"].dtype)
        name, _ = _scale(prefix, src.tensors)
        s = np.asarray(src.read_numpy(f"{prefix}.{name}"), dtype=np.float32)
        block = block_of(prefix, src.tensors, qc)
        if block is not None:
            return block_lookup(codes, s, values, block, dtype)
        w = values[codes]
        if s.ndim == 2 and s.shape[1] > 1:  # groups along K
            w.reshape(w.shape[0], s.shape[1], -1)[...] *= s[:, :, None]
        else:
            w *= s.reshape(-1, 1) if s.size > 1 else s.reshape(())  # per channel [N, 1] / per tensor
        return round_float32(w, dtype)


@cache
def code_values(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit weight dtype: our E4M3 / E5M2 decoders (exact, no
    torch: convert from a bf16 source never imports it either), int8 as is, torch's decoding for the rest."""
    if dtype in FP8_TABLES:
        return decode_table(FP8_TABLES[dtype])
    if dtype == "I8":
        return np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)
    import torch

    return torch.arange(256, dtype=torch.uint8).view(torch_dtype(dtype)).float().numpy()


def block_lookup(codes: np.ndarray, s: np.ndarray, values: np.ndarray, block: tuple[int, int],
                 dtype: str) -> np.ndarray:
    """``codes [N, K] -> round(values[code] * s[tile])`` in float32. Each tile has one scale, so its 256
    possible results are one small table and a tile is one lookup (as fast as reading a bf16 tensor), the
    same values the product-then-round gives element by element."""
    bn, bk = block
    tables = round_float32(np.ascontiguousarray(values[None, None, :] * s[:, :, None]), dtype)
    out = np.empty(codes.shape, np.float32)
    for i in range(s.shape[0]):
        rows, dest = codes[i * bn:(i + 1) * bn], out[i * bn:(i + 1) * bn]
        for j in range(s.shape[1]):
            np.take(tables[i, j], rows[:, j * bk:(j + 1) * bk], out=dest[:, j * bk:(j + 1) * bk])
    return out


def _scale(prefix: str, tensors: Mapping[str, base.TensorInfo]) -> tuple[str, tuple[int, ...] | None]:
    """The scale tensor's suffix and shape (None when there is none)."""
    for name in ("weight_scale_inv", "weight_scale"):
        info = tensors.get(f"{prefix}.{name}")
        if info is not None:
            return name, tuple(info.shape)
    return "weight_scale_inv", None


def weight_block_size(qc: dict) -> tuple[int, int]:
    """config.json's ``weight_block_size`` (DeepSeek / vLLM / transformers fine-grained FP8); transformers'
    default [128, 128] when absent."""
    value = qc.get("weight_block_size", list(BLOCK))
    if not (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers [rows, cols], "
                         f"got {value!r}")
    return int(value[0]), int(value[1])


def _ct_block(qc: dict) -> tuple[int, int] | None:
    """compressed-tensors' block_structure of its block-strategy group ([128, 128] or older "128x128")."""
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or weights.get("strategy") != "block":
            continue
        value = weights.get("block_structure")
        if isinstance(value, str):
            value = [int(v) if v.isdigit() else v for v in value.lower().split("x")]
        return weight_block_size({"weight_block_size": value})
    return None


def block_of(prefix: str, tensors: Mapping[str, base.TensorInfo], qc: dict) -> tuple[int, int] | None:
    """The (rows, cols) tile of a block-scaled weight, None for tensor / channel / group scales: DeepSeek's
    ``weight_scale_inv`` grid from ``weight_block_size``, a compressed-tensors block grid from its
    ``block_structure``. The config says it, not the shapes: [5, 5] scales of a 576-wide weight are 128-wide
    tiles with a 64-wide edge, not 116-wide ones."""
    name, grid = _scale(prefix, tensors)
    if grid is None or len(grid) != 2:
        return None  # per tensor ([] / [1])
    if name == "weight_scale_inv":
        return weight_block_size(qc)
    if grid[0] == tensors[f"{prefix}.weight"].shape[0]:
        return None  # channel [N, 1] / group [N, G]
    return _ct_block(qc) or BLOCK


def partial_blocks(tensors: Mapping[str, base.TensorInfo], qc: dict) -> list[str]:
    """The weight_scale_inv weights whose shape is no whole number of blocks (SmolLM2's 576 = 4.5 x 128):
    transformers' Fp8Dequantize derives the tile from weight / grid and refuses these (or, where the division
    happens to be exact, as 192 / 2, takes a 96-wide tile)."""
    out = []
    for name, info in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        w = tensors.get(f"{prefix}.weight")
        if leaf != "weight_scale_inv" or w is None or len(w.shape) != 2 or len(info.shape) != 2:
            continue
        try:
            bn, bk = weight_block_size(qc)
        except ValueError:
            return [prefix]  # let the loader that checks say what is wrong
        if w.shape[0] % bn or w.shape[1] % bk:
            out.append(prefix)
    return out


class CompressedTensorsFP8Format(FloatWeightLayout):
    """``--format compressed-tensors`` for fp8: llm-compressor's FP8_DYNAMIC / FP8 / FP8_BLOCK presets."""

    name = "compressed-tensors"
    kind = "fp8"
    FORMAT = "float-quantized"

    def check_spec(self, spec: FP8Spec, options: PackOptions) -> None:
        return None  # every strategy has a preset

    def check_layer(self, name: str, n: int, k: int, spec: FP8Spec) -> None:
        return None  # the method refuses blocks that do not divide, naming all of them at once

    def adapt(self, spec: FP8Spec, model_dtype: str) -> FP8Spec:
        return replace(spec, block=BLOCK, scale_dtype=model_dtype)

    def pack(self, prefix: str, qt: FP8Tensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale": qt.stored_scale()}
        if input_scale is not None:
            out[f"{prefix}.input_scale"] = input_scale.to(qt.stored_scale().dtype).reshape(1)
        return out

    def quantization_config(self, plan: base.PackPlan) -> dict:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        assert isinstance(plan.default, FP8Spec)
        scheme = scheme_of(plan.default, plan.options)
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        if scheme == "dynamic":
            weights = QuantizationArgs(**fp8, strategy="channel", dynamic=False)
            inputs = QuantizationArgs(**fp8, strategy="token", dynamic=True)
        elif scheme == "static":
            weights = QuantizationArgs(**fp8, strategy="tensor", dynamic=False)
            inputs = QuantizationArgs(**fp8, strategy="tensor", dynamic=False, observer="static_minmax")
        else:
            weights = QuantizationArgs(**fp8, strategy="block", dynamic=False, block_structure=list(BLOCK))
            inputs = QuantizationArgs(**fp8, strategy="group", group_size=BLOCK[1], dynamic=True)
        group = QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=inputs, format=self.FORMAT
        )
        return ct_config({"group_0": group}, self.FORMAT, plan.skipped, plan.options.lm_head)

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}


class VLLMFP8Format(FloatWeightLayout):
    """``--format fp8``: vLLM's own fp8 method (AutoFP8 per-tensor, DeepSeek 128x128 blocks)."""

    name = "fp8"
    kind = "fp8"

    def check_spec(self, spec: FP8Spec, options: PackOptions) -> None:
        return None

    def check_layer(self, name: str, n: int, k: int, spec: FP8Spec) -> None:
        return None

    def adapt(self, spec: FP8Spec, model_dtype: str) -> FP8Spec:
        """One weight scale per tensor (the only non-block granularity this method stores), float32."""
        strategy = "block" if spec.strategy == "block" else "tensor"
        return replace(spec, strategy=strategy, block=BLOCK, scale_dtype="float32")

    def pack(self, prefix: str, qt: FP8Tensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        if qt.spec.strategy == "block":
            return {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale_inv": qt.stored_scale()}
        if qt.spec.strategy != "tensor":
            raise BadInput(f"{prefix}: the fp8 format stores one weight scale per tensor or per block")
        out = {f"{prefix}.weight": qt.float8(), f"{prefix}.weight_scale": qt.stored_scale().reshape(())}
        if input_scale is not None:
            out[f"{prefix}.input_scale"] = input_scale.float().reshape(())
        return out

    def quantization_config(self, plan: base.PackPlan) -> dict:
        assert isinstance(plan.default, FP8Spec)
        scheme = scheme_of(plan.default, plan.options)
        cfg: dict = {
            "quant_method": "fp8",
            "activation_scheme": "static" if scheme == "static" else "dynamic",
            "ignored_layers": base.ignore_list(plan.skipped, plan.options.lm_head),
        }
        if scheme == "block":
            cfg["weight_block_size"] = list(BLOCK)
            cfg["fmt"] = "e4m3"
        return cfg

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}
