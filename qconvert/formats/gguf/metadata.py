"""GGUF header KVs of a converted HF checkpoint: general.*, the architecture's hyper-parameters, tokenizer.

The order is convert_hf_to_gguf.py's (general.architecture, general.type, general.* from the model card,
hyper-parameters, quantization version, tokenizer); finalize_kv (writer.py) then moves
general.quantization_version and general.file_type to the end, as llama-quantize does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import gguf

from qconvert.arch.table import ArchSpec
from qconvert.formats.gguf.tokenizer import TokenizerInfo, add_tokenizer
from qconvert.formats.gguf.writer import GGUF_QUANT_VERSION, GGUFOutput

logging.getLogger("gguf.metadata").setLevel(logging.ERROR)


ParamCounts = tuple[int, int, int, int]  # total, shared, per-expert, expert count (gguf-py's order)


def parameter_counts(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> ParamCounts:
    """GGUFWriter.get_total_parameter_count over (gguf name, numpy shape): a 3-D `_exps.` tensor adds one
    expert's share to the per-expert count; the expert count is the mean of their leading dimensions."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in tensors:
        size = math.prod(shape)
        total += size
        if "_exps." in name and len(shape) >= 3:
            count = shape[-2 if ".bias" in name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def add_general(w: GGUFOutput, model_dir: Path | None, fallback_name: str, params: int | ParamCounts) -> None:
    """general.type and the model-card heuristics of gguf-py's Metadata (name, size label, license, ...)."""
    total, shared, expert, n_expert = (params, params, 0, 0) if isinstance(params, int) else params
    w.add_type(gguf.GGUFType.MODEL)
    card_dir = model_dir if model_dir and model_dir.is_dir() else None
    meta = gguf.Metadata.load(None, card_dir, None, total)
    if meta.name is None:
        meta.name = fallback_name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)


def tokenizer_kvs(spec: ArchSpec, cfg: dict, model_dir: Path,
                  pre_tokenizer: str | None = None) -> tuple[GGUFOutput, TokenizerInfo]:
    """The tokenizer.* KVs on their own (they are needed before the tensor plan: gemma3 trims token_embd)."""
    t = GGUFOutput(spec.name)
    info = add_tokenizer(t, spec.name, spec.vocab, model_dir, cfg, pre_tokenizer)
    return t, info


def build_header(spec: ArchSpec, cfg: dict, model_dir: Path, name: str, params: int | ParamCounts,
                 tokenizer: GGUFOutput) -> GGUFOutput:
    """A GGUFOutput holding every KV of the converted model, in converter order."""
    w = GGUFOutput(spec.name)
    if spec.extra_kvs is not None:  # written while the converter generates its extra tensors: first
        spec.extra_kvs(cfg, w)
    add_general(w, model_dir, name, params)
    spec.hparams(cfg, w)
    w.add_quantization_version(GGUF_QUANT_VERSION)
    for key, val in tokenizer.kv().items():
        if key != gguf.Keys.General.ARCHITECTURE:
            w.add_key_value(key, val.value, val.type, val.sub_type)
    return w
