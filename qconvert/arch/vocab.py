"""Tokenizer rules per family: which exporters to try (formats/gguf/tokenizer.py) and the KVs the converter
adds around them (its per-model set_vocab quirks).

``before(w, tokenizer_config)`` runs before the tokenizer KVs, ``after(w, info, cfg)`` after them (``info``
is the exporter's TokenizerInfo), ``after_config(w, tokenizer_config)`` after those; ``specials(special,
added)`` edits gguf-py's SpecialVocab before it writes its KVs (``added``: tokenizer.json's added tokens,
content -> id). The KV order is the converter's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qconvert.errors import BadInput


@dataclass(frozen=True)
class Vocab:
    kinds: tuple[str, ...] = ("spm", "gpt2")            # exporters tried in order (gguf/tokenizer.py)
    before: Callable[[Any, dict], None] | None = None
    after: Callable[[Any, Any, dict], None] | None = None
    after_config: Callable[[Any, dict], None] | None = None
    specials: Callable[[Any, dict[str, int]], None] | None = None


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


def glm4_specials(special: Any, added: dict[str, int]) -> None:
    """Glm4Model.set_vocab: eos, eot, unk and bos from GLM's added tokens. SpecialVocab keeps an id it already
    read from the tokenizer files, so in effect only the ones those leave unset are taken (eot, usually)."""
    for typ, token in (("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                       ("bos", "<|endoftext|>")):
        if token not in added:
            raise BadInput(f"glm4 tokenizer has no {token} token (the GLM-4 converter takes its {typ} id "
                           f"{typ} id from it)")
        special._set_special_token(typ, added[token])


def glm4moe_specials(special: Any, added: dict[str, int]) -> None:
    """Glm4MoeModel.set_vocab (_set_vocab_glm): bos from [gMASK], eot from <|user|>, unk from <|endoftext|>,
    eom from <|observation|>; as for glm4, an id the tokenizer files already set is kept. The converter fails
    on a tokenizer without one of them (a KeyError)."""
    for typ, token in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                       ("eom", "<|observation|>")):
        if token not in added:
            raise BadInput(f"glm4moe tokenizer has no {token} token (the GLM-4.5 converter takes its "
                           f"{typ} id from it)")
        special._set_special_token(typ, added[token])


def ernie4_5_after_config(w: Any, tok_cfg: dict) -> None:
    """Ernie4_5Model.set_vocab: add_prefix_space after the SentencePiece KVs, whenever the key is there."""
    if "add_prefix_space" in tok_cfg:
        w.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
