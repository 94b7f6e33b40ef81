"""`qconvert quantize --method fp8`: checkpoint → FP8 weights (+ static input scales) → format → writer.

Streams tensor by tensor: each weight is read from the mmap, quantized, handed to the writer (which spills it
to disk) and dropped, so peak memory is about one tensor plus what the calibration pass needs.

    --scheme dynamic  per-channel weight scales, dynamic per-token activations; no data
    --scheme static   per-tensor weight scale; per-tensor input scale from the calibration engine's max |x|
                      (or --percentile of per-token maxima); --dataset, or --stats from 'qconvert calibrate'
    --scheme block    128×128 weight blocks, dynamic activations; layers whose shapes don't divide refuse
                      (name them with --ignore)

Which Linears: the same selection as the integer methods (quantize_pipeline.find_linears): decoder Linears,
lm_head only with --quantize-lm-head, --ignore regexes and a layer config's ``ignore`` list.
"""

from __future__ import annotations

import re
import time

import torch

from qconvert.errors import BadInput
from qconvert.formats.fp8 import FORMATS, SCHEMES
from qconvert.formats.safetensors_out import CheckpointWriter
from qconvert.methods.fp8 import FP8Spec, fp8_quantize, input_scale, relative_error
from qconvert.quantize_pipeline import (
    DEFAULT_IGNORE,
    LayerPlan,
    LayerResult,
    Progress,
    QuantizeOptions,
    QuantizeSummary,
    _compile,
    _model_dtype,
    find_linears,
    load_layer_config,
    stream_quantized,
    write_tensors,
)

STRATEGY_GROUP = {"tensor": 0, "channel": -1}  # LayerResult.group_size: 0 = one scale per tensor


def plan_fp8(ckpt, opts: QuantizeOptions):
    """(format, layer plans with FP8Spec, decoder layer count); every user error is raised here."""
    if opts.scheme not in SCHEMES:
        raise BadInput(f"--scheme {opts.scheme!r}: choose one of {', '.join(SCHEMES)}")
    if opts.format not in FORMATS:
        raise BadInput(f"--method fp8 writes --format {' or '.join(FORMATS)}, not {opts.format!r}")
    if not 0 < opts.percentile <= 100:
        raise BadInput(f"--percentile {opts.percentile}: must be in (0, 100]")
    if opts.scheme == "static":
        if opts.dataset and opts.stats:
            raise BadInput("give either --dataset (calibrate now) or --stats (a 'qconvert calibrate' file)")
        if not opts.dataset and not opts.stats:
            raise BadInput(
                "--scheme static needs activation statistics: --dataset FILE.txt|.jsonl|.parquet|hf:NAME "
                "(or --stats FILE from 'qconvert calibrate')"
            )
    elif opts.dataset or opts.stats:
        raise BadInput(f"--scheme {opts.scheme} needs no data; --dataset/--stats only serve --scheme static")
    elif opts.percentile != 100:
        raise BadInput("--percentile only applies to --scheme static")
    lc = load_layer_config(opts.layer_config)
    if lc.get("overrides"):
        raise BadInput("layer config overrides (bits, group size) do not apply to fp8; only 'ignore' does")
    ignore = _compile(list(DEFAULT_IGNORE) + list(opts.ignore) + list(lc.get("ignore") or []), "--ignore")
    plans, n_layers = find_linears(ckpt, ignore, opts.quantize_lm_head)
    quantized = [p for p in plans if p.spec is not None]
    if not quantized:
        raise BadInput("no Linear layers to quantize (check --ignore and the layer config)", ckpt.path)
    fmt = FORMATS[opts.format]()
    spec = fmt.spec(opts.scheme, _model_dtype(ckpt, [p.weight for p in quantized]))
    bad = [p.prefix for p in quantized if spec.strategy == "block" and (p.shape[0] % 128 or p.shape[1] % 128)]
    if bad:
        n, k = next(p.shape for p in quantized if p.prefix == bad[0])
        raise BadInput(
            f"--scheme block: {len(bad)} Linear(s) do not divide into 128×128 blocks (first: {bad[0]}, "
            f"{n}×{k}); skip them with --ignore (e.g. --ignore '{re.escape(bad[0])}$') or use "
            "--scheme dynamic"
        )
    for p in quantized:
        p.spec = spec  # type: ignore[assignment]  # an FP8Spec here, a QuantSpec for the integer methods
    return fmt, plans, n_layers


