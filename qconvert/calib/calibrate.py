"""`qconvert calibrate`: activation statistics of every linear input, for later passes (quantize --stats)."""

from __future__ import annotations

import json
from pathlib import Path

from qconvert.calib.datasets import load_calibration, load_tokenizer
from qconvert.calib.runner import LayerwiseRunner, OnLayer, OnStats, Progress
from qconvert.calib.stats import CalibStats, LinearStats, StatsFileWriter, config_hash, parse_kinds


def calibrate(ckpt, dataset: str, **options) -> CalibStats:
    """Run `num_samples` x `seq_len` tokens of `dataset` through `ckpt` one layer at a time and keep every
    statistic in memory: per linear (HF module names), with the provenance metadata `load_stats` checks.
    Options: see `_run`."""
    linears: dict[str, LinearStats] = {}
    meta = _run(ckpt, dataset, linears.update, **options)
    return CalibStats(linears, meta)


def calibrate_to_file(path: str | Path, ckpt, dataset: str, **options) -> dict[str, str]:
    """As `calibrate`, but each layer's statistics go into the stats file as soon as the layer is done, so
    memory holds one layer's (the Hessians of a whole model can be larger than the model). Returns the
    file's metadata; the file appears only when complete."""
    with StatsFileWriter(path) as w:
        return w.commit(_run(ckpt, dataset, w.add, **options))


def _run(
    ckpt,
    dataset: str,
    on_stats: OnStats,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str | None = None,
    kinds=None,
    lm_head: bool = False,
    device: str | None = "auto",
    dtype: str = "bf16",
    threads: int | None = None,
    batch_size: int = 1,
    offload_dir: str | Path | None = None,
    on_layer: OnLayer | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """The calibration pass: statistics go to `on_stats` layer by layer; returns the provenance metadata.
    `on_layer` is passed to the engine (quantize-as-you-go, see calib.runner)."""
    kinds = parse_kinds(kinds)
    data = load_calibration(
        dataset,
        load_tokenizer(ckpt),
        seq_len=seq_len,
        num_samples=num_samples,
        seed=seed,
        text_field=text_field,
    )
    runner = LayerwiseRunner(
        ckpt, device=device, dtype=dtype, threads=threads, batch_size=batch_size, offload_dir=offload_dir
    )
    runner.run(data.tokens, kinds=kinds, lm_head_stats=lm_head, on_layer=on_layer, on_stats=on_stats,
               progress=progress)
    return {
        "model": ckpt.name,
        "config_sha256": config_hash(ckpt.config),
        "architecture": ",".join(ckpt.config.get("architectures") or []),
        "dataset": dataset,
        "text_field": text_field or "",
        "seed": str(seed),
        "num_samples": str(data.num_samples),
        "seq_len": str(data.seq_len),
        "tokens": str(int(data.tokens.numel())),
        "add_bos": json.dumps(data.add_bos),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "stats": ",".join(sorted(kinds)),
    }
