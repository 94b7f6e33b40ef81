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

from dataclasses import replace

import numpy as np
import torch

from qconvert.errors import BadInput
from qconvert.kernels import packing
from qconvert.methods.quantized import QuantizedTensor
from qconvert.methods.quantizer import DTYPES, QuantSpec

BITS = (2, 3, 4, 8)
FORMAT = "pack-quantized"


class CompressedTensorsFormat:
    name = "compressed-tensors"

    def check_spec(self, spec: QuantSpec, *, act_order: bool = False, static_groups: bool = False) -> None:
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

    def pack(self, prefix: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if not qt.sequential:
            raise BadInput(f"{prefix}: compressed-tensors cannot store an act-order g_idx")
        n, k = qt.shape
        out = {
            f"{prefix}.weight_packed": torch.from_numpy(packing.ct_pack_weight(qt.codes, qt.bits)),
            f"{prefix}.weight_scale": torch.from_numpy(np.ascontiguousarray(qt.scales)).to(
                DTYPES[qt.scale_dtype]
            ),
            f"{prefix}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not qt.sym:
            out[f"{prefix}.weight_zero_point"] = torch.from_numpy(
                packing.ct_pack_zero_point(qt.zeros, qt.bits)
            )
        return out

    def quantization_config(
        self,
        default: QuantSpec,
        overrides: dict[str, QuantSpec],
        skipped: list[str],
        *,
        act_order: bool = False,
        lm_head: bool = False,
        **_: object,
    ) -> dict:
        return ct_quantization_config(default, overrides, skipped, act_order=act_order, lm_head=lm_head)

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {}


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


def ct_quantization_config(
    default: QuantSpec,
    overrides: dict[str, QuantSpec],
    skipped: list[str],
    *,
    act_order: bool = False,
    lm_head: bool = False,
) -> dict:
    """``config.json:quantization_config`` exactly as ``ModelCompressor.update_config`` writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    key = lambda s: (s.bits, s.group_size, s.sym)  # noqa: E731 - the scheme identity
    groups = {
        "group_0": QuantizationScheme(targets=["Linear"], weights=_args(default, act_order), format=FORMAT)
    }
    by_scheme: dict[tuple, list[str]] = {}
    for prefix, spec in sorted(overrides.items()):
        if key(spec) != key(default):
            by_scheme.setdefault(key(spec), []).append(prefix)
    for i, (k, prefixes) in enumerate(sorted(by_scheme.items()), start=1):
        spec = replace(default, bits=k[0], group_size=k[1], sym=k[2])
        # exact module names outrank the "Linear" class target in compressed-tensors' matcher
        groups[f"group_{i}"] = QuantizationScheme(
            targets=prefixes, weights=_args(spec, act_order), format=FORMAT
        )
    ignore = sorted(set(skipped) | (set() if lm_head else {"lm_head"}))
    cfg = QuantizationConfig(
        config_groups=groups, format=FORMAT, quantization_status="compressed", ignore=ignore
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **cfg.model_dump(exclude={"quant_method"}),
    }
