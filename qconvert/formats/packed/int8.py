"""INT8 weights with a scale grid: compressed-tensors ``int-quantized`` (packed-formats-2026.md §3.1), the
W8A8 preset of llm-compressor 0.14 — int8 weights per output channel, symmetric, and dynamic per-token int8
activations (nothing stored for them).

    weight        int8 [N, K]      the signed code (our unsigned code - 128)
    weight_scale  model dtype [N, 1]   absmax / 127.5 (compressed-tensors' max / (255 / 2))

Written by ``Int8Format`` (--scheme w8a8, --method rtn or gptq); read (inspect, eval --loader unpack) by
``Int8Layout``, which is the float-weight layout of fp8.py with an int8 weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.formats.packed.base import TensorInfo
from qconvert.formats.packed.compressed_tensors import preset_config
from qconvert.formats.packed.fp8 import FloatWeightLayout
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec, scale_dtype

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch


class Int8Layout(FloatWeightLayout):
    method = "int8"
    dtypes = ("I8",)

    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, TensorInfo], method: str) -> bool:
        return super().claims(prefix, suffix, tensors, method) and f"{prefix}.weight_scale" in tensors


class Int8Format(Int8Layout):
    """``--scheme w8a8``: llm-compressor's W8A8 preset in compressed-tensors ``int-quantized``."""

    name = "compressed-tensors"
    kind = "w8a8"
    FORMAT = "int-quantized"
    # compressed-tensors quant_scheme.py INT8_W8A8 (preset "W8A8"), weight observer as llm-compressor records
    WEIGHTS = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False,
               "observer": "memoryless_minmax"}
    INPUTS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}

    def check_spec(self, spec: QuantSpec, options: PackOptions) -> None:
        if (spec.bits, spec.group_size, spec.sym) != (8, -1, True):
            raise BadInput("--scheme w8a8 stores int8 symmetric weights, one scale per output channel")

    def check_layer(self, name: str, n: int, k: int, spec: QuantSpec) -> None:
        return None

    def adapt(self, spec: QuantSpec, model_dtype: str) -> QuantSpec:
        return replace(spec, scale_dtype=model_dtype, min_zero=0)

    def pack(self, prefix: str, qt: QuantizedTensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        import torch

        signed = (qt.codes.astype(np.int16) - qt.zeros.astype(np.int16)).astype(np.int8)  # zero is 128
        return {
            f"{prefix}.weight": torch.from_numpy(signed),
            f"{prefix}.weight_scale": torch.from_numpy(np.ascontiguousarray(qt.scales)).to(
                scale_dtype(qt.scale_dtype)),
        }

    def quantization_config(self, plan: base.PackPlan) -> dict:
        # llm-compressor's GPTQ records its act-order ("static": one group per row, so no g_idx); ours is
        # recorded only when asked for
        weights = {**self.WEIGHTS, "actorder": "static" if plan.options.act_order else None}
        return preset_config(weights, self.INPUTS, self.FORMAT, plan.skipped, plan.options.lm_head)

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}
