"""Recognise quantized-Linear layouts in safetensors checkpoints and summarise quantization configs.

Per module prefix (`model.layers.0.self_attn.q_proj`), the tensor suffixes and shapes say which layout it is
(/work/shared/reference/checkpoint-formats.md §1, §3.1, §4.2-4.3, §5); N = out_features, K = in_features:

* GPTQ:    qweight I32 [K*b/32, N], qzeros I32 [G, N*b/32], scales [G, N], g_idx I32 [K]
* AWQ GEMM: qweight I32 [K, N*b/32], qzeros I32 [G, N*b/32], scales [G, N]     (no g_idx)
* compressed-tensors pack-quantized: weight_packed I32 [N, ceil(K*b/32)], weight_scale [N, G],
  weight_shape I64 [2] = [N, K], optional weight_zero_point [ceil(N*b/32), G], weight_g_idx [K]
  (nvfp4-pack-quantized: weight_packed U8 [N, K/2] + weight_global_scale)
* FP8:     weight F8_E4M3/F8_E5M2 [N, K] + weight_scale (or DeepSeek-style weight_scale_inv) (+ input_scale)
* INT8:    weight I8 [N, K] + weight_scale (compressed-tensors int-quantized, W8A8)

Shapes decide GPTQ vs AWQ and the bit width (the config may carry per-module overrides, so the shapes win);
the config only fills in what shapes cannot say (group size when K is not a multiple of the group).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class _Info(Protocol):
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
               "weight_global_scale", "input_global_scale", "input_scale")
FP8_SUFFIXES = ("weight", "weight_scale", "weight_scale_inv", "input_scale")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")


@dataclass
class QuantizedLayer:
    name: str  # module prefix, e.g. model.layers.0.mlp.down_proj
    method: str  # gptq | awq | compressed-tensors | fp8 | int8
    bits: int | None
    group_size: int | None  # -1 = one group per output channel; None = not grouped / unknown
    parameters: int  # logical weights K*N (not packed element counts)
    nbytes: int  # all of the layer's quantization tensors
    tensors: list[str] = field(default_factory=list)
    shape: tuple[int, int] | None = None  # logical [N, K]
    granularity: str | None = None  # tensor | channel | group | block

    @property
    def bits_per_weight(self) -> float | None:
        return self.nbytes * 8 / self.parameters if self.parameters else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
            "parameters": self.parameters, "nbytes": self.nbytes,
            "bits_per_weight": None if self.bits_per_weight is None else round(self.bits_per_weight, 4),
            "shape": None if self.shape is None else list(self.shape), "granularity": self.granularity,
            "tensors": self.tensors,
        }


def _group_size(k: int, groups: int, hint: Any) -> tuple[int | None, str]:
    """Group size from K and the number of groups; the config's value wins when it is consistent."""
    if isinstance(hint, int) and hint > 0 and -(-k // hint) == groups:
        return hint, "group" if groups > 1 else "channel"
    if groups == 1:
        return -1, "channel"
    return (k // groups if k and k % groups == 0 else None), "group"


def _members(prefix: str, suffixes: tuple[str, ...], tensors: Mapping[str, _Info]) -> list[str]:
    return [f"{prefix}.{s}" for s in suffixes if f"{prefix}.{s}" in tensors]


def _layer(prefix: str, method: str, bits: int | None, group: int | None, n: int, k: int,
           names: list[str], tensors: Mapping[str, _Info], granularity: str | None) -> QuantizedLayer:
    nbytes = sum(tensors[m].nbytes for m in names)
    return QuantizedLayer(prefix, method, bits, group, n * k, nbytes, names, (n, k), granularity)


def _gptq(prefix: str, tensors: Mapping[str, _Info], hints: dict[str, Any]) -> QuantizedLayer | None:
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
    group, gran = _group_size(k, groups, hints.get("group_size"))
    return _layer(prefix, "gptq", bits, group, n, k, _members(prefix, GPTQ_SUFFIXES, tensors), tensors, gran)


def _awq(prefix: str, tensors: Mapping[str, _Info], hints: dict[str, Any]) -> QuantizedLayer | None:
    qw, sc = tensors[f"{prefix}.qweight"], tensors.get(f"{prefix}.scales")
    if sc is None or len(qw.shape) != 2 or len(sc.shape) != 2 or not sc.shape[1]:
        return None
    k, n, groups = qw.shape[0], sc.shape[1], sc.shape[0]
    bits = qw.shape[1] * 32 // n if (qw.shape[1] * 32) % n == 0 else hints.get("bits")
    group, gran = _group_size(k, groups, hints.get("group_size"))
    names = _members(prefix, GPTQ_SUFFIXES[:3], tensors)
    return _layer(prefix, "awq", bits, group, n, k, names, tensors, gran)


def _packed_bits(k: int, cols: int, hint: Any) -> int | None:
    """b with ceil(K*b/32) == cols (dense bit stream); the config's bits win when they fit."""
    fits = [b for b in range(1, 33) if -(-k * b // 32) == cols]
    if isinstance(hint, int) and hint in fits:
        return hint
    return fits[0] if fits else None


def _compressed(prefix: str, tensors: Mapping[str, _Info], hints: dict[str, Any],
                read_small: Callable[[str], Any] | None) -> QuantizedLayer | None:
    wp = tensors[f"{prefix}.weight_packed"]
    sc = tensors.get(f"{prefix}.weight_scale")
    if len(wp.shape) != 2:
        return None
    n, cols = wp.shape
    names = _members(prefix, CT_SUFFIXES, tensors)
    if wp.dtype == "U8":  # nvfp4 / mxfp4: two 4-bit values per byte
        k, bits = cols * 2, 4
    else:
        k = _logical_k(prefix, tensors, read_small, n) or (cols * 32 // hints["bits"]
                                                           if isinstance(hints.get("bits"), int) else 0)
        bits = _packed_bits(k, cols, hints.get("bits")) if k else None
    groups = sc.shape[1] if sc is not None and len(sc.shape) == 2 else 1
    group, gran = _group_size(k, groups, hints.get("group_size"))
    return _layer(prefix, "compressed-tensors", bits, group, n, k, names, tensors, gran)


def _logical_k(prefix: str, tensors: Mapping[str, _Info], read_small: Callable[[str], Any] | None,
               n: int) -> int | None:
    name = f"{prefix}.weight_shape"
    info = tensors.get(name)
    if info is None or read_small is None or info.nbytes > 64:
        return None
    try:
        values = [int(v) for v in read_small(name).reshape(-1)]
    except Exception:  # noqa: BLE001 - an unreadable shape only costs us the logical K
        return None
    return values[1] if len(values) == 2 and values[0] == n and values[1] > 0 else None


def _scaled_weight(prefix: str, tensors: Mapping[str, _Info], hints: dict[str, Any],
                   method: str) -> QuantizedLayer | None:
    w = tensors[f"{prefix}.weight"]
    if len(w.shape) != 2:
        return None
    n, k = w.shape
    sc = tensors.get(f"{prefix}.weight_scale_inv")
    if sc is None:
        sc = tensors.get(f"{prefix}.weight_scale")
    shape = sc.shape if sc is not None else ()
    if math.prod(shape) <= 1:
        group, gran = None, "tensor"
    elif len(shape) == 2 and shape[0] == n:
        group, gran = _group_size(k, shape[1], hints.get("group_size"))
    else:
        group, gran = None, "block"
    names = _members(prefix, FP8_SUFFIXES, tensors)
    return _layer(prefix, method, 8, group, n, k, names, tensors, gran)


def find_quantized_layers(tensors: Mapping[str, _Info], quant_config: dict[str, Any] | None = None,
                          read_small: Callable[[str], Any] | None = None) -> list[QuantizedLayer]:
    """Quantized Linear layers in name order of their first tensor. `read_small(name)` reads tiny tensors
    (compressed-tensors weight_shape) and may be None."""
    all_hints = weight_hints(quant_config)
    method = str((quant_config or {}).get("quant_method", "")).lower()

    def hints(layer_method: str) -> dict[str, Any]:
        # the config describes its own method's layers only (an fp8 lm_head in a GPTQ model is not grouped)
        return all_hints if method in (layer_method, "compressed-tensors") else {}

    layers: list[QuantizedLayer] = []
    seen: set[str] = set()
    for name, info in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if not prefix or prefix in seen:
            continue
        layer = None
        if suffix == "qweight":
            is_gptq = f"{prefix}.g_idx" in tensors or (
                f"{prefix}.scales" in tensors and tensors[f"{prefix}.scales"].shape[-1:] == info.shape[-1:])
            if method == "awq" or (method != "gptq" and not is_gptq):
                layer = _awq(prefix, tensors, hints("awq"))
            else:
                layer = _gptq(prefix, tensors, hints("gptq"))
        elif suffix == "weight_packed":
            layer = _compressed(prefix, tensors, hints("compressed-tensors"), read_small)
        elif suffix == "weight" and info.dtype in FP8_DTYPES:
            layer = _scaled_weight(prefix, tensors, hints("fp8"), "fp8")
        elif suffix == "weight" and info.dtype == "I8" and f"{prefix}.weight_scale" in tensors:
            layer = _scaled_weight(prefix, tensors, hints("int8"), "int8")
        if layer is not None:
            seen.add(prefix)
            layers.append(layer)
    return layers


def _ct_weights(qc: dict[str, Any]) -> list[dict[str, Any]]:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):
        return []
    return [g["weights"] for g in groups.values()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict)]


def _ct_activations(group: Any) -> str | None:
    """A config group's input-activation scheme in a few words ("float8 static tensor", "float8 dynamic
    group 128"); None for weight-only quantization."""
    x = group.get("input_activations") if isinstance(group, dict) else None
    if not isinstance(x, dict):
        return None
    kind = f"{x.get('type', '?')}{x.get('num_bits', '?')}"
    dynamic = x.get("dynamic")
    how = "dynamic" if dynamic is True else "static" if dynamic is False else str(dynamic)  # or "local"
    words = [kind, how, str(x.get("strategy", "?"))]
    if x.get("strategy") in ("group", "tensor_group"):
        words.append(str(x.get("group_size")))
    return " ".join(words)


def _block(value: Any) -> Any:
    """A block_structure as a hashable value: [128, 128] (or older compressed-tensors' "128x128") as given."""
    if isinstance(value, list | tuple):
        return tuple(value) if all(isinstance(v, int) for v in value) else str(value)
    return value if isinstance(value, str | int) else None


def _one(values: list[Any]) -> Any:
    """The common value, or the list of distinct values when groups disagree, or None."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return distinct[0] if len(distinct) == 1 else (distinct or None)


def weight_hints(qc: dict[str, Any] | None) -> dict[str, Any]:
    """bits / group_size from a quantization config, for the shape inference above."""
    summary = summarize_quantization_config(qc) if qc else None
    if not summary:
        return {}
    return {k: summary[k] for k in ("bits", "group_size") if isinstance(summary.get(k), int)}


def summarize_quantization_config(qc: dict[str, Any] | None) -> dict[str, Any] | None:
    """{method, bits, group_size, format, sym, desc_act, ...extras} from config.json's quantization_config
    (or quantize_config.json). Keys a method does not have are None."""
    if not isinstance(qc, dict) or not qc:
        return None
    # AutoGPTQ's quantize_config.json / AutoAWQ's quant_config.json may lack quant_method
    guess = "gptq" if "desc_act" in qc else "awq" if "w_bit" in qc or "zero_point" in qc else "unknown"
    method = str(qc.get("quant_method") or qc.get("method") or guess).lower()
    s: dict[str, Any] = {"method": method, "bits": qc.get("bits", qc.get("w_bit")),
                         "group_size": qc.get("group_size", qc.get("q_group_size")),
                         "format": qc.get("checkpoint_format", qc.get("format", qc.get("version"))),
                         "sym": qc.get("sym"), "desc_act": qc.get("desc_act")}
    if method == "awq":
        zero_point = qc.get("zero_point")
        s["zero_point"] = zero_point
        s["sym"] = None if zero_point is None else not zero_point
    elif method == "compressed-tensors":
        weights = _ct_weights(qc)
        s["bits"] = _one([w.get("num_bits") for w in weights])
        s["group_size"] = _one([-1 if w.get("strategy") == "channel" else w.get("group_size")
                                for w in weights])
        s["sym"] = _one([w.get("symmetric") for w in weights])
        s["desc_act"] = _one([w.get("actorder") for w in weights])
        s["type"] = _one([w.get("type") for w in weights])
        s["strategy"] = _one([w.get("strategy") for w in weights])
        blocks = _one([_block(w.get("block_structure")) for w in weights])
        s["block_structure"] = list(blocks) if isinstance(blocks, tuple) else blocks
        groups = qc.get("config_groups")
        groups = groups.values() if isinstance(groups, dict) else []
        acts = list(dict.fromkeys(_ct_activations(g) for g in groups))  # weight-only groups count too (None)
        s["activations"] = acts[0] if len(acts) == 1 else acts or None
        s["ignore"] = qc.get("ignore")
    elif method == "fp8":
        s["bits"] = s["bits"] or 8
        s["format"] = s["format"] or qc.get("fmt")
        s["activation_scheme"] = qc.get("activation_scheme")
        s["weight_block_size"] = qc.get("weight_block_size")
        s["ignore"] = qc.get("ignored_layers", qc.get("modules_to_not_convert"))
    elif method == "gptq":
        s["format"] = s["format"] or "gptq"
    return s


def summarize_layers(layers: list[QuantizedLayer]) -> dict[str, Any] | None:
    """A quantization summary inferred from the tensors alone (no config available)."""
    if not layers:
        return None
    counts = Counter((q.method, q.bits, q.group_size) for q in layers)
    (method, bits, group), _ = counts.most_common(1)[0]
    return {"method": method, "bits": bits, "group_size": group, "format": None, "sym": None,
            "desc_act": None, "source": "tensors"}
