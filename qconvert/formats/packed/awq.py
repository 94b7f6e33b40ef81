"""AutoAWQ GEMM checkpoint format (checkpoint-formats.md §3.1-3.2), as vLLM awq / awq_marlin and
transformers read it.

Per quantized Linear: ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along N with the
[0,2,4,6,1,3,5,7] interleave (true zeros, no -1), ``scales`` fp16 [G, N]; no g_idx, 4-bit only. Zero points
are always shipped (``zero_point: true``): symmetric tensors simply carry zero 8, which every AWQ reader
accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.kernels import packing
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch


class AWQFormat:
    name = "awq"
    kind = "int"
    method = "awq"
    suffixes = ("qweight", "qzeros", "scales")

    def check_spec(self, spec: QuantSpec, options: PackOptions) -> None:
        if spec.bits != 4:
            raise BadInput(f"--format awq (AutoAWQ GEMM) holds 4-bit weights only, not {spec.bits}")
        if options.act_order and not options.static_groups and spec.group_size != -1:
            raise BadInput("--format awq has no g_idx: act-order needs --static-groups")

    def check_layer(self, name: str, n: int, k: int, spec: QuantSpec) -> None:
        if n % 8:
            raise BadInput(
                f"{name}: output width {n} is not a multiple of 8 (AWQ GEMM packs 8 columns a word); "
                "use --ignore"
            )

    def adapt(self, spec: QuantSpec, model_dtype: str) -> QuantSpec:
        return replace(spec, scale_dtype="float16", min_zero=0)

    def pack(self, prefix: str, qt: QuantizedTensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        import torch
        if not qt.sequential:
            raise BadInput(f"{prefix}: AWQ cannot store an act-order g_idx")
        return {
            f"{prefix}.qweight": torch.from_numpy(packing.awq_pack(qt.codes.T)),
            f"{prefix}.qzeros": torch.from_numpy(packing.awq_pack(qt.zeros.T)),
            f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(qt.scales.T)).to(torch.float16),
        }

    def quantization_config(self, plan: base.PackPlan) -> dict:
        default, overrides, skipped = plan.default, plan.overrides, plan.skipped
        assert isinstance(default, QuantSpec)
        if plan.options.lm_head:
            raise BadInput("--format awq cannot hold a quantized lm_head")
        if any((s.bits, s.group_size) != (default.bits, default.group_size)  # type: ignore[union-attr]
               for s in overrides.values()):
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

    # -- reading -------------------------------------------------------------------------------------------
    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, base.TensorInfo], method: str) -> bool:
        """A qweight is AWQ's when the config says so, or (no gptq config) when nothing marks it as GPTQ:
        GPTQ has a g_idx, and its scales [G, N] share the last dimension of its qweight [K*b/32, N]."""
        if suffix != "qweight" or method == "gptq":
            return False
        scales = tensors.get(f"{prefix}.scales")
        is_gptq = f"{prefix}.g_idx" in tensors or (
            scales is not None and scales.shape[-1:] == tensors[f"{prefix}.qweight"].shape[-1:])
        return method == "awq" or not is_gptq

    def detect(self, prefix: str, tensors: Mapping[str, base.TensorInfo], hints: dict[str, Any],
               read_small: base.ReadSmall | None) -> base.QuantizedLayer | None:
        qw, sc = tensors[f"{prefix}.qweight"], tensors.get(f"{prefix}.scales")
        if sc is None or len(qw.shape) != 2 or len(sc.shape) != 2 or not sc.shape[1]:
            return None
        k, n, groups = qw.shape[0], sc.shape[1], sc.shape[0]
        bits = qw.shape[1] * 32 // n if (qw.shape[1] * 32) % n == 0 else hints.get("bits")
        group, gran = base.group_size(k, groups, hints.get("group_size"))
        names = base.members(prefix, self.suffixes, tensors)
        return base.layer(prefix, self.method, bits, group, n, k, names, tensors, gran)

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch
        if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
            raise ValueError("AWQ GEMM checkpoints are 4-bit")
        w = packing.awq_dequantize(src.read_numpy(f"{prefix}.qweight"), src.read_numpy(f"{prefix}.qzeros"),
                                   src.read_numpy(f"{prefix}.scales"))
        return torch.from_numpy(np.ascontiguousarray(w))
