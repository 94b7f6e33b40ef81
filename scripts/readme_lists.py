"""Rewrite the README's generated lists from the registries (file types, architectures, methods, formats).

    python scripts/readme_lists.py          # rewrite README.md in place
    python scripts/readme_lists.py --check  # exit 1 if README.md is stale (tests/test_house.py runs it)

A generated span sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; the prose
around it is kept by hand. Lists come from the one registry of each kind, so a new file type or family
cannot be forgotten in the README.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
# the qconvert beside this README, not whichever one the environment installed (a worktree's own tree)
sys.path.insert(0, str(README.parent))


def file_types() -> str:
    from qconvert.formats.gguf.mixture import FILE_TYPE_NAMES

    return "* Types: " + " ".join(f"`{n}`" for n in FILE_TYPE_NAMES)


def architectures() -> str:
    from qconvert.arch.table import ARCHITECTURES

    by_gguf: dict[str, list[str]] = {}
    for hf_name, spec in ARCHITECTURES.items():
        by_gguf.setdefault(spec.name, []).append(hf_name)
    items = [f"`{gguf}` ({', '.join(hf)})" for gguf, hf in by_gguf.items()]
    return "* Architectures (GGUF arch, HF classes): " + "; ".join(items) + "."


def way_back() -> str:
    from qconvert.arch.table import ARCHITECTURES

    back = dict.fromkeys(spec.name for spec in ARCHITECTURES.values() if spec.hf_config is not None)
    rest = dict.fromkeys(spec.name for spec in ARCHITECTURES.values() if spec.name not in back)
    return (f"* `--to hf` (GGUF arch): {', '.join(f'`{n}`' for n in back)}; refused in one line: "
            f"{', '.join(f'`{n}`' for n in rest)}")


def methods() -> str:
    from qconvert.formats.packed import FORMAT_NAMES
    from qconvert.methods import METHODS
    from qconvert.methods.types import SCHEMES

    lines = [f"* `--method {m.name}`: {m.help}; default format `{m.default_format}`"
             for m in METHODS.values()]
    schemes = [f"* `--scheme {s.name}` (`--method {'|'.join(s.methods)}`, llm-compressor's `{s.preset}`): "
               f"{s.help}" for s in SCHEMES.values()]
    return "\n".join([*lines, "* `--format`: " + ", ".join(f"`{n}`" for n in FORMAT_NAMES), *schemes])


SPANS: dict[str, Callable[[], str]] = {
    "file-types": file_types, "architectures": architectures, "methods": methods, "way-back": way_back,
}


def _wrap(bullet: str) -> str:
    return textwrap.fill(bullet, width=118, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def render(text: str) -> str:
    for name, make in SPANS.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no generated:{name} span")
        body = "\n".join(_wrap(line) for line in make().splitlines())
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    old = README.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print("README.md is out of date: run python scripts/readme_lists.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
