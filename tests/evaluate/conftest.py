"""Artefacts for the eval tests: a BF16 GGUF of the fixture model (our converter), its Q4_K_M made by
llama.cpp's own quantizer (the oracle), llama-perplexity, and the `qconvert` entry point."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qconvert import cli

REPO = Path(__file__).resolve().parents[2]
LLAMA_FTYPE_Q4_K_M = 15


@pytest.fixture(scope="session")
def bf16_gguf(smollm2_dir: Path, tmp_path_factory) -> Path:
    from qconvert.pipelines.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("eval-gguf") / "smollm2-bf16.gguf"
    convert(str(smollm2_dir), ConvertOptions(file_type="BF16", output=out, threads=2))
    return out


@pytest.fixture(scope="session")
def q4km_gguf(bf16_gguf: Path) -> Path:
    from tests.oracle.llamacpp import model_quantize

    out = bf16_gguf.with_name("smollm2-q4_k_m.gguf")
    model_quantize(bf16_gguf, out, LLAMA_FTYPE_Q4_K_M, nthread=2)
    return out


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """bin directory with llama-perplexity (built once into the cache by scripts/build_llamacpp_tools.sh)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_llamacpp_tools.sh")], capture_output=True,
                          text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def eval_cli():
    """`qconvert eval` through the real entry point: cli.main(["eval", ...])."""
    return cli.main
