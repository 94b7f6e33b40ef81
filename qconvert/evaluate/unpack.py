"""Quantized HF checkpoints → dense float32 weights with our own reference kernels (qconvert.kernels.packing).

    dense_tensors(ckpt) -> Iterator[(hf_name, torch.Tensor float32)]

yields ``<prefix>.weight`` for every packed Linear and every other parameter as stored (widened to float32),
so the HF backend can build the model from its config without the quantization_config. This is the eval
stage's "unpack with our kernels" hook: a new packed format is one more ``_UNPACKERS`` entry.

Formats (checkpoint-formats.md §1-§5):
  gptq                qweight / qzeros / scales / g_idx (v1 stores zero-1, ``checkpoint_format: gptq_v2`` not)
  awq                 qweight / qzeros / scales, GEMM interleave, 4-bit
  compressed-tensors  pack-quantized: weight_packed / weight_scale / weight_shape [/ zero_point / g_idx]
                      float-quantized (FP8): weight (e4m3) × weight_scale (tensor, channel or block)
  fp8                 weight (e4m3) × weight_scale (per tensor) or × weight_scale_inv (128×128 blocks)
Activation scales (input_scale, ...) are dropped: the dense model is the weight-only dequantization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.kernels import packing

_AUX_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_shape",
                 "weight_zero_point", "weight_g_idx", "weight_scale_inv", "input_scale", "output_scale",
                 "weight_global_scale", "input_global_scale", "k_scale", "v_scale")


def _qconfig(ckpt) -> dict:
    cfg = ckpt.config
    return cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}


def _bits_for(n: int, words: int) -> int:
    """Bit width whose dense stream of n values takes `words` int32 words."""
    for bits in range(1, 9):
        if packing.packed_len(n, bits) == words:
            return bits
    raise ValueError(f"{words} words cannot hold {n} values of 1..8 bits")


def _gptq(ckpt, prefix: str, qc: dict) -> torch.Tensor:
    qweight = ckpt.read_numpy(f"{prefix}.qweight")
    scales = ckpt.read_numpy(f"{prefix}.scales")
    qzeros = ckpt.read_numpy(f"{prefix}.qzeros")
    bits = int(qc.get("bits", 4))
    k = qweight.shape[0] * 32 // bits
    if f"{prefix}.g_idx" in ckpt.tensors:
        g_idx = ckpt.read_numpy(f"{prefix}.g_idx").astype(np.int64)
    else:
        group = int(qc.get("group_size", -1))
        g_idx = np.arange(k) // (k if group == -1 else group)
    v2 = str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    return torch.from_numpy(packing.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v2))


def _awq(ckpt, prefix: str, qc: dict) -> torch.Tensor:
    if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
        raise ValueError("AWQ GEMM checkpoints are 4-bit")
    w = packing.awq_dequantize(ckpt.read_numpy(f"{prefix}.qweight"), ckpt.read_numpy(f"{prefix}.qzeros"),
                               ckpt.read_numpy(f"{prefix}.scales"))
    return torch.from_numpy(np.ascontiguousarray(w))


def _optional(ckpt, name: str) -> np.ndarray | None:
    return ckpt.read_numpy(name) if name in ckpt.tensors else None


def _ct_packed(ckpt, prefix: str, qc: dict) -> torch.Tensor:
    packed = ckpt.read_numpy(f"{prefix}.weight_packed")
    shape = ckpt.read_numpy(f"{prefix}.weight_shape")
    k = int(shape[1])
    bits = _bits_for(k, packed.shape[1])
    zp = _optional(ckpt, f"{prefix}.weight_zero_point")
    g_idx = _optional(ckpt, f"{prefix}.weight_g_idx")
    w = packing.ct_dequantize(packed, ckpt.read_numpy(f"{prefix}.weight_scale"), shape, bits, zp, g_idx)
    return torch.from_numpy(w)


def _expand_blocks(s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-tile scales [ceil(N/bn), ceil(K/bk)] -> per-element [N, K]."""
    bn, bk = -(-shape[0] // s.shape[0]), -(-shape[1] // s.shape[1])
    return s.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def _fp8(ckpt, prefix: str, qc: dict) -> torch.Tensor:
    w = ckpt.read(f"{prefix}.weight").float()
    block = f"{prefix}.weight_scale_inv" in ckpt.tensors  # DeepSeek-style 128x128 tiles
    s = ckpt.read(f"{prefix}.weight_scale_inv" if block else f"{prefix}.weight_scale").float()
    # compressed-tensors block (or group) strategy: any 2-D grid but a channel column [N, 1] (a block grid
    # can be [N/128, 1] when K <= 128)
    if block or (s.dim() == 2 and tuple(s.shape) != (w.shape[0], 1)):
        s = _expand_blocks(s, w.shape)
    return w * s  # tensor ([] / [1]) and channel ([N, 1]) scales broadcast


def _is_fp8(ckpt, name: str) -> bool:
    return ckpt.tensors[name].dtype.upper().startswith("F8")


_UNPACKERS: dict[str, Callable] = {"gptq": _gptq, "awq": _awq, "ct-packed": _ct_packed, "fp8": _fp8}


def _kind(ckpt, prefix: str, method: str) -> str | None:
    names = ckpt.tensors
    if f"{prefix}.weight_packed" in names:
        return "ct-packed"
    if f"{prefix}.qweight" in names:
        return "awq" if method == "awq" else "gptq"
    w = f"{prefix}.weight"
    if w in names and _is_fp8(ckpt, w):
        return "fp8"
    return None


def _prefixes(ckpt) -> list[str]:
    out = []
    for name in ckpt:
        head, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "weight_packed") or (leaf == "weight" and _is_fp8(ckpt, name)):
            out.append(head)
    return out


def dense_tensors(ckpt) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the model as dense float32, packed Linears unpacked by our reference kernels."""
    qc = _qconfig(ckpt)
    method = str(qc.get("quant_method", "")).lower()
    packed = {p: _kind(ckpt, p, method) for p in _prefixes(ckpt)}
    for prefix, kind in packed.items():
        try:
            yield f"{prefix}.weight", _UNPACKERS[kind](ckpt, prefix, qc)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:  # RuntimeError: torch shape clash
            raise BadInput(f"cannot unpack {prefix} ({kind}): {e}", ckpt.path) from None
    for name in ckpt:
        head, _, leaf = name.rpartition(".")
        if head in packed and (leaf in _AUX_SUFFIXES or leaf == "weight"):
            continue
        if leaf in _AUX_SUFFIXES and leaf not in ("scales",):  # stray activation scales etc.
            continue
        t = ckpt.read(name)
        if t.is_floating_point():
            yield name, t.float()
