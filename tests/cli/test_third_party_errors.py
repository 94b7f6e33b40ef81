"""Broken tokenizers and families transformers does not know (issue 20): one line of ours on stderr, exit 2,
nothing of transformers' own (warnings, multi-line errors) and no output left behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qconvert.cli import main


def _truncated(d: Path) -> None:
    (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:3000])


def _no_vocabulary(d: Path) -> None:
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')


def _missing(d: Path) -> None:
    (d / "tokenizer.json").unlink()


def _vocabulary_emptied(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {}
    (d / "tokenizer.json").write_text(json.dumps(tok))


def _unknown_family(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="qwen9", architectures=["Qwen9ForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated tokenizer.json": (_truncated, "cannot load the tokenizer"),
    "tokenizer.json without a vocabulary": (_no_vocabulary, "tokenizer"),
    "no tokenizer.json": (_missing, "tokenizer"),
    "vocabulary emptied": (_vocabulary_emptied, "cannot load the tokenizer"),
    "unknown family": (_unknown_family, "qwen9"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_one_line_of_ours(case, synthetic_dir, calib_text, tmp_path, capsys):
    breaks, fragment = BREAKS[case]
    model = tmp_path / "m"
    shutil.copytree(synthetic_dir("qwen3"), model)
    breaks(model)
    data = ["--dataset", str(calib_text)]
    commands = [
        ["calibrate", str(model), *data, "-n", "2", "--seq-len", "32", "-o", str(tmp_path / "s.safetensors")],
        ["imatrix", str(model), *data, "--chunks", "1", "-c", "64", "-o", str(tmp_path / "i.gguf")],
        ["quantize", str(model), "--method", "gptq", *data, "--num-samples", "2", "--seq-len", "32",
         "-o", str(tmp_path / "q")],
        ["eval", str(model), *data, "--chunks", "1", "-c", "64"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as e:
            main(command)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, (command[0], err)
        assert err[0].startswith("qconvert: error: "), (command[0], err[0])
        assert fragment.lower() in err[0].lower(), (command[0], err[0])
        assert "[transformers]" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
