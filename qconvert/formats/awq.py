"""AutoAWQ GEMM checkpoint format (checkpoint-formats.md §3.1-3.2), as vLLM awq / awq_marlin and
transformers read it.

Per quantized Linear: ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along N with the
[0,2,4,6,1,3,5,7] interleave (true zeros, no -1), ``scales`` fp16 [G, N]; no g_idx, 4-bit only. Zero points
are always shipped (``zero_point: true``): symmetric tensors simply carry zero 8, which every AWQ reader
accepts.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.kernels import packing
from qconvert.methods.quantized import QuantizedTensor
from qconvert.methods.quantizer import QuantSpec


class AWQFormat:
    name = "awq"

    def check_spec(self, spec: QuantSpec, *, act_order: bool = False, static_groups: bool = False) -> None:
        if spec.bits != 4:
            raise BadInput(f"--format awq (AutoAWQ GEMM) holds 4-bit weights only, not {spec.bits}")
        if act_order and not static_groups and spec.group_size != -1:
            raise BadInput("--format awq has no g_idx: act-order needs --static-groups")

    def check_layer(self, name: str, n: int, k: int, spec: QuantSpec) -> None:
        if n % 8:
            raise BadInput(
                f"{name}: output width {n} is not a multiple of 8 (AWQ GEMM packs 8 columns a word); "
                "use --ignore"
            )

    def adapt(self, spec: QuantSpec, model_dtype: str) -> QuantSpec:
        return replace(spec, scale_dtype="float16", min_zero=0)

    def pack(self, prefix: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if not qt.sequential:
            raise BadInput(f"{prefix}: AWQ cannot store an act-order g_idx")
        return {
            f"{prefix}.qweight": torch.from_numpy(packing.awq_pack(qt.codes.T)),
            f"{prefix}.qzeros": torch.from_numpy(packing.awq_pack(qt.zeros.T)),
            f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(qt.scales.T)).to(torch.float16),
        }

    def quantization_config(
        self,
        default: QuantSpec,
        overrides: dict[str, QuantSpec],
        skipped: list[str],
        *,
        lm_head: bool = False,
        **_: object,
    ) -> dict:
        if lm_head:
            raise BadInput("--format awq cannot hold a quantized lm_head")
        if any((s.bits, s.group_size) != (default.bits, default.group_size) for s in overrides.values()):
            raise BadInput(
                "--format awq has one bits/group_size for the whole model: per-layer overrides "
                "need --format gptq or compressed-tensors"
            )
        return {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": default.group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": sorted(skipped) or None,
        }

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}
