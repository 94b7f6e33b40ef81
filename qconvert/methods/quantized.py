"""QuantizedTensor: what every integer weight method returns and every packer consumes.

Methods (rtn, gptq, awq) fill it without knowing the output format; formats (gptq, awq, compressed-tensors)
pack it without knowing how it was found. Orientation follows the Linear weight ``W [N=out, K=in]`` and
compressed-tensors: ``scales``/``zeros`` are ``[N, G]`` (the GPTQ / AWQ packers transpose to ``[G, N]``).

Codes are unsigned with an explicit zero point (``dequant = scale * (code - zero)``), the one convention all
three formats can be derived from: symmetric tensors have ``zero = 2^(bits-1)`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
