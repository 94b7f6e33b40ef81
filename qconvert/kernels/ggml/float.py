"""Unquantized types F32, F16, BF16 (one element per block)."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from .helpers import BlockKernel


class F32(BlockKernel):
    qtype = T.F32
    quantized = False

    @classmethod
    def quantize_rows(cls, x, qw):
        return x.view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, b):
        return b.view("<f4").astype(np.float32)


class F16(BlockKernel):
    qtype = T.F16
    quantized = False

    @classmethod
    def quantize_rows(cls, x, qw):
        # NumPy's cast is IEEE round-to-nearest-even like GGML_FP32_TO_FP16, except that ggml turns every
        # NaN into sign|0x7E00 where NumPy keeps part of the payload.
        h = gguf.quants.quantize(x, cls.qtype).view(np.uint16)
        sign = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
        h = np.where(np.isnan(x), sign | np.uint16(0x7E00), h)
        return h.astype("<u2").view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, b):
        return b.view("<f2").astype(np.float32)


class BF16(BlockKernel):
    qtype = T.BF16
    quantized = False

    @classmethod
    def quantize_rows(cls, x, qw):
        return gguf.quants.quantize(x, cls.qtype)  # ggml_compute_fp32_to_bf16, byte for byte

    @classmethod
    def dequantize_blocks(cls, b):
        return (b.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
