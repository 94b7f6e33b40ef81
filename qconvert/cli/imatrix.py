"""`qconvert imatrix MODEL --dataset TEXT -o imatrix.gguf`: parse → qconvert.pipelines.imatrix → render.

Options follow llama-imatrix (-c/--ctx-size, --chunks, --chunk, --process-output, --in-file, --output-format,
--no-ppl). A progress bar with ETA goes to stderr, with the running perplexity once chunks are scored.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qconvert.cli.progress import print_note, progress_bar
from qconvert.errors import BadInput


def imatrix_command(
    model: str = typer.Argument(
        None, help="HF checkpoint directory or hub id (optional with --in-file only)."
    ),
    dataset: str = typer.Option(
        None, "--dataset", "-f", help="Calibration text: .txt, .jsonl, .parquet, hf:NAME."
    ),
    output: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="Output imatrix file."),
    output_format: str = typer.Option("gguf", "--output-format", help="gguf (default) or dat (legacy)."),
    ctx_size: int = typer.Option(512, "--ctx-size", "-c", min=16, help="Tokens per chunk."),
    chunks: int = typer.Option(
        None, "--chunks", min=1, help="Process at most this many chunks (default: all)."
    ),
    from_chunk: int = typer.Option(0, "--chunk", "--from-chunk", min=0, help="Skip this many chunks first."),
    process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight."),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="Compute the perplexity estimate."),
    in_file: list[str] = typer.Option(
        None, "--in-file", help="imatrix file(s) to merge (repeatable or a,b)."
    ),
    parse_special: bool = typer.Option(
        False, "--parse-special", help="Parse special-token text in the data."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option(
        "bf16", "--dtype", help="Forward dtype: bf16 (default, as llama.cpp's CPU path), f32."
    ),
    threads: int = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
) -> None:
    """Compute a llama.cpp-compatible importance matrix (GGUF or legacy .dat), one decoder layer at a time."""
    from rich.console import Console

    from qconvert.formats.output import check_output_path
    from qconvert.pipelines import imatrix as im

    inputs = [p for item in (in_file or []) for p in item.split(",") if p]
    if output_format not in im.OUTPUT_FORMATS:
        raise BadInput(f"--output-format must be gguf or dat, not '{output_format}'")
    if dataset is None and not inputs:
        raise BadInput("give --dataset (with a MODEL) and/or --in-file")
    if dataset is not None and model is None:
        raise BadInput("--dataset needs a MODEL to run")
    check_output_path(output)  # before the pass, not after it
    err = Console(stderr=True, highlight=False)
    run = None
    if dataset is not None:
        from qconvert.formats.packed.dense import dense_note, dense_source
        from qconvert.load import open_checkpoint

        ckpt = dense_source(open_checkpoint(model))
        print_note(dense_note(ckpt))
        with progress_bar(fields=("ppl",), eta=True) as bar:
            bar.update(text="loading")

            def progress(what: str, done: int, total: int) -> None:
                bar.update(done, total, what)

            def on_ppl(n: int, value: float) -> None:
                bar.update(ppl=f"[{n}] ppl {value:.4f}")

            run = im.compute_imatrix(
                ckpt,
                dataset,
                ctx_size=ctx_size,
                chunks=chunks,
                from_chunk=from_chunk,
                process_output=process_output,
                compute_ppl=ppl,
                parse_special=parse_special,
                device=device,
                dtype=dtype,
                threads=threads,
                progress=progress,
                on_ppl=on_ppl,
            )
    imat = im.combine(run.imatrix if run else None, inputs, ctx_size)
    im.write(output, imat, output_format)
    for note in run.notes if run else []:
        err.print(f"note: {note}")
    if run is not None and run.ppl is not None:
        err.print(f"Final estimate: PPL = {run.ppl:.4f}")
    typer.echo(
        f"{output}: {len(imat.entries)} entries, {imat.chunk_count} chunks of {imat.chunk_size} tokens"
        + (f", from {len(inputs)} input file(s)" if inputs else "")
    )
