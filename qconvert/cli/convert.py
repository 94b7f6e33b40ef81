"""`qconvert convert MODEL --to gguf --type Q4_K_M`: parse → qconvert.pipelines.convert.convert → render.

A progress bar per tensor goes to stderr; the summary (or the --dry-run plan) to stdout.
"""

from __future__ import annotations

from pathlib import Path

import typer

from qconvert.cli.progress import print_note, progress_bar
from qconvert.errors import BadInput


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _shape(ne: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in ne)


def _plan_table(result):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"plan: {result.source} → {result.file_type}", title_justify="left")
    for col in ("tensor", "ne", "type", "size", "why"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for r in result.records:
        table.add_row(Text(r.name), _shape(r.ne), r.qtype.name, _mib(r.nbytes), Text(r.reason))
    return table


def _summary_table(result):
    from rich.table import Table

    table = Table(title=f"{result.file_type}: {result.output or '(dry run)'}", title_justify="left")
    for col in ("type", "tensors", "size"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for name, (count, size) in result.by_type().items():
        table.add_row(name, str(count), _mib(size))
    table.add_section()
    table.add_row("total", str(len(result.records)), _mib(result.total_bytes))
    table.caption = (f"{result.bits_per_weight:.3f} bits per weight · {result.n_fallback} fallback(s) · "
                     f"{result.seconds:.1f} s")
    return table


def _list_architectures(value: bool) -> None:
    """Print every HF class the architecture table knows, with its GGUF arch, and exit."""
    if not value:
        return
    from rich.console import Console
    from rich.table import Table

    from qconvert.arch.table import ARCHITECTURES

    table = Table(title="architectures (convert --to gguf)")
    for col in ("HF class", "GGUF arch", "experts", "--to hf", "awq / smoothquant"):
        table.add_column(col)
    for hf_class, spec in ARCHITECTURES.items():
        table.add_row(hf_class, spec.name, "yes" if spec.experts else "", "yes" if spec.hf_config else "",
                      "yes" if spec.block else "")
    Console(highlight=False, width=120).print(table)
    raise typer.Exit()


def convert_command(
    model: str = typer.Argument(..., help="HF checkpoint directory, hub id, or .gguf file (F32/F16/BF16)."),
    list_architectures: bool = typer.Option(
        False, "--list-architectures", is_eager=True, expose_value=False, callback=_list_architectures,
        help="Print the supported HF model classes with their GGUF arch, and exit."),
    to: str = typer.Option("gguf", "--to", help="Output format: gguf, or hf (a .gguf back to safetensors)."),
    type_: str = typer.Option(None, "--type", "-t", help="GGUF file type: Q4_K_M (default), Q8_0, BF16..."),
    output: Path = typer.Option(None, "-o", "--output", help="Output file (default ./<model>-<TYPE>.gguf)."),
    imatrix: Path = typer.Option(None, "--imatrix", help="Importance matrix (GGUF or legacy .dat)."),
    pure: bool = typer.Option(False, "--pure", help="One type for every tensor: no mixture rules."),
    leave_output_tensor: bool = typer.Option(
        False, "--leave-output-tensor", help="Do not quantize output.weight."),
    output_tensor_type: str = typer.Option(
        None, "--output-tensor-type", help="Type of output.weight, e.g. q8_0."),
    token_embedding_type: str = typer.Option(
        None, "--token-embedding-type", help="Type of token_embd.weight."),
    tensor_type: list[str] = typer.Option(
        None, "--tensor-type", help="REGEX=TYPE (repeatable, first match wins)."),
    override_kv: list[str] = typer.Option(
        None, "--override-kv", help="KEY=TYPE:VALUE with TYPE int, float, bool or str (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan and sizes only."),
    threads: int = typer.Option(None, "--threads", min=1, help="Quantizer threads (default: all cores)."),
    config: Path = typer.Option(None, "--config", help="YAML mixture preset or recipe (configs/gguf)."),
    pre_tokenizer: str = typer.Option(
        None, "--pre-tokenizer", help="llama.cpp pre-tokenizer name, when it cannot be detected."),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize", help="Accept an already-quantized GGUF (dequantized first)."),
    dtype: str = typer.Option(None, "--dtype", help="--to hf: bf16 (default), f16 or f32."),
    lora: Path = typer.Option(
        None, "--lora", help="PEFT LoRA adapter directory, merged into the weights as they are read."),
    base: str = typer.Option(
        None, "--base", help="MODEL is a PEFT LoRA adapter: write it as a llama.cpp adapter GGUF for this "
        "base (HF checkpoint; --type F32, F16 or BF16)."),
    target_bpw: float = typer.Option(
        None, "--target-bpw", help="Choose each tensor's type for the least imatrix-weighted error at this "
        "many bits per weight (needs --imatrix; --type is the base mixture)."),
    target_size: str = typer.Option(
        None, "--target-size", help="As --target-bpw, to a file size: bytes or 2.1GB, 900MiB."),
    save_config: Path = typer.Option(
        None, "--save-config", help="Write the size target's plan as a YAML recipe (--config reuses it)."),
) -> None:
    """Convert a checkpoint to GGUF for llama.cpp in one step (convert_hf_to_gguf.py + llama-quantize)."""
    from rich.console import Console

    from qconvert.pipelines.convert import ConvertOptions, convert

    # the quantizer's flags mean nothing to the two other conversions: refused, not ignored
    quantizer_flags = {"--imatrix": imatrix, "--pure": pure, "--leave-output-tensor": leave_output_tensor,
                       "--output-tensor-type": output_tensor_type,
                       "--token-embedding-type": token_embedding_type, "--tensor-type": tensor_type,
                       "--override-kv": override_kv, "--dry-run": dry_run,
                       "--config": config, "--pre-tokenizer": pre_tokenizer, "--lora": lora,
                       "--allow-requantize": allow_requantize, "--threads": threads}
    if to.lower() == "hf":
        _refuse_flags("--to hf", {**quantizer_flags, "--type": type_, "--base": base})
        return _to_hf(model, output, dtype)
    if base is not None:
        _refuse_flags("--base (a LoRA adapter GGUF)", {**quantizer_flags, "--dtype": dtype})
        return _lora_gguf(model, base, output, type_)
    if to.lower() != "gguf":
        raise BadInput(f"--to {to!r}: gguf or hf (packed safetensors: qconvert quantize)")
    if dtype is not None:
        raise BadInput("--dtype applies to --to hf only (GGUF types: --type)")
    opts = ConvertOptions(
        file_type=type_, output=output, config=config, imatrix=imatrix, pure=pure,
        leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type, tensor_types=list(tensor_type or []),
        override_kv=list(override_kv or []), dry_run=dry_run, threads=threads, pre_tokenizer=pre_tokenizer,
        allow_requantize=allow_requantize, lora=lora, target_bpw=target_bpw, target_size=target_size,
        save_config=save_config)
    out = Console(highlight=False)
    if not out.is_terminal:  # piped: wide enough that tensor names are not cut
        out = Console(highlight=False, width=160, color_system=None)
    if dry_run:
        result = convert(model, opts)
        print_note(result.note)
        out.print(_plan_table(result))
        out.print(_summary_table(result))
        return
    with progress_bar(fields=("size",)) as bar:
        bar.update(text="quantizing")

        def progress(record, done: int, total: int) -> None:
            bar.update(done, total, record.name, size=f"{record.qtype.name} {_mib(record.nbytes)}")

        result = convert(model, opts, progress)
    print_note(result.note)
    out.print(_summary_table(result))


def _refuse_flags(mode: str, flags: dict[str, object]) -> None:
    given = [name for name, value in flags.items() if value not in (None, False, [])]
    if given:
        raise BadInput(f"{', '.join(given)}: not an option of {mode}")


def _to_hf(model: str, output: Path | None, dtype: str | None) -> None:
    """GGUF -> HF checkpoint directory (pipelines/to_hf.py)."""
    from rich.console import Console

    from qconvert.pipelines.to_hf import convert_to_hf

    if not model.lower().endswith(".gguf"):
        raise BadInput("--to hf converts a .gguf file", model)
    if output is None:
        raise BadInput("--to hf needs -o DIR (the checkpoint directory to write)")
    with progress_bar() as bar:
        bar.update(text="dequantizing")

        def progress(name: str, done: int, total: int) -> None:
            bar.update(done, total, name)

        result = convert_to_hf(model, output, dtype or "bf16", progress)
    for note in result.notes:
        print_note(note)
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.types.items()))
    Console(highlight=False).print(
        f"{result.architecture}: {result.n_tensors} tensors ({types} in the GGUF) -> {result.dtype} "
        f"{_mib(result.total_bytes)} in {result.output} · {result.seconds:.1f} s")


def _lora_gguf(adapter: str, base: str, output: Path | None, type_: str | None) -> None:
    """PEFT adapter -> llama.cpp LoRA adapter GGUF (pipelines/lora_gguf.py)."""
    from rich.console import Console

    from qconvert.pipelines.lora_gguf import convert_lora

    r = convert_lora(adapter, base, output, type_)
    Console(highlight=False).print(
        f"{r.architecture} LoRA adapter: {r.n_pairs} Linears, r={r.rank}, alpha={r.alpha:g}, {r.file_type} "
        f"{_mib(r.nbytes)} -> {r.output} · {r.seconds:.1f} s (llama.cpp: --lora {r.output.name})")
