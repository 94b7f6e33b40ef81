"""`qconvert convert ADAPTER_DIR --to gguf --base MODEL`: a PEFT LoRA adapter as a llama.cpp adapter GGUF.

What convert_lora_to_gguf.py writes (byte for byte on the tests' adapters): general.type ``adapter``,
``adapter.type`` ``lora``, the model card's general.* (gguf-py's Metadata of the adapter directory),
``adapter.lora.alpha``, the quantization version; per targeted Linear, in the adapter file's order,
``<gguf name>.lora_a`` (A [r, in]) and ``<gguf name>.lora_b`` (B [out, r], its rows transformed as the
family's converter transforms the base weight's: llama's Q/K permutation). llama.cpp scales the product by
alpha / r itself (rsLoRA's alpha / sqrt(r) it does not know: refused). The base is read for its config and
its tensor shapes only (an adapter for another base is refused before anything is written).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from qconvert.arch.table import resolve
from qconvert.arch.tensors import gguf_tensor_name, lora_b_transform
from qconvert.errors import BadInput
from qconvert.formats.gguf.writer import GGUF_QUANT_VERSION, GGUFOutput, write_gguf
from qconvert.load.config import text_config

Q = gguf.GGMLQuantizationType
TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}  # convert_lora_to_gguf.py's --outtype f32 / f16 / bf16


@dataclass
class LoraGGUFResult:
    source: Path
    output: Path
    architecture: str
    n_pairs: int
    rank: str
    alpha: float
    file_type: str
    nbytes: int
    seconds: float


@dataclass
class _Tensor:
    name: str                      # gguf name
    source: str                    # adapter tensor name
    shape: tuple[int, ...]         # numpy order
    transform: object = None       # row transform of B (or None)


def default_output(adapter: Path, type_name: str) -> Path:
    return Path.cwd() / f"{adapter.resolve().name}-{type_name}-LoRA.gguf"


def _plan(adapter, spec, cfg: dict, base_cfg: dict) -> list[_Tensor]:
    if adapter.config.get("use_rslora"):
        raise BadInput("use_rslora is set: llama.cpp scales a LoRA by alpha / r, not alpha / sqrt(r); merge "
                       "it instead (convert MODEL --lora ADAPTER_DIR)", adapter.path)
    planned: list[_Tensor] = []
    for weight, pair in adapter.pairs.items():
        if spec.experts is not None and f".{spec.experts.module}." in f".{weight}":
            raise BadInput(f"LoRA target {weight}: expert Linears are stacked in the GGUF; an adapter on "
                           "them is not supported (merge it: convert MODEL --lora ADAPTER_DIR)", adapter.path)
        name = gguf_tensor_name(base_cfg, weight)
        if name is None:
            raise BadInput(f"LoRA target {weight} has no {spec.name} GGUF tensor (unsupported target module)",
                           adapter.path)
        a = tuple(adapter.tensors.info(pair.a).shape)
        b = tuple(adapter.tensors.info(pair.b).shape)
        planned += [_Tensor(f"{name}.lora_a", pair.a, a),
                    _Tensor(f"{name}.lora_b", pair.b, b, lora_b_transform(spec, cfg, weight))]
    return planned


def _header(spec_name: str, adapter, base_name: str, planned: list[_Tensor], qtype: Q) -> GGUFOutput:
    """KVs in the converter's order; the tensor infos first, since the model card's size label comes from
    gguf-py's parameter count over them (a lora_a / lora_b pair counts as the full matrix)."""
    w = GGUFOutput(spec_name)
    for t in planned:
        w.add_planned_tensor(t.name, tuple(reversed(t.shape)), qtype)
    total, shared, expert, n_expert = w.get_total_parameter_count()
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    meta = gguf.Metadata.load(None, adapter.path, None, total)
    if meta.name is None:
        meta.name = base_name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    w.add_quantization_version(GGUF_QUANT_VERSION)
    return w


def _data(adapter, t: _Tensor, qtype: Q) -> np.ndarray:
    from qconvert.kernels.registry import quantize

    x = np.asarray(adapter.tensors.read_numpy(t.source), dtype=np.float32)
    if t.transform is not None:
        x = t.transform(x)
    return quantize(np.ascontiguousarray(x), qtype)


def convert_lora(adapter_dir: str | Path, base: str | Path, output: Path | None = None,
                 type_name: str | None = None) -> LoraGGUFResult:
    """Write the llama.cpp LoRA adapter GGUF of a PEFT adapter on `base` (an HF checkpoint or directory)."""
    from qconvert.load import open_checkpoint
    from qconvert.load.lora import check_adapter, open_lora

    start = time.perf_counter()
    type_name = (type_name or "F32").upper()
    if type_name not in TYPES:
        raise BadInput(f"--type {type_name}: a LoRA adapter GGUF is F32 (default), F16 or BF16")
    adapter = open_lora(adapter_dir)
    with open_checkpoint(base) as ckpt:
        check_adapter(ckpt, adapter)
        cfg = text_config(ckpt.config)
        if not cfg:
            raise BadInput("no config.json in the base model: cannot tell the architecture", ckpt.path)
        spec = resolve(cfg, ckpt.path)
        planned = _plan(adapter, spec, cfg, ckpt.config)
        base_name = Path(ckpt.path).name
    target = Path(output) if output is not None else default_output(adapter.path, type_name)
    qtype = TYPES[type_name]
    header = _header(spec.name, adapter, base_name, planned, qtype)
    try:
        write_gguf(header, target, (_data(adapter, t, qtype) for t in planned))
    finally:
        adapter.tensors.close()
    ranks = sorted({p.rank for p in adapter.pairs.values()})
    rank = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    return LoraGGUFResult(adapter.path, target, spec.name, len(adapter.pairs), rank, adapter.alpha, type_name,
                          target.stat().st_size, time.perf_counter() - start)
