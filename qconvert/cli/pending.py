"""Subcommands whose issue has not landed yet: useful --help, then a one-line 'not available yet' (exit 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from qconvert.errors import NotAvailable


def _pending(name: str) -> None:
    raise NotAvailable(f"'qconvert {name}' is not available yet in this version")


def calibrate(
    model: str = typer.Argument(..., help="HF checkpoint directory or hub id."),
    dataset: str = typer.Option(None, "--dataset", help="Calibration text: .txt, .jsonl, .parquet, hf:NAME."),
    output: Path = typer.Option(None, "-o", "--output", help="Statistics file (.safetensors)."),
) -> None:
    """Collect activation statistics (Hessians, mean |x|, max |x|, Σx²), one decoder layer at a time."""
    _pending("calibrate")


def imatrix(
    model: str = typer.Argument(..., help="HF checkpoint directory or hub id."),
    dataset: str = typer.Option(None, "--dataset", help="Calibration text file."),
    output: Path = typer.Option(None, "-o", "--output", help="imatrix file (GGUF, or legacy .dat)."),
) -> None:
    """Compute a llama.cpp-compatible importance matrix (GGUF or legacy .dat)."""
    _pending("imatrix")


COMMANDS = {
    "calibrate": calibrate,
    "imatrix": imatrix,
}
