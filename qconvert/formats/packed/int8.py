"""INT8 weights with a scale grid (compressed-tensors ``int-quantized``, W8A8): recognised and unpacked for
inspect and eval; nothing writes it yet."""

from __future__ import annotations

from collections.abc import Mapping

from qconvert.formats.packed.base import TensorInfo
from qconvert.formats.packed.fp8 import FloatWeightLayout


class Int8Layout(FloatWeightLayout):
    method = "int8"
    dtypes = ("I8",)

    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, TensorInfo], method: str) -> bool:
        return super().claims(prefix, suffix, tensors, method) and f"{prefix}.weight_scale" in tensors
