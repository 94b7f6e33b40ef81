"""GGUF header KVs of a converted HF checkpoint: general.*, the architecture's hyper-parameters, tokenizer.

The order is convert_hf_to_gguf.py's (general.architecture, general.type, general.* from the model card,
hyper-parameters, quantization version, tokenizer); finalize_kv (writer.py) then moves
general.quantization_version and general.file_type to the end, as llama-quantize does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from qconvert.arch.table import ArchSpec
from qconvert.formats.gguf.tokenizer import TokenizerInfo, add_tokenizer
from qconvert.formats.gguf.writer import GGUF_QUANT_VERSION, GGUFOutput

logging.getLogger("gguf.metadata").setLevel(logging.ERROR)


def add_general(w: GGUFOutput, model_dir: Path | None, fallback_name: str, total_params: int) -> None:
    """general.type and the model-card heuristics of gguf-py's Metadata (name, size label, license, ...)."""
    w.add_type(gguf.GGUFType.MODEL)
    card_dir = model_dir if model_dir and model_dir.is_dir() else None
    meta = gguf.Metadata.load(None, card_dir, None, total_params)
    if meta.name is None:
        meta.name = fallback_name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    meta.set_gguf_meta_model(w)


def tokenizer_kvs(spec: ArchSpec, cfg: dict, model_dir: Path,
                  pre_tokenizer: str | None = None) -> tuple[GGUFOutput, TokenizerInfo]:
    """The tokenizer.* KVs on their own (they are needed before the tensor plan: gemma3 trims token_embd)."""
    t = GGUFOutput(spec.name)
    info = add_tokenizer(t, spec.name, spec.vocab, model_dir, cfg, pre_tokenizer)
    return t, info


def build_header(spec: ArchSpec, cfg: dict, model_dir: Path, name: str, total_params: int,
                 tokenizer: GGUFOutput) -> GGUFOutput:
    """A GGUFOutput holding every KV of the converted model, in converter order."""
    w = GGUFOutput(spec.name)
    if spec.extra_kvs is not None:  # written while the converter generates its extra tensors: first
        spec.extra_kvs(cfg, w)
    add_general(w, model_dir, name, total_params)
    spec.hparams(cfg, w)
    w.add_quantization_version(GGUF_QUANT_VERSION)
    for key, val in tokenizer.kv().items():
        if key != gguf.Keys.General.ARCHITECTURE:
            w.add_key_value(key, val.value, val.type, val.sub_type)
    return w
