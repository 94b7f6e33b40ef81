"""GPTQ checkpoint format (AutoGPTQ / GPTQModel layout), as vLLM gptq / gptq_marlin, transformers and
ExLlamaV2 read it.

Per quantized Linear ``<prefix>``: ``qweight`` int32 [K*b/32, N], ``qzeros`` int32 [G, N*b/32], ``scales``
fp16 [G, N], ``g_idx`` int32 [K] (checkpoint-formats.md §1.1-1.3). ``checkpoint_format: gptq`` (v1) stores
``zero - 1``; ``gptq_v2`` stores the true zero. The config goes to both ``config.json:quantization_config``
and ``quantize_config.json`` (§1.7), with every key vLLM's gptq and gptq_marlin loaders require.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert import __version__
from qconvert.arch.tensors import LM_HEAD
from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.kernels import packing
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's accepted set

# vLLM gptq_marlin (§1.8): chosen only when all of this holds, else vLLM falls back to the slower gptq kernel
MARLIN_BITS_SYM = ((4, True), (8, True))
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_N_MULTIPLE = 64
MARLIN_K_MULTIPLE = 128


class GPTQFormat:
    """``--format gptq`` (v1) and ``--format gptq_v2``: packer, config writer, detector, unpacker."""

    kind = "int"
    method = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, v2: bool = False):
        self.v2 = v2
        self.name = "gptq_v2" if v2 else "gptq"

    # -- checks, all run before any quantization work ----------------------------------------------------
    def check_spec(self, spec: QuantSpec, options: PackOptions) -> None:
        if spec.bits not in BITS:
            raise BadInput(
                f"--format {self.name} holds {'/'.join(map(str, BITS))}-bit weights, not {spec.bits}"
            )
        if spec.group_size not in GROUP_SIZES:
            raise BadInput(
                f"--format {self.name}: group size {spec.group_size} is not one of "
                f"{', '.join(map(str, GROUP_SIZES))}"
            )

    def check_layer(self, name: str, n: int, k: int, spec: QuantSpec) -> None:
        # qweight packs K and qzeros pack N into whole int32 words (3-bit: 32 values per 3 words)
        for dim, size in (("input", k), ("output", n)):
            if size * spec.bits % 32:
                raise BadInput(
                    f"{name}: {dim} width {size} cannot be packed into int32 words at {spec.bits} bits "
                    f"(needs a multiple of {32 // np.gcd(32, spec.bits)}); use --ignore"
                )

    def adapt(self, spec: QuantSpec, model_dtype: str) -> QuantSpec:
        """What the format imposes on the quantizer: fp16 scales; v1 cannot store a zero point of 0."""
        return replace(spec, scale_dtype="float16", min_zero=0 if (self.v2 or spec.sym) else 1)

    # -- tensors -------------------------------------------------------------------------------------------
    def pack(self, prefix: str, qt: QuantizedTensor, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        import torch
        qweight = packing.gptq_pack_qweight(qt.codes, qt.bits)
        try:
            qzeros = packing.gptq_pack_qzeros(qt.zeros.T, qt.bits, v2=self.v2)
        except ValueError as e:
            raise BadInput(f"{prefix}: {e}") from None
        return {
            f"{prefix}.qweight": torch.from_numpy(qweight),
            f"{prefix}.qzeros": torch.from_numpy(qzeros),
            f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(qt.scales.T)).to(torch.float16),
            f"{prefix}.g_idx": torch.from_numpy(qt.group_index()),
        }

    # -- config --------------------------------------------------------------------------------------------
    def quantization_config(self, plan: base.PackPlan) -> dict:
        o, default = plan.options, plan.default
        assert isinstance(default, QuantSpec)
        act_order, static_groups = o.act_order, o.static_groups
        damp, true_sequential = o.damp, o.true_sequential
        # desc_act tells readers to honour a non-sequential g_idx; static groups keep g_idx sequential, so
        # readers need no reordering (vLLM takes the faster path) while the act-order benefit stays
        desc_act = bool(act_order and not static_groups and default.group_size != -1)
        cfg = {
            "quant_method": "gptq",
            "bits": default.bits,
            "group_size": default.group_size,
            "desc_act": desc_act,
            "sym": default.sym,
            "checkpoint_format": self.name,
            "pack_dtype": "int32",
            "damp_percent": damp,
            "true_sequential": true_sequential,
            "static_groups": static_groups,
            "lm_head": o.lm_head,
            "meta": {
                "quantizer": [f"qconvert:{__version__}"],
                "method": o.method,
                "act_order": act_order,
                "damp_percent": damp,
                "static_groups": static_groups,
                "true_sequential": true_sequential,
                "mse": default.mse,
            },
        }
        dynamic = gptq_dynamic(default, plan.overrides, plan.skipped)  # type: ignore[arg-type]
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg

    def extra_files(self, quantization_config: dict) -> dict[str, dict]:
        return {"quantize_config.json": quantization_config}

    # -- reading -------------------------------------------------------------------------------------------
    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, base.TensorInfo], method: str) -> bool:
        return suffix == "qweight"  # after AWQ, which claims the qweights that are its own

    def detect(self, prefix: str, tensors: Mapping[str, base.TensorInfo], hints: dict[str, Any],
               read_small: base.ReadSmall | None) -> base.QuantizedLayer | None:
        qw, sc = tensors[f"{prefix}.qweight"], tensors.get(f"{prefix}.scales")
        qz, gi = tensors.get(f"{prefix}.qzeros"), tensors.get(f"{prefix}.g_idx")
        if sc is None or len(qw.shape) != 2 or len(sc.shape) != 2:
            return None
        n, groups = sc.shape[1], sc.shape[0]
        candidates = []
        if qz is not None and len(qz.shape) == 2 and n and (qz.shape[1] * 32) % n == 0:
            candidates.append(qz.shape[1] * 32 // n)
        if gi is not None and gi.shape and gi.shape[0] and (qw.shape[0] * 32) % gi.shape[0] == 0:
            candidates.append(qw.shape[0] * 32 // gi.shape[0])
        if isinstance(hints.get("bits"), int):
            candidates.append(hints["bits"])
        bits = next((b for b in candidates if 0 < b <= 32 and (qw.shape[0] * 32) % b == 0), None)
        k = gi.shape[0] if gi is not None and gi.shape else (qw.shape[0] * 32 // bits if bits else 0)
        group, gran = base.group_size(k, groups, hints.get("group_size"))
        names = base.members(prefix, self.suffixes, tensors)
        return base.layer(prefix, self.method, bits, group, n, k, names, tensors, gran)

    def unpack(self, src: base.Source, prefix: str, qc: dict) -> torch.Tensor:
        import torch
        qweight = src.read_numpy(f"{prefix}.qweight")
        scales = src.read_numpy(f"{prefix}.scales")
        qzeros = src.read_numpy(f"{prefix}.qzeros")
        bits = int(qc.get("bits", 4))
        k = qweight.shape[0] * 32 // bits
        if f"{prefix}.g_idx" in src.tensors:
            g_idx = src.read_numpy(f"{prefix}.g_idx").astype(np.int64)
        else:
            group = int(qc.get("group_size", -1))
            g_idx = np.arange(k) // (k if group == -1 else group)
        v2 = str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        return torch.from_numpy(packing.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v2))


def gptq_dynamic(default: QuantSpec, overrides: dict[str, QuantSpec], skipped: tuple[str, ...]
                 ) -> dict[str, dict]:
    """GPTQModel/vLLM ``dynamic``: ``+:regex`` per-module overrides, ``-:regex`` modules left unquantized."""
    dyn: dict[str, dict] = {}
    for prefix, spec in sorted(overrides.items()):
        diff = {
            key: getattr(spec, key)
            for key in ("bits", "group_size", "sym")
            if getattr(spec, key) != getattr(default, key)
        }
        if diff:
            dyn[f"+:^{re.escape(prefix)}$"] = diff
    for prefix in sorted(skipped):
        if prefix != LM_HEAD:  # lm_head is governed by the "lm_head" key
            dyn[f"-:^{re.escape(prefix)}$"] = {}
    return dyn


def _override_for(cfg: dict, prefix: str) -> dict | None:
    """The spec vLLM applies to ``prefix`` (None = left unquantized), honouring ``dynamic`` like vLLM does."""
    base = {key: cfg.get(key) for key in ("bits", "group_size", "sym", "desc_act")}
    for rule, values in (cfg.get("dynamic") or {}).items():
        sign, _, rx = rule.partition(":") if rule[:2] in ("+:", "-:") else ("+", ":", rule)
        if re.match(rx, prefix):
            return None if sign == "-" else {**base, **values}
    return base


def marlin_problems(cfg: dict, layers: dict[str, tuple[int, int]], tp: int = 1) -> list[str]:
    """Why vLLM would not run this GPTQ checkpoint on gptq_marlin (§1.8); empty list = compatible.

    ``layers`` maps each quantized Linear prefix to its (N, K); ``tp`` is the tensor-parallel degree (the
    shape
    rules apply per partition; we check the column-parallel N split and the row-parallel K split alike).
    """
    problems = []
    if cfg.get("quant_method") != "gptq":
        problems.append(f"quant_method is {cfg.get('quant_method')!r}, not 'gptq'")
    missing = [key for key in ("bits", "group_size", "sym", "desc_act") if key not in cfg]
    if missing:
        problems.append(f"config lacks {', '.join(missing)}")
        return problems
    for prefix, (n, k) in layers.items():
        spec = _override_for(cfg, prefix)
        if spec is None:
            continue
        bits, group, sym = spec["bits"], spec["group_size"], spec["sym"]
        if (bits, sym) not in MARLIN_BITS_SYM:
            problems.append(f"{prefix}: bits={bits} sym={sym} (marlin needs 4 or 8 bit symmetric)")
        if group not in MARLIN_GROUP_SIZES:
            problems.append(f"{prefix}: group_size {group} not in {MARLIN_GROUP_SIZES}")
        n_part, k_part = n // tp, k // tp
        if n % tp or n_part % MARLIN_N_MULTIPLE:
            problems.append(f"{prefix}: output size {n} (/{tp}) is not a multiple of {MARLIN_N_MULTIPLE}")
        if k % tp or k_part % MARLIN_K_MULTIPLE:
            problems.append(f"{prefix}: input size {k} (/{tp}) is not a multiple of {MARLIN_K_MULTIPLE}")
        if group not in (-1, None) and group > 0 and k_part % group:
            problems.append(f"{prefix}: input size {k_part} is not a multiple of group_size {group}")
    return problems
