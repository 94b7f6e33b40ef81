"""The architecture table: HF architectures / model_type -> ArchSpec, and what the table derives."""

from __future__ import annotations

import pytest

from qconvert.arch.table import ARCHITECTURES, BLOCK_FAMILIES, MODEL_TYPES, resolve
from qconvert.errors import BadInput


def test_unsupported_architecture():
    with pytest.raises(BadInput, match="unsupported architecture GPTNeoXForCausalLM"):
        resolve({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})
    assert resolve({"model_type": "mistral"}).name == "llama"
    assert resolve({"architectures": ["Gemma3ForCausalLM"]}).norm_shift == 1.0


def test_every_family_has_a_block_layout():
    # AWQ's supported families are the table's, in table order (the order of its error message)
    assert BLOCK_FAMILIES == ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen3moe",
                              "olmoe", "qwen2moe", "deepseek2", "glm4moe", "smollm3", "granite", "seed_oss",
                              "ernie4_5")
    assert {s.name for s in ARCHITECTURES.values()} == {s.name for s in MODEL_TYPES.values()}


def test_list_architectures_prints_every_class(capsys):
    from tests.helpers import run_cli

    code, out, err = run_cli(capsys, "convert", "--list-architectures")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("│")]
    listed = {cells[1].strip(): cells[2].strip() for cells in (row.split("│") for row in rows)}
    assert listed == {hf_class: spec.name for hf_class, spec in ARCHITECTURES.items()}
