"""The data behind `qconvert inspect`: one JSON-ready dict per checkpoint (safetensors or GGUF).

`inspect(source)` reads headers only (plus, for compressed-tensors, the 16-byte `weight_shape` tensors), so
it is fast on files of any size. `qconvert inspect --json` prints exactly this dict.

Schema of `qconvert inspect --json` (one JSON object):

    format            "safetensors" | "gguf"
    source            the argument as given (path or hub id)
    path              the local file or directory read (for a hub id: the snapshot directory in the HF cache)
    name              model name (directory name, hub id tail, or the .gguf file stem)
    files             [str] the .safetensors shards / the .gguf file read
    metadata          object. safetensors: the merged `__metadata__` string map of all shards.
                      gguf: every KV pair, key -> value; scalars and strings as JSON values, arrays of
                      up to 16 items as lists, longer arrays abbreviated to
                      {"type": "array", "element_type": "STRING", "count": 49152, "head": [first 8 items]}
    config            safetensors: config.json as an object ({} if absent); gguf: null
    tokenizer_files   safetensors: names of the tokenizer/chat-template files found; gguf: []
    gguf              gguf: {"version", "alignment", "tensor_data_offset", "kv_count"}; safetensors: null
    tensors           [{"name", "type", "shape", "nbytes"}] in file order. type: the safetensors dtype
                      ("BF16", "I32", "F8_E4M3", ...) or the ggml type name ("Q4_K", "F32", ...).
                      shape: numpy/HF order [rows, cols]; for GGUF this is the reverse of ggml's ne order
                      (a token_embd with ne = [576, 49152] is reported as [49152, 576]).
    tensor_count      len(tensors)
    total_bytes       sum of tensor nbytes (tensor data only, headers excluded)
    parameters        logical parameter count: element counts, except that each quantized safetensors
                      layer counts its logical K*N weights (not the packed int32 elements) and its
                      scales/zeros/g_idx count 0
    bits_per_weight   total_bytes * 8 / parameters (null if there are no parameters)
    type_histogram    {type: {"count", "parameters", "nbytes"}}, largest nbytes first; "parameters" follows
                      the rule above (a quantized layer's K*N is attributed to its packed weight tensor)
    quantization      null if not quantized, else {"method", "bits", "group_size", "format", "sym",
                      "desc_act", "source", ...method extras}. safetensors: from config.json
                      quantization_config / quantize_config.json (source names the file) or inferred from
                      the tensors (source "tensors"); AWQ adds "zero_point"; compressed-tensors adds "type",
                      "strategy", "block_structure" (block strategy), "activations" (input activations,
                      e.g. "float8 static tensor"; null if weight-only), "ignore" (per-group values become
                      lists when groups differ); fp8 adds
                      "activation_scheme", "weight_block_size", "ignore". gguf (only if some tensor has a
                      block type): {"method": "ggml", "format": "gguf v3", "file_type": "Q4_K_M" (from
                      general.file_type), "quantization_version", "source": "gguf", and bits / group_size /
                      sym / desc_act = null}. group_size -1 means one group per output channel.
    quantized_layers  [{"name" (module prefix), "method" (gptq | awq | compressed-tensors | fp8 | int8),
                      "bits", "group_size", "parameters" (logical K*N), "nbytes" (all the layer's
                      quantization tensors), "bits_per_weight" (nbytes*8/parameters), "shape" ([N, K]),
                      "granularity" (tensor | channel | group | block), "tensors" ([names])}];
                      [] for GGUF (its per-tensor types are in `tensors`)
    experts           null for a dense model, else {"count" (routed experts: GGUF {arch}.expert_count, or
                      config.json num_experts / num_local_experts / n_routed_experts), "used" (experts per
                      token, or null), "stacks": [{"name", "type", "experts", "nbytes_per_expert"}]}: one
                      entry per expert stack, every expert of which has that type. GGUF: each 3-D `*_exps.*`
                      tensor; safetensors: each per-expert Linear, its expert index written `*`
                      (model.layers.0.mlp.experts.*.gate_proj.weight)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.formats.packed import (
    QuantizedLayer,
    find_quantized_layers,
    summarize_layers,
    summarize_quantization_config,
)
from qconvert.load.checkpoint import Checkpoint, open_checkpoint
from qconvert.load.gguf_file import FILE_TYPES, GGML_TYPES, GGUFField, GGUFFile, ValueType, is_gguf

ARRAY_LIMIT = 16  # longer GGUF arrays are abbreviated
ARRAY_HEAD = 8


def _scalar(v: Any) -> Any:
    # NaN/inf stay floats here (the tables print them); strict_json makes them null for --json
    return v.item() if isinstance(v, np.generic) else v


def strict_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as strict JSON values: every NaN/inf becomes null, and `non_finite` maps each such
    field's path (e.g. "metadata.llama.rope.freq_base") to the value it held ("nan", "inf", "-inf")."""
    found: dict[str, str] = {}

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            found[path] = str(v)
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v

    out = walk(summary, "")
    if found:
        out["non_finite"] = found
    return out


