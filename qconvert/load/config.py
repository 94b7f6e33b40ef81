"""config.json helpers shared by every stage."""

from __future__ import annotations

from typing import Any


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's hyper-parameters: multimodal configs nest them under ``text_config``.

    Its keys win and the top level fills the rest, as convert_hf_to_gguf.py's load_hparams merges them
    (`{**config, **config["text_config"]}`): the GGUF header needs top-level keys such as ``vocab_size``
    or ``tie_word_embeddings`` that some multimodal configs keep outside ``text_config``. The calibration
    and evaluation readers take the same view; for the causal-LM checkpoints they load, there is no
    ``text_config`` and this is the config itself.
    """
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config
