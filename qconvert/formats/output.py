"""Checks every single-file output (GGUF, imatrix, stats) makes before any work, so that a bad path fails in a
second, not after a long pass."""

from __future__ import annotations

from pathlib import Path

from qconvert.errors import BadInput


def check_output_path(target: Path) -> None:
    """Fail before any work if the output file cannot be created there."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput("output directory does not exist", parent)
    if target.is_dir():
        raise BadInput("output path is a directory", target)
