"""`qconvert quantize`: parse → run_quantize → render (rich table, or one JSON object with --json)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from qconvert.errors import BadInput

if TYPE_CHECKING:  # the pipeline imports torch: keep `qconvert --help` and other commands fast
    from qconvert.quantize_pipeline import QuantizeSummary


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"
    awq = "awq"
    fp8 = "fp8"


class Format(str, Enum):
    gptq = "gptq"
    gptq_v2 = "gptq_v2"
    compressed_tensors = "compressed-tensors"
    awq = "awq"
    fp8 = "fp8"


class Scheme(str, Enum):
    dynamic = "dynamic"
    static = "static"
    block = "block"


# --format when none is given: each method's native layout (fp8: compressed-tensors, as llm-compressor writes)
DEFAULT_FORMAT = {"gptq": "gptq", "rtn": "gptq", "awq": "awq", "fp8": "compressed-tensors"}


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
        group = row["kind"].removeprefix("fp8-") if fp8 else str(row["group_size"])
        if row["kind"] == "fp8-block":
            group = f"block {row['group_size']}×{row['group_size']}"
        table.add_row(
            str(row["layers"]),
            "fp8 e4m3" if fp8 else "int",
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


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr over decoder layers; returns (context manager, callback)."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("quantizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(file=sys.stderr),
        transient=True,
    )
    task = bar.add_task("", total=None)

    def report(done: int, total: int, text: str) -> None:
        bar.update(task, completed=done, total=total, description=text)

    return bar, report


def resolve_sym(method: str, sym: bool | None, zero_point: bool | None) -> bool:
    """--sym/--asym and AWQ's --zero-point/--no-zero-point name the same choice; AWQ defaults to a zero
    point (AutoAWQ's default), the other methods to symmetric."""
    if sym is not None and zero_point is not None and sym == zero_point:
        raise BadInput(
            f"--{'sym' if sym else 'asym'} contradicts --{'' if zero_point else 'no-'}zero-point"
        )
    if zero_point is not None:
        return not zero_point
    if sym is not None:
        return sym
    return method != "awq"


def check_method_options(method: str, bits, group_size, sym, zero_point, scheme, percentile) -> None:
    """Refuse options the chosen method would silently ignore."""
    if method == "fp8":
        given = [
            flag
            for flag, value in (("--bits", bits), ("--group-size", group_size), ("--sym/--asym", sym),
                                ("--zero-point/--no-zero-point", zero_point))
            if value is not None and not (flag == "--bits" and value == 8)
        ]
        if given:
            raise BadInput(f"{given[0]} does not apply to --method fp8 (8-bit E4M3, symmetric scales; the "
                           "granularity comes from --scheme)")
    elif scheme is not None or percentile is not None:
        raise BadInput(f"--{'scheme' if scheme is not None else 'percentile'} applies to --method fp8 only")


def quantize_command(
    model: str = typer.Argument(..., help="HF checkpoint directory, .safetensors file or hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (written atomically)."),
    method: Method = typer.Option(
        ...,
        "--method",
        help="gptq (calibrated), rtn (round-to-nearest, no data), awq (activation-aware, calibrated), "
        "fp8 (E4M3 weights; see --scheme).",
    ),
    fmt: Format = typer.Option(
        None,
        "--format",
        help="Output layout (default: gptq for gptq/rtn, awq for awq, compressed-tensors for fp8); "
        "fp8 also writes vLLM's legacy 'fp8'.",
    ),
    scheme: Scheme = typer.Option(
        None,
        "--scheme",
        help="fp8: dynamic (per-channel weights, per-token activations, no data), static (per-tensor "
        "weight and input scales; needs --dataset or --stats), block (128×128 weight blocks) "
        "(default: dynamic).",
    ),
    percentile: float = typer.Option(
        None, "--percentile", help="fp8 static: input scale from this percentile of the per-token max |x| "
        "(default: 100 = the largest value seen)."
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
        False,
        "--act-order/--no-act-order",
        help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act).",
    ),
    static_groups: bool = typer.Option(
        False, "--static-groups", help="GPTQ act-order: fix group scales up front so g_idx stays sequential."
    ),
    damp: float = typer.Option(
        0.01, "--damp", help="GPTQ damping, a fraction of mean(diag H); raised on failure."
    ),
    true_sequential: bool = typer.Option(
        True,
        "--true-sequential/--no-true-sequential",
        help="GPTQ: calibrate sub-layers in order, each on quantized inputs.",
    ),
    mse: bool = typer.Option(False, "--mse", help="Search scales on a shrink grid minimising |Q(w)-w|^2.4."),
    dataset: str = typer.Option(
        None, "--dataset", help="Calibration text (gptq, awq, fp8 static): .txt, .jsonl, .parquet, hf:NAME."
    ),
    num_samples: int = typer.Option(128, "--num-samples", help="Calibration sequences."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sequence."),
    stats: str = typer.Option(
        None, "--stats", help="A 'qconvert calibrate' file instead of --dataset: GPTQ Hessians (not "
        "sequential: every layer sees the original model's activations), fp8 static max |x|."
    ),
    device: str = typer.Option(
        "auto", "--device", help="Calibration device: auto (GPU if present), cpu, cuda:N."
    ),
    calib_dtype: str = typer.Option(
        "bf16", "--calib-dtype", help="Calibration forward dtype: bf16 (as the engines run), f16 or f32 "
        "(Hessians and statistics are float32 either way)."
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
) -> None:
    """Quantize to packed safetensors for vLLM, SGLang and transformers (GPTQ, AWQ, FP8;
    compressed-tensors)."""
    check_method_options(method.value, bits, group_size, sym, zero_point, scheme, percentile)
    sym = resolve_sym(method.value, sym, zero_point)
    from qconvert.formats.safetensors_out import parse_size
    from qconvert.quantize_pipeline import QuantizeOptions, run_quantize

    opts = QuantizeOptions(
        model=model,
        output=output,
        method=method.value,
        format=fmt.value if fmt is not None else DEFAULT_FORMAT[method.value],
        scheme=(scheme or Scheme.dynamic).value,
        percentile=100.0 if percentile is None else percentile,
        bits=8 if method is Method.fp8 else (4 if bits is None else bits),
        group_size=128 if group_size is None else group_size,
        sym=sym,
        act_order=act_order,
        static_groups=static_groups,
        damp=damp,
        true_sequential=true_sequential,
        mse=mse,
        ignore=list(ignore or []),
        layer_config=layer_config,
        quantize_lm_head=quantize_lm_head,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        stats=stats,
        device=device,
        calib_dtype=calib_dtype,
        max_shard_bytes=parse_size(max_shard_size),
        overwrite=overwrite,
    )
    bar, report = _progress_bar(sys.stderr.isatty() and not json_)
    with bar:
        summary = run_quantize(opts, report)
    if json_:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        _render(summary)
