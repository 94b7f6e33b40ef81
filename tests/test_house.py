"""The shape of the house (issue 13): stages in folders, no import cycles, one registry per kind of thing."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import qconvert

PACKAGE = Path(qconvert.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The qconvert modules `path` imports anywhere (module level or inside functions: a lazy import is
    still a dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    skip = {id(n) for guard in ast.walk(tree) if isinstance(guard, ast.If)
            and "TYPE_CHECKING" in ast.unparse(guard.test) for stmt in guard.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "qconvert" or m.startswith("qconvert.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for dep in _imports(path):
            while dep and dep not in modules:
                dep = dep.rpartition(".")[0]
            if dep and dep != name:
                deps.add(dep)
        # importing a.b.c runs a/__init__ and a.b/__init__ first
        parts = name.split(".")
        deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules)
        graph[name] = deps - {name}
    return graph


def test_only_the_entry_points_live_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "errors.py"]


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):  # a package's __init__ importing its own submodules is no cycle
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_cli_loads_no_heavy_module():
    code = ("import sys, qconvert.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_packed_format_implements_the_interface():
    from qconvert.formats.packed import FORMAT_NAMES, FORMATS, LAYOUTS
    from qconvert.formats.packed.base import Layout, PackedFormat

    def members(proto: type) -> set[str]:
        return {n for n in vars(proto) if not n.startswith("_")} | set(getattr(proto, "__annotations__", {}))

    from qconvert.methods.types import SCHEMES

    write = members(PackedFormat) | members(Layout)
    scheme_kinds = {s.kind for s in SCHEMES.values()}
    for fmt in FORMATS:
        missing = [n for n in write if not hasattr(fmt, n)]
        assert not missing, f"{type(fmt).__name__} lacks {missing}"
        assert fmt.kind in {"int", "fp8"} | scheme_kinds
    # every --scheme has a writer (its kind) under --format compressed-tensors, the default with a scheme
    assert scheme_kinds <= {f.kind for f in FORMATS if f.name == "compressed-tensors"}
    for lay in LAYOUTS:
        missing = [n for n in members(Layout) if not hasattr(lay, n)]
        assert not missing, f"{type(lay).__name__} lacks {missing}"
    # the CLI's --format choices are the registry's names
    from qconvert.cli.quantize import Format, Scheme

    assert tuple(f.value for f in Format) == FORMAT_NAMES
    assert tuple(s.value for s in Scheme) == tuple(SCHEMES)


def test_every_method_is_a_config_and_a_run():
    from qconvert.cli.quantize import Method
    from qconvert.formats.packed import FORMAT_NAMES
    from qconvert.methods import METHODS

    assert tuple(m.value for m in Method) == tuple(METHODS)
    for entry in METHODS.values():
        module = entry.load()
        assert dataclasses.is_dataclass(module.Config) and callable(module.run), entry.name
        cfg = module.Config()
        for hook in ("check", "spec", "pack_options"):
            assert callable(getattr(cfg, hook)), (entry.name, hook)
        assert entry.default_format in FORMAT_NAMES
        # no **kwargs pass-through: run takes the job and nothing else
        assert list(module.run.__code__.co_varnames[: module.run.__code__.co_argcount]) == ["job"]


def test_the_readme_lists_come_from_the_registries():
    # file types, architectures, methods and formats in README.md are generated (scripts/readme_lists.py)
    script = PACKAGE.parent / "scripts" / "readme_lists.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    readme = (PACKAGE.parent / "README.md").read_text()
    from qconvert.arch.table import ARCHITECTURES
    from qconvert.formats.gguf.mixture import FILE_TYPE_NAMES

    assert all(f"`{name}`" in readme for name in FILE_TYPE_NAMES)
    assert all(hf_name in readme for hf_name in ARCHITECTURES)