def _f32(v: float) -> float:
    """Shortest decimal that reads back as the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v))) if math.isfinite(v) else v


def _items(field: GGUFField) -> list[Any]:
    if field.item_type == ValueType.ARRAY:
        return [gguf_value(f) for f in field.value]
    values = field.value.tolist() if isinstance(field.value, np.ndarray) else field.value
    if field.item_type == ValueType.FLOAT32:
        values = [_f32(v) for v in values]
    return [_scalar(v) for v in values]


def gguf_value(field: GGUFField) -> Any:
    """JSON form of a GGUF KV value, long arrays abbreviated (see the module docstring)."""
    if field.type == ValueType.FLOAT32:
        return _scalar(_f32(field.value))
    if field.type != ValueType.ARRAY:
        return _scalar(field.value)
    count = len(field.value)
    if count <= ARRAY_LIMIT:
        return _items(field)
    head = GGUFField(field.type, field.value[:ARRAY_HEAD], field.item_type)
    return {"type": "array", "element_type": field.item_type.name, "count": count, "head": _items(head)}


def describe_value(value: Any, limit: int = 160) -> str:
    """One-line text for a metadata value: '[49152 strings] ['<|endoftext|>', ...]', long strings cut."""
    if isinstance(value, dict) and value.get("type") == "array":
        kind = "strings" if value["element_type"] == "STRING" else f"{value['element_type'].lower()} values"
        head = ", ".join(repr(v) for v in value["head"][:3])
        text = f"[{value['count']} {kind}] [{head}, ...]"
    elif isinstance(value, str):
        text = value.encode("unicode_escape").decode("ascii") if "\n" in value or "\t" in value else value
        if len(text) > limit:
            return f"{text[:limit]}... ({len(value)} chars)"
    else:
        text = repr(value) if isinstance(value, list) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _histogram(rows: list[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
    hist: dict[str, dict[str, int]] = {}
    for type_, params, nbytes in rows:
        h = hist.setdefault(type_, {"count": 0, "parameters": 0, "nbytes": 0})
        h["count"] += 1
        h["parameters"] += params
        h["nbytes"] += nbytes
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]["nbytes"]))


def _totals(summary: dict[str, Any], rows: list[tuple[str, int, int]]) -> dict[str, Any]:
    total = sum(r[2] for r in rows)
    params = sum(r[1] for r in rows)
    summary.update(tensor_count=len(summary["tensors"]), total_bytes=total, parameters=params,
                   bits_per_weight=round(total * 8 / params, 4) if params else None,
                   type_histogram=_histogram(rows))
    return summary


def _tensor_params(ckpt: Checkpoint, layers: list[QuantizedLayer]) -> dict[str, int]:
    """Logical parameters per tensor: a layer's K*N goes to its first (packed weight) tensor."""
    params = {name: t.numel for name, t in ckpt.tensors.items()}
    for layer in layers:
        for i, name in enumerate(layer.tensors):
            params[name] = layer.parameters if i == 0 else 0
    return params


def _safetensors_quantization(ckpt: Checkpoint, layers: list[QuantizedLayer]) -> dict[str, Any] | None:
    qc = ckpt.quantization_config
    summary = summarize_quantization_config(qc)
    if summary is not None:
        summary["source"] = ckpt.quantization_config_file
        return summary
    meta = ckpt.metadata
    if "gptq_bits" in meta:  # AutoGPTQ writes its config into the safetensors metadata too
        return {"method": "gptq", "bits": _int(meta.get("gptq_bits")),
                "group_size": _int(meta.get("gptq_group_size")), "format": meta.get("gptq_checkpoint_format"),
                "sym": None,
                "desc_act": meta.get("gptq_desc_act"), "source": "safetensors metadata"}
    return summarize_layers(layers)


def _int(text: str | None) -> int | str | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return text


