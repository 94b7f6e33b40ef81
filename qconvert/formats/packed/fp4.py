"""compressed-tensors FP4 weights (packed-formats-2026.md §1, §2), as llm-compressor 0.14 writes its
NVFP4A16 and MXFP4A16 presets, and their W4A4 twins NVFP4 (adds ``input_global_scale`` float32 [1] per
Linear: 448·6 / max|x| over the calibration inputs, in the model dtype) and MXFP4 (dynamic activations,
nothing more stored). Both store E2M1 codes two per byte (element 2j in the low nibble):

    nvfp4-pack-quantized  weight_packed uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16],
                          weight_global_scale float32 [1] (a divisor: dequant = E2M1 · scale / global)
    mxfp4-pack-quantized  weight_packed uint8 [N, K/2], weight_scale uint8 [N, K/32] (E8M0: 2^(e-127))

No weight_shape, no zero points. The config group is the compressed-tensors preset (quant_scheme.py
NVFP4A16 / MXFP4A16) with the weight observer llm-compressor records for RTN (memoryless_minmax), spelled as
llm-compressor 0.14 writes it (compressed_tensors.preset_config).
The numbers are kernels/fp4.py's (imported where used: it compiles numba kernels, and the CLI imports
this registry); this module only names and reads the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.formats.packed import base
from qconvert.formats.packed.compressed_tensors import preset_config
from qconvert.methods.types import FP4Spec, FP4Tensor, PackOptions

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch


class _FP4Format:
    name = "compressed-tensors"
    method = "compressed-tensors"
    suffixes: tuple[str, ...] = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    kind: str  # the variant: nvfp4 | mxfp4
    FORMAT: str
    GROUP: int
    WEIGHTS: dict[str, Any]
    INPUTS: dict[str, Any]  # the activation args of the W4A4 preset (NVFP4 / MXFP4)

    # -- writing -------------------------------------------------------------------------------------------
    def check_spec(self, spec: FP4Spec, options: PackOptions) -> None:
        return None  # the preset has no options

    def check_layer(self, name: str, n: int, k: int, spec: FP4Spec) -> None:
        return None  # K % group (hence K even) is refused for all layers at once by FP4Spec.misfit

    def adapt(self, spec: FP4Spec, model_dtype: str) -> FP4Spec:
        return spec  # scales are computed in each weight's dtype and stored in fixed dtypes

    def pack(self, prefix: str, qt: FP4Tensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        import torch

        from qconvert.kernels import fp4

        scales = torch.from_numpy(np.ascontiguousarray(qt.scales, dtype=np.uint8))
        out = {f"{prefix}.weight_packed": torch.from_numpy(fp4.pack_nibbles(qt.codes))}
        if self.kind == "nvfp4":
            assert qt.global_scale is not None
            out[f"{prefix}.weight_scale"] = scales.view(torch.float8_e4m3fn)
            out[f"{prefix}.weight_global_scale"] = torch.tensor([qt.global_scale], dtype=torch.float32)
            if qt.spec.activations:  # NVFP4: the static part of the activations' scales
                if input_scale is None:
                    raise RuntimeError(f"{prefix}: NVFP4 activations without an input global scale")
                out[f"{prefix}.input_global_scale"] = input_scale.to(torch.float32).reshape(1)
        else:
            out[f"{prefix}.weight_scale"] = scales
        return out

    def quantization_config(self, plan: base.PackPlan) -> dict:
        acts = isinstance(plan.default, FP4Spec) and plan.default.activations
        return preset_config(self.WEIGHTS, self.INPUTS if acts else None, self.FORMAT, plan.skipped,
                             plan.options.lm_head)

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}

    # -- reading -------------------------------------------------------------------------------------------
    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, base.TensorInfo], method: str) -> bool:
        if suffix != "weight_packed" or tensors[f"{prefix}.weight_packed"].dtype != "U8":
            return False
        scale = tensors.get(f"{prefix}.weight_scale")
        return scale is not None and self._is_mine(prefix, scale, tensors)

    def _is_mine(self, prefix: str, scale: base.TensorInfo, tensors: Mapping[str, base.TensorInfo]) -> bool:
        raise NotImplementedError

    def detect(self, prefix: str, tensors: Mapping[str, base.TensorInfo], hints: dict[str, Any],
               read_small: base.ReadSmall | None) -> base.QuantizedLayer | None:
        wp = tensors[f"{prefix}.weight_packed"]
        sc = tensors[f"{prefix}.weight_scale"]
        if len(wp.shape) != 2 or len(sc.shape) != 2:
            return None
        n, k = wp.shape[0], wp.shape[1] * 2
        group, gran = base.group_size(k, sc.shape[1], self.GROUP)
        names = base.members(prefix, self.suffixes, tensors)
        return base.layer(prefix, self.kind, 4, group, n, k, names, tensors, gran)


class NVFP4Format(_FP4Format):
    kind = "nvfp4"
    FORMAT = "nvfp4-pack-quantized"
    GROUP = 16
    WEIGHTS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
               "symmetric": True, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn",
               "observer": "memoryless_minmax"}
    # quant_scheme.py NVFP4: static global scale (observer static_minmax), local scales at run time
    INPUTS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
              "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"}

    def _is_mine(self, prefix: str, scale: base.TensorInfo, tensors: Mapping[str, base.TensorInfo]) -> bool:
        return scale.dtype == "F8_E4M3" and f"{prefix}.weight_global_scale" in tensors

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch

        from qconvert.kernels import fp4

        codes = fp4.unpack_nibbles(src.read_numpy(f"{prefix}.weight_packed"))
        scales = src.read_numpy(f"{prefix}.weight_scale")  # the E4M3 values, widened to float32
        gs = np.asarray(src.read_numpy(f"{prefix}.weight_global_scale"), dtype=np.float32).reshape(-1)
        return torch.from_numpy(fp4.nvfp4_dequantize(codes, scales, float(gs[0])))


class MXFP4Format(_FP4Format):
    kind = "mxfp4"
    FORMAT = "mxfp4-pack-quantized"
    GROUP = 32
    WEIGHTS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
               "dynamic": False, "scale_dtype": "torch.uint8", "observer": "memoryless_minmax"}
    # quant_scheme.py MXFP4: fully dynamic E8M0 activation scales (nothing stored)
    INPUTS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
              "dynamic": True, "scale_dtype": "torch.uint8"}

    def _is_mine(self, prefix: str, scale: base.TensorInfo, tensors: Mapping[str, base.TensorInfo]) -> bool:
        return scale.dtype == "U8" and f"{prefix}.weight_global_scale" not in tensors

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch

        from qconvert.kernels import fp4

        codes = fp4.unpack_nibbles(src.read_numpy(f"{prefix}.weight_packed"))
        exponents = np.asarray(src.read_numpy(f"{prefix}.weight_scale"), dtype=np.uint8)
        return torch.from_numpy(fp4.mxfp4_dequantize(codes, exponents))
