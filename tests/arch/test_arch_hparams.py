"""Hyper-parameter helpers: rope settings in both transformers config styles, llama3 rope factors."""

from __future__ import annotations

from qconvert.arch.hparams import llama3_rope_factors, rope_parameters


def test_rope_parameters_both_config_styles():
    assert rope_parameters({"rope_theta": 5e5})["rope_theta"] == 5e5
    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert rope_parameters(v5)["rope_theta"] == 1e4
    f = llama3_rope_factors({"rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 8192}, 128)
    assert f.shape == (64,) and f[0] == 1.0 and f[-1] == 8.0
