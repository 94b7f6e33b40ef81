"""Tokenizer rules per family: which exporters to try (formats/gguf/tokenizer.py) and the KVs the converter
adds around them (its per-model set_vocab quirks).

``before(w, tokenizer_config)`` runs before the tokenizer KVs, ``after(w, info, cfg)`` after them (``info``
is the exporter's TokenizerInfo); the KV order is the converter's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Vocab:
    kinds: tuple[str, ...] = ("spm", "gpt2")            # exporters tried in order (gguf/tokenizer.py)
    before: Callable[[Any, dict], None] | None = None
    after: Callable[[Any, Any, dict], None] | None = None


def llama_before(w: Any, tok_cfg: dict) -> None:
    if tok_cfg.get("add_prefix_space") is not None:
        w.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))


def llama_after(w: Any, info: Any, cfg: dict) -> None:
    if cfg.get("vocab_size") == 49152:
        w.add_add_bos_token(False)  # the converter's Granite/SmolLM rule


def gemma_after(w: Any, info: Any, cfg: dict) -> None:
    if info.n_tokens > 107:
        w.add_eot_token_id(107)  # CodeGemma's <end_of_turn>; the converter's FIM ids have no KV handler
    w.add_add_space_prefix(False)


def gemma2_after(w: Any, info: Any, cfg: dict) -> None:
    w.add_add_space_prefix(False)


def gemma3_after(w: Any, info: Any, cfg: dict) -> None:
    if info.model == "llama":  # SentencePiece only; a byte-level BPE export keeps the default
        w.add_add_space_prefix(False)
