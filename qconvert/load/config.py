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


def attn_implementation(config: dict[str, Any]) -> str:
    """The attention transformers should run for this model, in calibration and in eval alike: sdpa, except
    eager where sdpa is wrong or missing: logit soft-capping (gemma2; transformers itself requires eager) and
    model classes without an sdpa path (gpt-oss: attention sinks)."""
    text = text_config(config)
    return "eager" if text.get("attn_logit_softcapping") or not _supports_sdpa(text) else "sdpa"


def _supports_sdpa(text: dict[str, Any]) -> bool:
    """The causal-LM class's own _supports_sdpa (True for a model_type transformers does not map)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(text.get("model_type")))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return bool(getattr(cls, "_supports_sdpa", True))
