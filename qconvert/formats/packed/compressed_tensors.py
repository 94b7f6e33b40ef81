"""compressed-tensors ``pack-quantized`` (W4A16-style) format (checkpoint-formats.md §5), as llm-compressor
saves it.

Per quantized Linear: ``weight_packed`` int32 [N, ceil(K*b/32)], ``weight_scale`` [N, G] in the model dtype,
``weight_shape`` int64 [2], and for asymmetric schemes ``weight_zero_point`` int32 [ceil(N*b/32), G] packed
along N. Codes are CT's signed codes offset by 2^(b-1) — exactly our unsigned codes — so packing needs no
arithmetic. The config is built and validated with the compressed-tensors package's own pydantic classes.

Act-order is written as ``actorder: weight`` with static groups (sequential groups, no ``weight_g_idx``):
compressed-tensors 0.20 removed ``actorder: group`` and its decompressor ignores ``weight_g_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.kernels import packing
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec, scale_dtype

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

BITS = (2, 3, 4, 8)
FORMAT = "pack-quantized"


def ct_config(config_groups: dict, format: str, skipped: tuple[str, ...], lm_head: bool) -> dict:
    """``config.json:quantization_config`` exactly as llm-compressor's ``ModelCompressor.update_config``
    writes it, validated by the compressed-tensors package's own classes."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(config_groups=config_groups, format=format, quantization_status="compressed",
                             ignore=base.ignore_list(skipped, lm_head))
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **cfg.model_dump(exclude={"quant_method"}),
    }


# QuantizationArgs as compressed-tensors 0.19 serialises them (every field, unset ones null), the spelling
# llm-compressor 0.14.0.1 writes (it pins compressed-tensors 0.19.0); 0.20 reads it too
_ARGS_019 = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
             "num_bits": 8, "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": None,
             "symmetric": True, "type": "int", "zp_dtype": None}


def preset_config(weights: dict[str, Any], inputs: dict[str, Any] | None, format: str,
                  skipped: tuple[str, ...], lm_head: bool) -> dict:
    """``quantization_config`` of one llm-compressor preset group, key for key as llm-compressor 0.14.0.1
    writes it, without importing compressed-tensors (its import costs ~120 MB and 2 s of a data-free run;
    tests validate these dicts with its classes). ``version`` is the installed compressed-tensors'."""
    from importlib.metadata import version

    group = {
        "format": format,
        "input_activations": None if inputs is None else {**_ARGS_019, **inputs},
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {**_ARGS_019, **weights},
    }
    return {
        "config_groups": {"group_0": group},
        "format": format,
        "global_compression_ratio": None,
        "ignore": base.ignore_list(skipped, lm_head),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": version("compressed-tensors"),
    }


