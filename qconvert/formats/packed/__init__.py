"""Packed safetensors formats: one module per format, one registry, every list derived from it.

    FORMATS           every --format writer (a name has one writer per kind: int, fp8, and one per --scheme
                      kind: nvfp4, mxfp4, w8a8)
    LAYOUTS           every layout we recognise when reading (inspect, eval --loader unpack)
    packed_format()   the writer of (--format name, method kind)
    find_quantized_layers() / find_packed() / dense_tensors()   the read side, through the layouts
    dense.dense_source()                        a quantized checkpoint read as the dense one (every command)
    summarize_quantization_config()             config.json's quantization_config in a few keys

Adding a format: one module implementing ``base.PackedFormat``, one line in FORMATS (and LAYOUTS if it reads
a new tensor layout), and its tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from qconvert.errors import BadInput
from qconvert.formats.packed.awq import AWQFormat
from qconvert.formats.packed.base import Layout, PackedFormat, QuantizedLayer, ReadSmall, Source, TensorInfo
from qconvert.formats.packed.compressed_tensors import CompressedTensorsFormat
from qconvert.formats.packed.fp4 import MXFP4Format, NVFP4Format
from qconvert.formats.packed.fp8 import CompressedTensorsFP8Format, VLLMFP8Format
from qconvert.formats.packed.gptq import GPTQFormat
from qconvert.formats.packed.int8 import Int8Format, Int8Layout

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

FORMATS: tuple[PackedFormat, ...] = (
    GPTQFormat(v2=False),
    GPTQFormat(v2=True),
    CompressedTensorsFormat(),
    AWQFormat(),
    CompressedTensorsFP8Format(),
    VLLMFP8Format(),
    NVFP4Format(),
    MXFP4Format(),
    Int8Format(),
)
FORMAT_NAMES = tuple(dict.fromkeys(f.name for f in FORMATS))
# read side, in claim order: AWQ before GPTQ (both store a qweight; AWQ claims only the ones that are its
# own), the FP4 layouts before pack-quantized (all store a weight_packed; FP4's is uint8 with its own scales)
LAYOUTS: tuple[Layout, ...] = (AWQFormat(), GPTQFormat(), NVFP4Format(), MXFP4Format(),
                               CompressedTensorsFormat(), VLLMFP8Format(), Int8Layout())
# tensors that only serve packed Linears or activation quantization: never handed to a dense model
AUX_SUFFIXES = tuple(dict.fromkeys(
    [s for layout in LAYOUTS for s in layout.suffixes if s != "weight"]
    + ["output_scale", "k_scale", "v_scale"]))


def format_names(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in FORMATS if f.kind == kind)


def packed_format(name: str, kind: str, what: str) -> PackedFormat:
    """The --format writer of results of `kind` ("int", "fp8", or a --scheme's kind); `what` names the
    choice that fixed the kind ("--method rtn", "--scheme w8a8") in the refusal."""
    for f in FORMATS:
        if f.name == name and f.kind == kind:
            return f
    raise BadInput(f"{what} writes --format {' or '.join(format_names(kind))}, not {name!r}")


def _layout(prefix: str, suffix: str, tensors: Mapping[str, TensorInfo], method: str) -> Layout | None:
    return next((lay for lay in LAYOUTS if lay.claims(prefix, suffix, tensors, method)), None)


def find_quantized_layers(tensors: Mapping[str, TensorInfo], quant_config: dict[str, Any] | None = None,
                          read_small: ReadSmall | None = None) -> list[QuantizedLayer]:
    """Quantized Linear layers in name order of their first tensor. `read_small(name)` reads tiny tensors
    (compressed-tensors weight_shape) and may be None. Shapes decide the layout and bit width (a config may
    carry per-module overrides, so the shapes win); the config fills in what shapes cannot say."""
    all_hints = weight_hints(quant_config)
    method = _method(quant_config)
    layers: list[QuantizedLayer] = []
    seen: set[str] = set()
    for name in tensors:
        prefix, _, suffix = name.rpartition(".")
        if not prefix or prefix in seen:
            continue
        lay = _layout(prefix, suffix, tensors, method)
        if lay is None:
            continue
        # the config describes its own method's layers only (an fp8 lm_head in a GPTQ model is not grouped)
        hints = all_hints if method in (lay.method, "compressed-tensors") else {}
        found = lay.detect(prefix, tensors, hints, read_small)
        if found is not None:
            seen.add(prefix)
            layers.append(found)
    return layers


def _method(qc: dict[str, Any] | None) -> str:
    return str((qc or {}).get("quant_method", "")).lower()


def find_packed(tensors: Mapping[str, TensorInfo], qc: dict[str, Any] | None) -> dict[str, Layout]:
    """module prefix -> the layout that claims its tensors, in name order of their first tensor."""
    method = _method(qc)
    packed: dict[str, Layout] = {}
    for name in tensors:
        prefix, _, suffix = name.rpartition(".")
        lay = _layout(prefix, suffix, tensors, method) if prefix and prefix not in packed else None
        if lay is not None:
            packed[prefix] = lay
    return packed


def dense_tensors(src: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """Every float parameter of a quantized checkpoint as dense float32, packed Linears unpacked by our
    reference kernels and not rounded (what eval --loader unpack builds the model from). Activation scales are
    dropped: the dense model is the weight-only dequantization. The same view (dense.DenseView) every other
    command reads a quantized source through, in float32."""
    from qconvert.formats.packed.dense import DenseView

    view = DenseView(src, dtype="F32")
    for name in view.tensors:
        yield name, view.read(name).float()


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


def _ct_preset(group: Any) -> str | None:
    """The llm-compressor preset a config group is (compressed-tensors quant_scheme.py), for the presets
    qconvert writes; None for anything else."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        return None
    w, x = group["weights"], group.get("input_activations")
    x = x if isinstance(x, dict) else None
    weights = (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("group_size"))
    inputs = None if x is None else (x.get("type"), x.get("num_bits"), x.get("strategy"), x.get("dynamic"))
    for name, (want_w, want_x) in _CT_PRESETS.items():
        if weights == want_w and inputs == want_x:
            return name
    return None


# preset -> ((weights type, bits, strategy, group), (inputs type, bits, strategy, dynamic) or None)
_CT_PRESETS: dict[str, tuple[tuple, tuple | None]] = {
    "NVFP4A16": (("float", 4, "tensor_group", 16), None),
    "NVFP4": (("float", 4, "tensor_group", 16), ("float", 4, "tensor_group", "local")),
    "MXFP4A16": (("float", 4, "group", 32), None),
    "MXFP4": (("float", 4, "group", 32), ("float", 4, "group", True)),
    "W8A8": (("int", 8, "channel", None), ("int", 8, "token", True)),
    "FP8_DYNAMIC": (("float", 8, "channel", None), ("float", 8, "token", True)),
    "FP8": (("float", 8, "tensor", None), ("float", 8, "tensor", False)),
    "FP8_BLOCK": (("float", 8, "block", None), ("float", 8, "group", True)),
}


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
        groups = list(groups)
        acts = list(dict.fromkeys(_ct_activations(g) for g in groups))  # weight-only groups count too (None)
        s["activations"] = acts[0] if len(acts) == 1 else acts or None
        s["scale_dtype"] = _one([w.get("scale_dtype") for w in weights])
        s["scheme"] = _one([_ct_preset(g) for g in groups])
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
