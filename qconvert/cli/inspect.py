"""`qconvert inspect`: layout of safetensors and GGUF files (placeholder until the load stage lands)."""

from __future__ import annotations

import typer


def inspect_command(
    path: str = typer.Argument(..., help="A .safetensors file, an HF checkpoint directory, a hub id or a .gguf file."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show the layout of a checkpoint: metadata, tensors, types, bits per weight, quantization config."""
    raise NotImplementedError
