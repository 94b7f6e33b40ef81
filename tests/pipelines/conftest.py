"""Fixtures of the pipeline tests: llama.cpp's tools (built once into the cache), its converter (the sdist's
vendor/llama.cpp) and a BF16 GGUF of the real fixture model written by `qconvert convert --type BF16`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def llamacpp_bin() -> Path:
    """Directory with llama-imatrix, llama-quantize and llama-perplexity (scripts/build_llamacpp_tools.sh)."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", _venv_python())}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llamacpp_tools.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert proc.returncode == 0, f"building llama.cpp tools failed:\n{proc.stderr[-3000:]}"
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert (bin_dir / "llama-imatrix").is_file(), bin_dir
    return bin_dir


def _venv_python() -> str:
    import sys

    return sys.executable


@pytest.fixture(scope="session")
def smollm2_bf16_gguf(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our bf16 checkpoint as a BF16 GGUF (same weights bit for bit), for llama.cpp's side of comparisons."""
    from qconvert.pipelines.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("gguf") / "smollm2-bf16.gguf"
    convert(str(smollm2_dir), ConvertOptions(file_type="BF16", output=out))
    return out


@pytest.fixture(scope="session")
def llamacpp_converter(fixtures_lib) -> Path:
    """vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    return fixtures_lib.llamacpp_source()