def inspect_checkpoint(ckpt: Checkpoint, source: str) -> dict[str, Any]:
    layers = find_quantized_layers(ckpt.tensors, ckpt.quantization_config, ckpt.read_raw)
    params = _tensor_params(ckpt, layers)
    tensors = [{"name": t.name, "type": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
               for t in ckpt.tensors.values()]
    summary = {
        "format": "safetensors", "source": source, "path": str(ckpt.path), "name": ckpt.name,
        "files": [str(f) for f in ckpt.files], "metadata": dict(ckpt.metadata), "config": ckpt.config,
        "tokenizer_files": sorted(ckpt.tokenizer_files), "gguf": None, "tensors": tensors,
        "quantization": _safetensors_quantization(ckpt, layers),
        "quantized_layers": [q.as_dict() for q in layers], "experts": _checkpoint_experts(ckpt),
    }
    rows = [(t.dtype, params[t.name], t.nbytes) for t in ckpt.tensors.values()]
    return _totals(summary, rows)


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def _int_or_none(v: Any) -> int | None:
    v = _scalar(v)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _experts(count: Any, used: Any, stacks: list[dict[str, Any]]) -> dict[str, Any] | None:
    n = _int_or_none(count)
    if n is None and not stacks:
        return None
    return {"count": n, "used": _int_or_none(used), "stacks": stacks}


def _gguf_experts(g: GGUFFile) -> dict[str, Any] | None:
    arch = g.value("general.architecture")
    prefix = arch if isinstance(arch, str) else ""
    stacks = [{"name": t.name, "type": t.type_name, "experts": int(t.shape[0]),
               "nbytes_per_expert": t.nbytes // int(t.shape[0])}
              for t in g.tensors.values() if "_exps." in t.name and len(t.shape) == 3 and t.shape[0] > 0]
    return _experts(g.value(f"{prefix}.expert_count"), g.value(f"{prefix}.expert_used_count"), stacks)


def _checkpoint_experts(ckpt: Checkpoint) -> dict[str, Any] | None:
    from qconvert.arch.hparams import find
    from qconvert.load.config import text_config

    groups: dict[str, list[Any]] = {}
    for name, t in ckpt.tensors.items():
        if _EXPERT_INDEX.search(name):
            groups.setdefault(_EXPERT_INDEX.sub(".experts.*.", name, count=1), []).append(t)
    stacks = [{"name": key, "type": "/".join(sorted({t.dtype for t in ts})), "experts": len(ts),
               "nbytes_per_expert": max(t.nbytes for t in ts)} for key, ts in groups.items()]
    cfg = text_config(ckpt.config) if isinstance(ckpt.config, dict) else {}
    count = find(cfg, ["num_local_experts", "num_experts", "n_routed_experts"])
    used = find(cfg, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])
    return _experts(count, used, stacks)


def _gguf_quantization(g: GGUFFile) -> dict[str, Any] | None:
    quantized = [t for t in g.tensors.values() if GGML_TYPES[t.type_id][1] > 1]
    if not quantized:
        return None
    ftype = g.value("general.file_type")
    if isinstance(ftype, int) and ftype in FILE_TYPES:
        file_type: Any = FILE_TYPES[ftype]
    elif ftype is not None:
        file_type = _scalar(ftype)
    else:  # no general.file_type: name the dominant block type
        file_type = max(quantized, key=lambda t: t.nbytes).type_name
    return {"method": "ggml", "bits": None, "group_size": None, "format": f"gguf v{g.version}", "sym": None,
            "desc_act": None, "file_type": file_type,
            "quantization_version": _scalar(g.value("general.quantization_version")), "source": "gguf"}


def inspect_gguf(path: str | Path, source: str | None = None) -> dict[str, Any]:
    with GGUFFile(path) as g:
        tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "nbytes": t.nbytes}
                   for t in g.tensors.values()]
        summary = {
            "format": "gguf", "source": str(path) if source is None else source, "path": str(g.path),
            "name": g.path.stem, "files": [str(g.path)],
            "metadata": {k: gguf_value(f) for k, f in g.fields.items()},
            "config": None, "tokenizer_files": [],
            "gguf": {"version": g.version, "alignment": g.alignment, "tensor_data_offset": g.data_offset,
                     "kv_count": len(g.fields)},
            "tensors": tensors, "quantization": _gguf_quantization(g), "quantized_layers": [],
            "experts": _gguf_experts(g),
        }
        rows = [(t.type_name, t.numel, t.nbytes) for t in g.tensors.values()]
    return _totals(summary, rows)


def inspect(source: str | Path) -> dict[str, Any]:
    """Summary dict (schema above) of a .gguf file, a .safetensors file, an HF directory or a hub id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and (path.suffix.lower() == ".gguf" or is_gguf(path)):
        return inspect_gguf(path, text)
    with open_checkpoint(source) as ckpt:
        return inspect_checkpoint(ckpt, text)