def run_fp8(ckpt, opts: QuantizeOptions, progress: Progress | None, t0: float) -> QuantizeSummary:
    fmt, plans, n_layers = plan_fp8(ckpt, opts)
    quantized = {p.weight: p for p in plans if p.spec is not None}
    # the writer checks the output path now, before the calibration pass
    writer = CheckpointWriter(opts.output, max_shard_bytes=opts.max_shard_bytes, overwrite=opts.overwrite)
    in_scales = _input_scales(ckpt, opts, list(quantized.values())) if opts.scheme == "static" else {}
    skipped = [p.prefix for p in plans if p.spec is None]

    def fp8(out: CheckpointWriter, p: LayerPlan, w: torch.Tensor) -> LayerResult:
        try:
            qt = fp8_quantize(w, p.spec, p.prefix)  # type: ignore[arg-type]
        except BadInput as e:  # name the file the bad tensor is in
            raise BadInput(str(e), ckpt.tensors[p.weight].file) from None
        packed = fmt.pack(p.prefix, qt, in_scales.get(p.prefix))
        return write_tensors(out, packed, _result(p, qt.spec, relative_error(w, qt)))

    with writer as out:
        results = stream_quantized(ckpt, out, quantized, fp8, n_layers, progress)
        config = dict(ckpt.config)
        config["quantization_config"] = fmt.quantization_config(
            opts.scheme, skipped, lm_head=opts.quantize_lm_head
        )
        out.write_json("config.json", config)
        for fname, src in ckpt.tokenizer_files.items():
            out.copy_file(src, fname)
        output_bytes = out.total_bytes
    source_bytes = sum(info.nbytes for info in ckpt.tensors.values())
    return QuantizeSummary(
        str(opts.output),
        "fp8",
        opts.format,
        results,
        skipped,
        source_bytes,
        output_bytes,
        time.monotonic() - t0,
        scheme=opts.scheme,
    )


def _result(p: LayerPlan, spec: FP8Spec, err: float) -> LayerResult:
    group = spec.block[1] if spec.strategy == "block" else STRATEGY_GROUP[spec.strategy]
    return LayerResult(p.prefix, 8, group, True, p.shape, err, 0, kind=f"fp8-{spec.strategy}")


def _input_scales(ckpt, opts: QuantizeOptions, layers: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """Per-tensor input scale of every Linear to quantize, from a stats file or a calibration pass."""
    kinds = ("abs_max",) if opts.percentile >= 100 else ("abs_max", "token_max")
    scale_dtype = layers[0].spec.scale_dtype  # type: ignore[union-attr]
    if opts.stats:
        from qconvert.calib.stats import StatsFile

        sf = StatsFile(opts.stats, ckpt)
        stats = {p.prefix: sf.read(p.prefix, kinds) for p in layers if sf.kinds(p.prefix)}
        where = opts.stats
    else:
        from qconvert.calib.datasets import load_calibration, load_tokenizer
        from qconvert.calib.runner import LayerwiseRunner, resolve_device

        resolve_device(opts.device)
        tokens = load_calibration(
            opts.dataset, load_tokenizer(ckpt), seq_len=opts.seq_len, num_samples=opts.num_samples
        ).tokens
        runner = LayerwiseRunner(ckpt, device=opts.device, dtype=opts.calib_dtype)
        stats = runner.run(tokens, kinds=kinds, lm_head_stats=any(p.layer is None for p in layers))
        where = None
    out = {}
    for p in layers:
        st = stats.get(p.prefix)
        missing = [k for k in kinds if st is None or getattr(st, k) is None]
        if missing:
            raise BadInput(
                f"no {', '.join(missing)} statistics for {p.prefix}; collect them with 'qconvert calibrate "
                f"--stats {','.join(kinds)}{' --lm-head' if p.layer is None else ''}'",
                where,
            )
        scale = input_scale(st.abs_max, st.token_max, opts.percentile, scale_dtype)
        if not torch.isfinite(scale).all():  # NaN/Inf activations would be written as a NaN/Inf scale
            raise BadInput(
                f"{p.prefix}: its calibration inputs contain NaN or Inf (input scale {scale.item()}); "
                "check the model's weights, or use --scheme dynamic",
                where,
            )
        out[p.prefix] = scale
    return out
