"""`qconvert quantize`: parse → run_quantize → render (rich table, or one JSON object with --json)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from qconvert.cli.progress import layer_progress
from qconvert.errors import BadInput
from qconvert.formats.packed import FORMAT_NAMES
from qconvert.methods import METHODS
from qconvert.methods.types import SCHEMES

if TYPE_CHECKING:  # the pipeline imports torch: keep `qconvert --help` and other commands fast
    from qconvert.pipelines.quantize import QuantizeSummary

# choices come from the registries (light imports: no torch)
Method = Enum("Method", {name: name for name in METHODS}, type=str)  # type: ignore[misc]
Format = Enum("Format", {name: name for name in FORMAT_NAMES}, type=str)  # type: ignore[misc]
Scheme = Enum("Scheme", {name: name for name in SCHEMES}, type=str)  # type: ignore[misc]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _render(summary: QuantizeSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.method} → {summary.format}: {summary.output}", title_justify="left")
    for col in ("layers", "type", "bits", "group", "sym", "size", "bits/weight", "max error"):
        table.add_column(col, justify="right")
    for row in summary.table():
        fp8 = row["kind"].startswith("fp8-")
        fp4 = row["kind"] in ("nvfp4", "mxfp4")
        group = row["kind"].removeprefix("fp8-") if fp8 else str(row["group_size"])
        if row["kind"] == "fp8-block":
            group = f"block {row['group_size']}×{row['group_size']}"
        table.add_row(
            str(row["layers"]),
            "fp8 e4m3" if fp8 else f"fp4 e2m1 ({row['kind']})" if fp4 else "int",
            str(row["bits"]),
            group,
            "yes" if row["sym"] else "no",
            _size(row["bytes"]),
            f"{row['bits_per_weight']:.3f}",
            f"{row['max_error']:.4g}",
        )
    console = Console(highlight=False)
    console.print(table)
    console.print(
        f"kept unquantized: {len(summary.skipped)} Linear(s); output {_size(summary.output_bytes)} "
        f"(source {_size(summary.source_bytes)}) in {summary.seconds:.1f} s"
    )
    for note in summary.notes:
        console.print(f"note: {note}")


def resolve_sym(sym: bool | None, zero_point: bool | None) -> bool | None:
    """--sym/--asym and AWQ's --zero-point/--no-zero-point name the same choice (None: the method's default;
    AWQ has a zero point, as AutoAWQ, the other methods are symmetric)."""
    if sym is not None and zero_point is not None and sym == zero_point:
        raise BadInput(
            f"--{'sym' if sym else 'asym'} contradicts --{'' if zero_point else 'no-'}zero-point"
        )
    return (not zero_point) if zero_point is not None else sym


def quantize_command(
    model: str = typer.Argument(..., help="HF checkpoint directory, .safetensors file or hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    method: Method = typer.Option(
        ..., "--method", help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + "."
    ),
    fmt: Format = typer.Option(
        None,
        "--format",
        help="Output layout (default: "
        + ", ".join(f"{m.default_format} for {m.name}" for m in METHODS.values())
        + "); fp8 also writes vLLM's legacy 'fp8'.",
    ),
    scheme: Scheme = typer.Option(
        None,
        "--scheme",
        help="The number format, named after llm-compressor's preset: "
        + "; ".join(f"{s.name} (--method {'/'.join(s.methods)}): {s.help}" for s in SCHEMES.values())
        + " (fp8 default: dynamic).",
    ),
    percentile: float = typer.Option(
        None, "--percentile", help="fp8 static: input scale from this percentile of the per-token max |x| "
        "(default: 100 = the largest value seen)."
    ),
    smoothquant: float = typer.Option(
        None, "--smoothquant", metavar="ALPHA", help="--scheme w8a8 (rtn, gptq): SmoothQuant with strength "
        "ALPHA (0-1; llm-compressor's int8 example uses 0.8) from the calibration inputs' max |x| "
        "(--dataset or --stats), folded into the norms before q/k/v and gate/up."
    ),
    kv_cache: str = typer.Option(
        None, "--kv-cache", metavar="fp8", help="FP8 KV cache: per-tensor k_scale / v_scale of every "
        "attention layer from the keys after RoPE and the values over --dataset (compressed-tensors "
        "kv_cache_scheme, as llm-compressor writes it; any weight scheme)."
    ),
    bits: int = typer.Option(None, "--bits", help="Weight bits: 2, 3, 4 or 8 (awq: 4); default 4."),
    group_size: int = typer.Option(
        None, "--group-size", help="Input columns per scale: 32, 64, 128 or -1 (per row); default 128."
    ),
    sym: bool = typer.Option(
        None, "--sym/--asym", help="Symmetric (fixed zero point) or asymmetric (default: sym; awq: asym)."
    ),
    zero_point: bool = typer.Option(
        None, "--zero-point/--no-zero-point", help="AWQ's name for --asym/--sym (awq default: zero point)."
    ),
    act_order: bool = typer.Option(
        None,
        "--act-order/--no-act-order",
        help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act).",
    ),
    static_groups: bool = typer.Option(
        None, "--static-groups/--no-static-groups",
        help="GPTQ act-order: fix group scales up front so g_idx stays sequential.",
    ),
    damp: float = typer.Option(
        None, "--damp", help="GPTQ damping, a fraction of mean(diag H); raised on failure (default 0.01)."
    ),
    true_sequential: bool = typer.Option(
        None,
        "--true-sequential/--no-true-sequential",
        help="GPTQ: calibrate sub-layers in order, each on quantized inputs.",
    ),
    mse: bool = typer.Option(
        None, "--mse/--no-mse", help="Search scales on a shrink grid minimising |Q(w)-w|^2.4."
    ),
    dataset: str = typer.Option(
        None, "--dataset", help="Calibration text (gptq, awq, fp8 static): .txt, .jsonl, .parquet, hf:NAME."
    ),
    num_samples: int = typer.Option(
        None, "--num-samples", min=1, help="Calibration sequences (default 128)."
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", min=1, help="Tokens per calibration sequence (default 512)."
    ),
    stats: str = typer.Option(
        None, "--stats", help="A 'qconvert calibrate' file instead of --dataset: GPTQ Hessians (not "
        "sequential: every layer sees the original model's activations), fp8 static max |x|."
    ),
    device: str = typer.Option(
        None, "--device", help="Calibration device: auto (GPU if present, the default), cpu, cuda:N."
    ),
    calib_dtype: str = typer.Option(
        None, "--calib-dtype", help="Calibration forward dtype: bf16 (as the engines run; default), f16, f32 "
        "(Hessians and statistics are float32 either way)."
    ),
    all_experts: bool = typer.Option(
        None, "--all-experts/--routed-experts", help="MoE (gptq, awq): each expert's statistics over every "
        "calibration token, while the layer output still follows the model's top-k routing (llm-compressor's "
        "calibrate-all-experts); default: the tokens routed to it."
    ),
    min_expert_tokens: int = typer.Option(
        None, "--min-expert-tokens", min=0, help="MoE (gptq, awq): an expert whose Linears saw fewer "
        "calibration tokens is quantized with RTN (gptq) or keeps unit AWQ scales, and is named in the "
        "summary (default 32)."
    ),
    ignore: list[str] = typer.Option(
        None, "--ignore", help="Regex of Linear names to keep unquantized (repeatable)."
    ),
    layer_config: str = typer.Option(
        None, "--layer-config", help="Per-layer overrides: a YAML file or a preset in configs/quantize/."
    ),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Quantize lm_head too."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON summary object instead of the table."),
    lora: Path = typer.Option(
        None, "--lora", help="PEFT LoRA adapter directory, merged into the weights as they are read."),
) -> None:
    """Quantize to packed safetensors for vLLM, SGLang and transformers (GPTQ, AWQ, FP8;
    compressed-tensors)."""
    given = {
        "bits": bits, "group_size": group_size, "sym": resolve_sym(sym, zero_point), "mse": mse,
        "act_order": act_order, "static_groups": static_groups, "damp": damp,
        "true_sequential": true_sequential, "dataset": dataset, "num_samples": num_samples,
        "seq_len": seq_len, "stats": stats, "device": device, "calib_dtype": calib_dtype,
        "scheme": scheme.value if scheme is not None else None, "percentile": percentile,
        "smoothquant": smoothquant, "kv_cache": kv_cache, "all_experts": all_experts,
        "min_expert_tokens": min_expert_tokens,
    }
    from qconvert.formats.safetensors_out import parse_size
    from qconvert.pipelines.quantize import QuantizeOptions, run_quantize

    opts = QuantizeOptions(
        model=model,
        output=output,
        method=method.value,
        options={k: v for k, v in given.items() if v is not None},  # the method refuses what it does not take
        format=fmt.value if fmt is not None else None,
        ignore=list(ignore or []),
        layer_config=layer_config,
        quantize_lm_head=quantize_lm_head,
        max_shard_bytes=parse_size(max_shard_size),
        overwrite=overwrite,
        lora=lora,
    )
    with layer_progress("quantizing", enabled=not json_) as report:
        summary = run_quantize(opts, report)
    if json_:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        _render(summary)
