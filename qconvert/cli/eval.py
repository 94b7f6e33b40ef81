"""`qconvert eval`: perplexity (llama-perplexity's method) and KL divergence against a reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from qconvert.cli.progress import progress_bar

# qconvert.evaluate.kl.DEFAULT_TOP_K; not imported here: the evaluate package imports torch
DEFAULT_TOP_K = 0


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _table(res: dict) -> Table:
    table = Table(title=f"qconvert eval — ctx {res['ctx_size']}, {res['chunks']} chunks, {res['tokens']} "
                        f"scored tokens", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("model", res["model"])
    table.add_row("perplexity", f"{_fmt(res['perplexity'])} ± {_fmt(res['perplexity_stderr'])}")
    if "reference" in res:
        table.add_row("reference", res["reference"])
        table.add_row("reference perplexity",
                      f"{_fmt(res['reference_perplexity'])} ± {_fmt(res.get('reference_perplexity_stderr'))}")
    if "kl_divergence" in res:
        kl = res["kl_divergence"]
        exact = "exact" if res.get("kl_top_k") == 0 else f"top-{res.get('kl_top_k')} + tail"
        table.add_row(f"KL divergence mean ({exact})", _fmt(kl["mean"], 6))
        table.add_row("KL divergence p99", _fmt(kl["p99"], 6))
        table.add_row("KL divergence median / max", f"{_fmt(kl['median'], 6)} / {_fmt(kl['max'], 6)}")
        table.add_row("top-1 agreement", f"{100 * res['top1_agreement']:.2f} %")
    if "saved_logits" in res:
        table.add_row("logits saved to", res["saved_logits"])
    return table


def eval_command(
    model: str = typer.Argument(..., help="Model to evaluate: a .gguf file (llama.cpp) or an HF directory "
                                          "(dense, compressed-tensors, GPTQ, AWQ, FP8)."),
    dataset: Path = typer.Option(..., "--dataset", help="Evaluation text file (UTF-8), tokenized once."),
    reference: str = typer.Option(
        None, "--reference", help="Source model to compare against (.gguf or HF directory): adds KL "
        "divergence and top-1 agreement."),
    logits: Path = typer.Option(None, "--logits", help="Reference logits saved earlier with --save-logits "
                                                      "(instead of --reference)."),
    save_logits: Path = typer.Option(
        None, "--save-logits", help="Save the reference's distributions (MODEL's own without --reference) "
        "for later --logits."),
    ctx_size: int = typer.Option(512, "--ctx-size", "-c", help="Tokens per chunk (second half scored)."),
    chunks: int = typer.Option(None, "--chunks", min=1, help="Evaluate at most N chunks (default: all)."),
    top_k: int = typer.Option(
        DEFAULT_TOP_K, "--kl-top-k", help="Keep only the reference's top-k tokens per position (smaller "
        "logits file; KL then slightly underestimated); 0 = the full distribution."),
    loader: str = typer.Option(
        "auto", "--loader", help="HF checkpoints: auto, transformers, unpack (our kernels dequantize "
        "GPTQ/AWQ/compressed-tensors/FP8), or emulate (compressed-tensors with activation quantization)."),
    threads: int = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all available)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Perplexity and KL divergence of MODEL against its source, computed as llama-perplexity does."""
    from qconvert.evaluate.run import evaluate

    with progress_bar() as bar:
        result = evaluate(model, dataset, reference=reference, logits=logits, save_logits_to=save_logits,
                          ctx=ctx_size, chunks=chunks, top_k=top_k, loader=loader, threads=threads,
                          progress=bar.start)
    res = result.to_json()
    if as_json:
        typer.echo(json.dumps(res))
    else:
        Console().print(_table(res))
