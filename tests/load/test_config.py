"""load.config.text_config: the one view of a (possibly multimodal) config's language-model keys."""

from __future__ import annotations

from qconvert.load.config import text_config


def test_text_config_merges_like_the_converter():
    flat = {"hidden_size": 8}
    assert text_config(flat) is flat
    text = {"hidden_size": 8, "model_type": "gemma3_text"}
    nested = {"vocab_size": 100, "hidden_size": 4, "text_config": text}
    got = text_config(nested)
    assert got["hidden_size"] == 8 and got["vocab_size"] == 100 and got["model_type"] == "gemma3_text"
    assert text_config({"text_config": None, "hidden_size": 8})["hidden_size"] == 8
