"""`qconvert calibrate MODEL --dataset DATA -o stats.safetensors`: parse → pipelines.calibrate → render."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qconvert.cli.progress import print_note, progress_bar


def calibrate_command(
    model: str = typer.Argument(..., help="HF checkpoint directory or hub id."),
    dataset: str = typer.Option(
        ..., "--dataset", help="Calibration data: .txt, .jsonl, .parquet, hf:NAME[:CONFIG][:SPLIT]."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Statistics file (.safetensors)."),
    num_samples: int = typer.Option(128, "--num-samples", "-n", min=1, help="Number of token chunks."),
    seq_len: int = typer.Option(512, "--seq-len", min=1, help="Tokens per chunk."),
    seed: int = typer.Option(0, "--seed", help="Seed for picking records/chunks."),
    text_field: str = typer.Option(
        None, "--text-field", help="Record field holding the text (jsonl/parquet/hf)."
    ),
    stats: str = typer.Option(
        "hessian,abs_sum,sq_sum,abs_max", "--stats",
        help="Comma list of hessian, abs_sum, sq_sum, abs_max, token_max (per-token max |x|, for FP8 "
        "percentiles), or all.",
    ),
    lm_head: bool = typer.Option(False, "--lm-head", help="Also collect the input of lm_head."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("bf16", "--dtype", help="Forward dtype: bf16 (default), f16 or f32."),
    threads: int = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Samples per forward."),
    offload_dir: Path = typer.Option(None, "--offload-dir", help="Spill activations to this directory."),
    lora: Path = typer.Option(
        None, "--lora", help="PEFT LoRA adapter directory, merged into the weights as they are read."),
    all_experts: bool = typer.Option(
        False, "--all-experts",
        help="MoE: every expert's statistics over every token, while the layer output still follows the "
        "model's top-k routing (llm-compressor's calibrate-all-experts)."),
) -> None:
    """Collect activation statistics of every linear input (Σxxᵀ, Σ|x|, Σx², max|x|), one layer at a time."""
    from qconvert.formats.packed.dense import dense_note, dense_source
    from qconvert.load import open_checkpoint
    from qconvert.load.lora import lora_note, lora_source
    from qconvert.pipelines.calibrate import CalibrateOptions, calibrate_to_file

    ckpt = dense_source(open_checkpoint(model))
    print_note(dense_note(ckpt))
    ckpt = lora_source(ckpt, lora)  # merged before anything else reads a weight
    print_note(lora_note(ckpt))
    with progress_bar(eta=True) as bar:
        bar.update(text="loading")

        def progress(what: str, done: int, total: int) -> None:
            bar.update(done, total, what)

        opts = CalibrateOptions(num_samples=num_samples, seq_len=seq_len, seed=seed, text_field=text_field,
                                kinds=stats, lm_head=lm_head, device=device, dtype=dtype, threads=threads,
                                batch_size=batch_size, offload_dir=offload_dir, all_experts=all_experts)
        m = calibrate_to_file(output, ckpt, dataset, opts, progress=progress)
    typer.echo(
        f"{output}: {m['linears']} linears, {m['num_samples']} x {m['seq_len']} tokens "
        f"({m['tokens']}), stats {m['stats']}"
    )
    if "expert_tokens" in m:
        from qconvert.calib.experts import MIN_EXPERT_TOKENS, token_report

        report = token_report(json.loads(m["expert_tokens"]))
        seen = "every token (--all-experts)" if all_experts else "their routed tokens"
        typer.echo(f"{report}; the experts' statistics cover {seen}"
                   + ("" if all_experts else f"; quantize --method gptq --stats quantizes the experts below "
                      f"{MIN_EXPERT_TOKENS} with RTN"))