class CompressedTensorsFormat:
    name = "compressed-tensors"
    kind = "int"
    method = "compressed-tensors"
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                "weight_global_scale", "input_global_scale", "input_scale")

    def check_spec(self, spec: QuantSpec, options: PackOptions) -> None:
        act_order, static_groups = options.act_order, options.static_groups
        if spec.bits not in BITS:
            raise BadInput(
                f"--format compressed-tensors: {spec.bits}-bit is not offered "
                f"(choose {'/'.join(map(str, BITS))}; vLLM runs 4 and 8)"
            )
        if spec.group_size != -1 and spec.group_size <= 0:
            raise BadInput(f"--format compressed-tensors: bad group size {spec.group_size}")
        if act_order and not static_groups and spec.group_size != -1:
            raise BadInput(
                "--format compressed-tensors cannot store an act-order g_idx (compressed-tensors "
                "dropped actorder=group): add --static-groups"
            )

    def check_layer(self, name: str, n: int, k: int, spec: QuantSpec) -> None:
        return None  # the dense stream pads each row; any shape packs

    def adapt(self, spec: QuantSpec, model_dtype: str) -> QuantSpec:
        return replace(spec, scale_dtype=model_dtype, min_zero=0)

    def pack(self, prefix: str, qt: QuantizedTensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        import torch
        if not qt.sequential:
            raise BadInput(f"{prefix}: compressed-tensors cannot store an act-order g_idx")
        n, k = qt.shape
        out = {
            f"{prefix}.weight_packed": torch.from_numpy(packing.ct_pack_weight(qt.codes, qt.bits)),
            f"{prefix}.weight_scale": torch.from_numpy(np.ascontiguousarray(qt.scales)).to(
                scale_dtype(qt.scale_dtype)
            ),
            f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not qt.sym:
            out[f"{prefix}.weight_zero_point"] = torch.from_numpy(
                packing.ct_pack_zero_point(qt.zeros, qt.bits)
            )
        return out

    def quantization_config(self, plan: base.PackPlan) -> dict:
        from compressed_tensors.quantization import QuantizationScheme

        default, act_order = plan.default, plan.options.act_order
        assert isinstance(default, QuantSpec)
        key = lambda s: (s.bits, s.group_size, s.sym)  # noqa: E731 - the scheme identity
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=_args(default, act_order),
                                                format=FORMAT)}
        by_scheme: dict[tuple, list[str]] = {}
        for prefix, spec in sorted(plan.overrides.items()):
            if key(spec) != key(default):
                by_scheme.setdefault(key(spec), []).append(prefix)
        for i, (k, prefixes) in enumerate(sorted(by_scheme.items()), start=1):
            spec = replace(default, bits=k[0], group_size=k[1], sym=k[2])
            # exact module names outrank the "Linear" class target in compressed-tensors' matcher
            groups[f"group_{i}"] = QuantizationScheme(
                targets=prefixes, weights=_args(spec, act_order), format=FORMAT
            )
        return ct_config(groups, FORMAT, plan.skipped, plan.options.lm_head)

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}

    # -- reading -------------------------------------------------------------------------------------------
    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, base.TensorInfo], method: str) -> bool:
        return suffix == "weight_packed"

    def detect(self, prefix: str, tensors: Mapping[str, base.TensorInfo], hints: dict[str, Any],
               read_small: base.ReadSmall | None) -> base.QuantizedLayer | None:
        wp = tensors[f"{prefix}.weight_packed"]
        sc = tensors.get(f"{prefix}.weight_scale")
        if len(wp.shape) != 2:
            return None
        n, cols = wp.shape
        names = base.members(prefix, self.suffixes, tensors)
        if wp.dtype == "U8":  # nvfp4 / mxfp4: two 4-bit values per byte
            k, bits = cols * 2, 4
        else:
            k = _logical_k(prefix, tensors, read_small, n) or (cols * 32 // hints["bits"]
                                                               if isinstance(hints.get("bits"), int) else 0)
            bits = _packed_bits(k, cols, hints.get("bits")) if k else None
        groups = sc.shape[1] if sc is not None and len(sc.shape) == 2 else 1
        group, gran = base.group_size(k, groups, hints.get("group_size"))
        return base.layer(prefix, self.method, bits, group, n, k, names, tensors, gran)

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch
        packed = src.read_numpy(f"{prefix}.weight_packed")
        shape = src.read_numpy(f"{prefix}.weight_shape")
        bits = _bits_for(int(shape[1]), packed.shape[1])
        zp = _optional(src, f"{prefix}.weight_zero_point")
        g_idx = _optional(src, f"{prefix}.weight_g_idx")
        w = packing.ct_dequantize(packed, src.read_numpy(f"{prefix}.weight_scale"), shape, bits, zp, g_idx)
        return torch.from_numpy(w)


def _args(spec: QuantSpec, act_order: bool):
    from compressed_tensors.quantization import QuantizationArgs

    grouped = spec.group_size != -1
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.sym,
        dynamic=False,
        strategy="group" if grouped else "channel",
        group_size=spec.group_size if grouped else None,
        actorder="weight" if act_order and grouped else None,
    )


def _packed_bits(k: int, cols: int, hint: Any) -> int | None:
    """b with ceil(K*b/32) == cols (dense bit stream); the config's bits win when they fit."""
    fits = [b for b in range(1, 33) if -(-k * b // 32) == cols]
    if isinstance(hint, int) and hint in fits:
        return hint
    return fits[0] if fits else None


def _bits_for(n: int, words: int) -> int:
    """Bit width whose dense stream of n values takes `words` int32 words."""
    for bits in range(1, 9):
        if packing.packed_len(n, bits) == words:
            return bits
    raise ValueError(f"{words} words cannot hold {n} values of 1..8 bits")


def _logical_k(prefix: str, tensors: Mapping[str, base.TensorInfo], read_small: base.ReadSmall | None, n: int
               ) -> int | None:
    name = f"{prefix}.weight_shape"
    info = tensors.get(name)
    if info is None or read_small is None or info.nbytes > 64:
        return None
    try:
        values = [int(v) for v in read_small(name).reshape(-1)]
    except Exception:  # noqa: BLE001 - an unreadable shape only costs us the logical K
        return None
    return values[1] if len(values) == 2 and values[0] == n and values[1] > 0 else None


def _optional(src: base.Source, name: str) -> np.ndarray | None:
    return src.read_numpy(name) if name in src.tensors else None
