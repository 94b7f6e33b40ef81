"""`qconvert convert model.gguf --to hf -o DIR`: a GGUF file back to an HF checkpoint directory.

The header is read and checked first (every tensor's type must be one kernels/ can dequantize, every tensor
must have an HF name in its family, config.json and the tokenizer are rebuilt from the KVs); only then is
the output directory opened, and the tensors are streamed one GGUF tensor (or one expert stack) at a time:
dequantize -> the inverse of the forward transform (arch/hf.py) -> round to --dtype -> write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.arch.hf import HFGroup, hf_config, plan_hf
from qconvert.arch.hparams import GGUFKVs
from qconvert.arch.table import resolve_gguf
from qconvert.errors import BadInput
from qconvert.load.gguf_file import GGML_TYPES, GGUFFile, open_gguf

DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
CHUNK_ELEMENTS = 1 << 22  # dequantized per step (16 MiB of float32)
ProgressFn = Callable[[str, int, int], None]  # (hf name, groups done, total)


@dataclass
class HFResult:
    source: Path
    output: Path
    architecture: str
    dtype: str
    n_tensors: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    types: dict[str, int] = field(default_factory=dict)  # GGUF tensor type -> count dequantized
    notes: list[str] = field(default_factory=list)


def _dequantizable() -> dict[int, Any]:
    from qconvert.kernels.registry import BLOCK_TYPES

    return {int(t): t for t in BLOCK_TYPES}


def check_types(gf: GGUFFile) -> dict[str, int]:
    """Refuse the first tensor whose type kernels/ has no dequantizer for; the count of each type."""
    known = _dequantizable()
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        if t.type_id not in known:
            names = ", ".join(GGML_TYPES[i][0] for i in sorted(known))
            raise BadInput(f"tensor {t.name} is {t.type_name}, which qconvert cannot dequantize "
                           f"(it can: {names})", gf.path)
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def _reader(gf: GGUFFile) -> Callable[[str], np.ndarray]:
    from qconvert.kernels.registry import dequantize

    known = _dequantizable()

    def read(name: str) -> np.ndarray:
        # in row chunks into one float32 array: the reference dequantizers make several temporaries of
        # their input's size, which for a whole 32000 x 2048 embedding would be ~1 GB
        t = gf.tensors[name]
        raw = gf.read_raw(name)
        out = np.empty((raw.shape[0], t.ne[0] if t.ne else 1), dtype=np.float32)
        step = max(1, CHUNK_ELEMENTS // max(1, out.shape[1]))
        for i in range(0, raw.shape[0], step):
            out[i:i + step] = dequantize(raw[i:i + step], known[t.type_id])
        gf.release(name)
        return out.reshape(t.shape)
    return read


def _has_experts(gf: GGUFFile, arch: str) -> bool:
    return bool(gf.value(f"{arch}.expert_count")) or any("_exps." in n for n in gf.tensors)


@dataclass
class _Plan:
    gf: GGUFFile
    arch: str
    config: dict
    groups: list[HFGroup]
    tokenizer: dict[str, Any]
    notes: list[str]
    types: dict[str, int]


def plan(model: Path) -> _Plan:
    """Everything checked and rebuilt from the header; no tensor data read but generated rope factors."""
    from qconvert.formats.gguf.tokenizer import hf_tokenizer_files

    gf = open_gguf(model)
    try:
        types = check_types(gf)
        arch = gf.value("general.architecture")
        if not isinstance(arch, str):
            raise BadInput("GGUF file has no general.architecture", model)
        hf_arch, model_type, spec = resolve_gguf(arch, _has_experts(gf, arch), model)
        fields = {k: f.value for k, f in gf.fields.items()}
        shapes = {n: t.shape for n, t in gf.tensors.items()}
        kv = GGUFKVs(arch, fields, shapes)
        read = _reader(gf)
        cfg, notes = hf_config(spec, hf_arch, model_type, kv, read)
        groups = plan_hf(spec, cfg, shapes, read)
        tokenizer, tok_note = hf_tokenizer_files(fields)
    except BaseException:
        gf.close()
        raise
    return _Plan(gf, hf_arch, cfg, groups, tokenizer, notes + ([tok_note] if tok_note else []), types)


def _generation_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}


def _write_group(w: Any, g: HFGroup, dtype: str) -> int:
    """Read one group, round each array in place (every array a group returns is its own: chunked reads,
    transforms, slices of a stack read for it) and write it. A function of its own so that nothing of this
    group is alive while the next one is read (two embeddings at once would double the peak)."""
    import torch

    from qconvert.load.dtypes import TORCH_FLOATS, round_float32

    arrays = g.read()
    for k, (hf, shape) in enumerate(g.outputs):
        x = np.ascontiguousarray(arrays[k], dtype=np.float32)
        flat = x.reshape(-1)
        for i in range(0, flat.size, CHUNK_ELEMENTS):  # round_float32's temporaries are its input's size
            round_float32(flat[i:i + CHUNK_ELEMENTS], dtype)
        arrays[k] = None  # the writer copies the bytes out; drop each array once written
        if x.shape != shape:
            raise RuntimeError(f"{hf}: read {x.shape}, planned {shape}")
        w.add(hf, torch.from_numpy(x).to(TORCH_FLOATS[dtype]))
        del x
    return len(g.outputs)


def convert_to_hf(model: str | Path, output: Path, dtype: str = "bf16",
                  progress: ProgressFn | None = None) -> HFResult:
    """Write the HF checkpoint of a GGUF file into `output` (a new directory, swapped in when complete)."""
    from qconvert.formats.safetensors_out import CheckpointWriter

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype!r}: choose bf16, f16 or f32")
    name = DTYPES[dtype]
    p = plan(Path(model))
    result = HFResult(Path(model), Path(output), p.arch, dtype, types=p.types, notes=p.notes)
    p.config["dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[name]
    try:
        with CheckpointWriter(output) as w:
            for i, g in enumerate(p.groups):
                result.n_tensors += _write_group(w, g, name)
                if progress is not None:
                    progress(g.outputs[-1][0], i + 1, len(p.groups))
            w.write_json("config.json", p.config)
            w.write_json("generation_config.json", _generation_config(p.config))
            for filename, content in p.tokenizer.items():
                if filename == "tokenizer.json":
                    assert w.tmp is not None
                    content.save(str(w.tmp / filename))
                else:
                    w.write_json(filename, content)
            result.total_bytes = w.total_bytes
    finally:
        p.gf.close()
    result.seconds = time.perf_counter() - start
    return result
