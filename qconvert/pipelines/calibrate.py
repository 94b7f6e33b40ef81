"""`qconvert calibrate`: activation statistics of every linear input, for later passes (quantize --stats)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qconvert.calib.datasets import load_calibration, load_tokenizer
from qconvert.calib.runner import LayerwiseRunner, OnLayer, OnStats, Progress
from qconvert.calib.stats import CalibStats, LinearStats, StatsFileWriter, config_hash, parse_kinds


@dataclass(frozen=True)
class CalibrateOptions:
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str | None = None  # jsonl/parquet/hf: the record field (default: guessed)
    kinds: str | Iterable[str] | None = None  # statistics to keep (default: calib.stats.DEFAULT_KINDS)
    lm_head: bool = False  # lm_head's input statistics too
    device: str | None = "auto"
    dtype: str = "bf16"
    threads: int | None = None
    batch_size: int = 1
    offload_dir: str | Path | None = None
    # MoE: every expert's statistics over every token (the layer output still follows the top-k routing)
    all_experts: bool = False


def calibrate(ckpt, dataset: str, opts: CalibrateOptions = CalibrateOptions(), *,
              progress: Progress | None = None, on_layer: OnLayer | None = None) -> CalibStats:
    """Run `num_samples` x `seq_len` tokens of `dataset` through `ckpt` one layer at a time and keep every
    statistic in memory: per linear (HF module names), with the provenance metadata `load_stats` checks."""
    linears: dict[str, LinearStats] = {}
    meta = _run(ckpt, dataset, linears.update, opts, on_layer, progress)
    return CalibStats(linears, meta)


def calibrate_to_file(path: str | Path, ckpt, dataset: str, opts: CalibrateOptions = CalibrateOptions(), *,
                      progress: Progress | None = None, on_layer: OnLayer | None = None) -> dict[str, str]:
    """As `calibrate`, but each layer's statistics go into the stats file as soon as the layer is done, so
    memory holds one layer's (the Hessians of a whole model can be larger than the model). Returns the
    file's metadata; the file appears only when complete."""
    with StatsFileWriter(path) as w:
        return w.commit(_run(ckpt, dataset, w.add, opts, on_layer, progress))


def _run(ckpt, dataset: str, on_stats: OnStats, opts: CalibrateOptions, on_layer: OnLayer | None,
         progress: Progress | None) -> dict[str, str]:
    """The calibration pass: statistics go to `on_stats` layer by layer; returns the provenance metadata.
    `on_layer` is passed to the engine (quantize-as-you-go, see calib.runner)."""
    from qconvert.formats.packed.dense import dense_source

    ckpt = dense_source(ckpt)  # a quantized source runs as its dequantized checkpoint
    kinds = parse_kinds(opts.kinds)
    data = load_calibration(dataset, load_tokenizer(ckpt), seq_len=opts.seq_len, num_samples=opts.num_samples,
                            seed=opts.seed, text_field=opts.text_field)
    runner = LayerwiseRunner(ckpt, device=opts.device, dtype=opts.dtype, threads=opts.threads,
                             batch_size=opts.batch_size, offload_dir=opts.offload_dir,
                             all_experts=opts.all_experts)
    runner.run(data.tokens, kinds=kinds, lm_head_stats=opts.lm_head, on_layer=on_layer, on_stats=on_stats,
               progress=progress)
    return {
        "model": ckpt.name,
        "config_sha256": config_hash(ckpt.config),
        "architecture": ",".join(ckpt.config.get("architectures") or []),
        "dataset": dataset,
        "text_field": opts.text_field or "",
        "seed": str(opts.seed),
        "num_samples": str(data.num_samples),
        "seq_len": str(data.seq_len),
        "tokens": str(int(data.tokens.numel())),
        "add_bos": json.dumps(data.add_bos),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "stats": ",".join(sorted(kinds)),
        # MoE: (token, expert) pairs the router chose per expert; the Linears' own counts are these, or
        # every token with all_experts
        **({"expert_tokens": json.dumps(runner.expert_tokens), "all_experts": json.dumps(opts.all_experts)}
           if runner.expert_tokens else {}),
    }
