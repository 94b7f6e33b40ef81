"""`qconvert inspect`: layout of safetensors and GGUF files.

The data (and its JSON schema) comes from qconvert.load.summary; this module only renders it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _bpw(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _console(summary: dict[str, Any]):
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:  # piped: wide enough that no tensor name is cut or wrapped
        longest = max((len(t["name"]) for t in summary["tensors"]), default=0)
        console = Console(highlight=False, width=max(120, longest + 70), color_system=None)
    return console


def _cells(*values: str):
    """Plain text cells: names and values may contain '[...]', which rich would read as markup."""
    from rich.text import Text

    return [Text(v) for v in values]


def _kv_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(*_cells(k, v))
    return table


def _metadata_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    from qconvert.load.gguf_file import FILE_TYPES
    from qconvert.load.summary import describe_value

    rows = []
    for k, v in summary["metadata"].items():
        text = describe_value(v)
        if k == "general.file_type" and isinstance(v, int) and v in FILE_TYPES:
            text += f" ({FILE_TYPES[v]})"
        rows.append((k, text))
    return rows


_CONFIG_KEYS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "torch_dtype", "dtype", "tie_word_embeddings")


def _print_rows(console, title: str, head: tuple[str, ...], rows: list[tuple[str, ...]],
                right: set[int]) -> None:
    """Plain aligned columns, one line per row: rich tables cost ~0.5 ms a row (a minute for a 100k-tensor
    MoE), and one line per tensor is what grep/awk want."""
    from rich.text import Text

    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    console.print(Text(title, style="italic"))
    console.print(Text(line(head), style="bold"))
    console.file.write("".join(line(r) + "\n" for r in rows))
    console.file.flush()


def _print_tensors(console, summary: dict[str, Any]) -> None:
    rows = [(t["name"], t["type"], "[" + ", ".join(map(str, t["shape"])) + "]", str(t["nbytes"]))
            for t in summary["tensors"]]
    head = ("name", "type", "shape", "bytes")
    _print_rows(console, f"Tensors ({summary['tensor_count']})", head, rows, {3})


def _print_layers(console, layers: list[dict[str, Any]]) -> None:
    rows = [(q["name"], q["method"], str(q["bits"]), str(q["group_size"]), str(q["parameters"]),
             str(q["nbytes"]), _bpw(q["bits_per_weight"])) for q in layers]
    head = ("name", "method", "bits", "group", "params", "bytes", "bpw")
    _print_rows(console, f"Quantized layers ({len(layers)})", head, rows, {2, 3, 4, 5, 6})


def _print_types(console, summary: dict[str, Any]) -> None:
    total = summary["total_bytes"] or 1
    rows = [(name, str(h["count"]), _count(h["parameters"]), _size(h["nbytes"]),
             f"{100 * h['nbytes'] / total:.1f}%") for name, h in summary["type_histogram"].items()]
    _print_rows(console, "Types", ("type", "tensors", "params", "bytes", "share"), rows, {1, 2, 3, 4})


def _print_experts(console, experts: dict[str, Any]) -> None:
    count = "?" if experts["count"] is None else str(experts["count"])
    used = "" if experts["used"] is None else f", {experts['used']} per token"
    rows = [(s["name"], s["type"], str(s["experts"]), str(s["nbytes_per_expert"])) for s in experts["stacks"]]
    head = ("stack", "type (every expert)", "experts", "bytes per expert")
    _print_rows(console, f"Experts ({count}{used})", head, rows, {2, 3})


def render(summary: dict[str, Any]) -> None:
    from rich.text import Text

    console = _console(summary)
    extra = f" v{summary['gguf']['version']}" if summary.get("gguf") else ""
    files = len(summary["files"])
    head = Text(summary["name"], style="bold")
    head.append(f"  {summary['format']}{extra}  ({files} file{'s' if files != 1 else ''})  {summary['path']}")
    console.print(head)
    if summary["metadata"]:
        console.print(_kv_table("Metadata", _metadata_rows(summary)))
    config = summary.get("config") or {}
    rows = [(k, str(config[k])) for k in _CONFIG_KEYS if k in config]
    if summary.get("tokenizer_files"):
        rows.append(("tokenizer files", ", ".join(summary["tokenizer_files"])))
    if rows:
        console.print(_kv_table("config.json", rows))
    if summary["quantization"]:
        q = summary["quantization"]
        console.print(_kv_table("Quantization", [(k, "-" if v is None else str(v)) for k, v in q.items()]))
    _print_tensors(console, summary)
    if summary["quantized_layers"]:
        _print_layers(console, summary["quantized_layers"])
    if summary.get("experts"):
        _print_experts(console, summary["experts"])
    _print_types(console, summary)
    console.print(_kv_table("Totals", [
        ("tensors", str(summary["tensor_count"])),
        ("bytes", f"{summary['total_bytes']} ({_size(summary['total_bytes'])})"),
        ("parameters", f"{summary['parameters']} ({_count(summary['parameters'])})"),
        ("bits per weight", _bpw(summary["bits_per_weight"])),
    ]))


def inspect_command(
    path: str = typer.Argument(..., help="A .safetensors file, an HF directory, a hub id or a .gguf file."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show the layout of a checkpoint: metadata, tensors, types, bits per weight, quantization config."""
    from qconvert.load.summary import inspect, strict_json

    summary = inspect(path)
    if json_:
        json.dump(strict_json(summary), sys.stdout, ensure_ascii=False, allow_nan=False)
        sys.stdout.write("\n")
    else:
        render(summary)
