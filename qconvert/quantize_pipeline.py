"""`qconvert quantize`: checkpoint → per-Linear method → packer → atomic writer.

    plan = plan_quantization(ckpt, opts)     # every check that can fail runs here, before any work
    summary = run_quantize(opts, progress)   # RTN now; GPTQ/AWQ once the calibration engine feeds Hessians

Which tensors are quantized: 2-D ``*.weight`` tensors inside decoder layers (``…layers.<i>.…``) of the text
model, minus MoE routers and anything matching ``--ignore`` or the layer config's ``ignore``; ``lm_head``
only with ``--quantize-lm-head``; embeddings never. Per-layer overrides come from a YAML
(``--layer-config``, a path or a preset name under ``configs/quantize/``): ``ignore: [regex…]`` and
``overrides: [{match: regex, bits, group_size, sym}]``, first match wins, regexes are searched in the module
prefix (``model.layers.3.mlp.down_proj``).

``quantize_linear`` is the per-layer entry point the calibration runner calls in "quantize as you go" mode.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qconvert.errors import BadInput
from qconvert.formats.awq import AWQFormat
from qconvert.formats.compressed_tensors import CompressedTensorsFormat
from qconvert.formats.gptq import GPTQFormat
from qconvert.formats.safetensors_out import DEFAULT_SHARD_BYTES, CheckpointWriter
from qconvert.load.checkpoint import Checkpoint
from qconvert.methods.gptq import gptq_quantize
from qconvert.methods.quantized import QuantizedTensor
from qconvert.methods.quantizer import QuantSpec
from qconvert.methods.rtn import relative_error, rtn_quantize

METHODS = ("rtn", "gptq", "awq", "fp8")
FORMATS = {
    "gptq": lambda: GPTQFormat(v2=False),
    "gptq_v2": lambda: GPTQFormat(v2=True),
    "compressed-tensors": CompressedTensorsFormat,
    "awq": AWQFormat,
}
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "quantize"
LINEAR_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\..+)\.weight$")
# not decoder Linears, or not worth quantizing: MoE routers, other modalities
DEFAULT_IGNORE = (r"\.mlp\.gate$", r"\.router$", r"(^|\.)(vision|visual|audio|multi_modal)")
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

Progress = Callable[[int, int, str], None]  # (decoder layers done, total, "layers.3 mlp.down_proj err 0.012")


@dataclass
class QuantizeOptions:
    model: str
    output: Path
    method: str = "gptq"
    format: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    true_sequential: bool = True
    mse: bool = False
    ignore: list[str] = field(default_factory=list)
    layer_config: str | None = None
    quantize_lm_head: bool = False
    dataset: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    device: str = "auto"  # calibrated methods: auto (GPU if present), cpu, cuda, cuda:N
    calib_dtype: str = "bf16"  # calibrated methods: the forward's dtype (Hessians and sums stay float32)
    stats: str | None = None  # gptq: Hessians (fp8 static: max |x|) from a `qconvert calibrate` file
    scheme: str = "dynamic"  # fp8: dynamic | static | block
    percentile: float = 100.0  # fp8 static: input scale from this percentile of per-token max |x|

    def spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.bits, group_size=self.group_size, sym=self.sym, mse=2.4 if self.mse else 0.0
        )


@dataclass
class LayerPlan:
    prefix: str  # module name, e.g. model.layers.3.mlp.down_proj
    weight: str  # tensor name (prefix + ".weight")
    layer: int | None  # decoder layer index (None for lm_head)
    shape: tuple[int, int]  # (N, K)
    spec: QuantSpec | None  # None = kept in its source dtype


@dataclass
class Plan:
    layers: list[LayerPlan]
    default: QuantSpec  # after the format's constraints (scale dtype, min zero)
    fmt: object
    quantization_config: dict
    n_decoder_layers: int

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.spec is not None]

    def by_weight(self) -> dict[str, LayerPlan]:
        return {p.weight: p for p in self.quantized}


@dataclass
class LayerResult:
    name: str
    bits: int
    group_size: int
    sym: bool
    shape: tuple[int, int]
    error: float  # RTN, AWQ, FP8: ||W-Wq||/||W||; GPTQ: ||(W-Wq)X||/||WX|| on the calibration inputs
    bytes: int
    kind: str = "int"  # int, or fp8-tensor / fp8-channel / fp8-block

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / (self.shape[0] * self.shape[1])


@dataclass
class QuantizeSummary:
    output: str
    method: str
    format: str
    layers: list[LayerResult]
    skipped: list[str]
    source_bytes: int
    output_bytes: int
    seconds: float
    scheme: str = ""  # fp8 only

    def table(self) -> list[dict]:
        """One row per scheme: layers, bits, group, size, bits per weight (packed tensors incl.
        scales/zeros)."""
        rows: dict[tuple, dict] = {}
        for r in self.layers:
            row = rows.setdefault(
                (r.kind, r.bits, r.group_size, r.sym),
                {
                    "kind": r.kind,
                    "bits": r.bits,
                    "group_size": r.group_size,
                    "sym": r.sym,
                    "layers": 0,
                    "params": 0,
                    "bytes": 0,
                    "max_error": 0.0,
                },
            )
            row["layers"] += 1
            row["params"] += r.shape[0] * r.shape[1]
            row["bytes"] += r.bytes
            row["max_error"] = max(row["max_error"], r.error)
        for row in rows.values():
            row["bits_per_weight"] = round(row["bytes"] * 8 / row["params"], 4) if row["params"] else 0.0
        return list(rows.values())

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "method": self.method,
            "format": self.format,
            **({"scheme": self.scheme} if self.scheme else {}),
            "schemes": self.table(),
            "skipped": self.skipped,
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 2),
            "layers": [
                {**asdict(r), "shape": list(r.shape), "bits_per_weight": round(r.bpw, 4)} for r in self.layers
            ],
        }


# ------------------------------------------------------------------------------------------------------------
# planning: everything the user can get wrong is caught here


def load_layer_config(ref: str | None) -> dict:
    """A YAML path, or the name of a preset in configs/quantize/ (with or without .yaml)."""
    if not ref:
        return {}
    path = Path(ref)
    if not path.exists():
        path = PRESET_DIR / (ref if ref.endswith((".yaml", ".yml")) else f"{ref}.yaml")
    if not path.exists():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise BadInput(f"layer config {ref!r} is neither a file nor a preset ({', '.join(presets)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"cannot read layer config: {e}".replace("\n", " "), path) from None
    if not isinstance(data, dict) or set(data) - {"ignore", "overrides", "description"}:
        raise BadInput("layer config must be a mapping with 'ignore' and/or 'overrides'", path)
    for rule in data.get("overrides") or []:
        if (
            not isinstance(rule, dict)
            or "match" not in rule
            or set(rule) - {"match", "bits", "group_size", "sym"}
        ):
            raise BadInput(f"bad override {rule!r}: keys are match, bits, group_size, sym", path)
    return data


def _compile(patterns: list[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise BadInput(f"{what} {p!r} is not a valid regular expression: {e}") from None
    return out


def _n_layers(config: dict) -> int | None:
    cfg = config.get("text_config", config)
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return int(n) if n is not None else None


def _model_dtype(ckpt, names: list[str]) -> str:
    for name in names:
        dt = FLOAT_DTYPES.get(ckpt.tensors[name].dtype)
        if dt:
            return dt
    return "float16"


def find_linears(ckpt, ignore: list[re.Pattern], lm_head: bool) -> tuple[list[LayerPlan], int]:
    """Decoder Linear weights (and lm_head when asked), in file order, with ignored ones marked spec=None."""
    n_layers = _n_layers(ckpt.config)
    plans = []
    for name, info in ckpt.tensors.items():
        m = LINEAR_RE.match(name)
        if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        if m:
            layer = int(m["layer"])
            if n_layers is not None and layer >= n_layers:
                continue
            prefix = m["prefix"]
        elif name == "lm_head.weight":
            layer, prefix = None, "lm_head"
        else:
            continue
        skip = (prefix == "lm_head" and not lm_head) or any(rx.search(prefix) for rx in ignore)
        plans.append(LayerPlan(prefix, name, layer, tuple(info.shape), None if skip else QuantSpec()))
    if lm_head and not any(p.prefix == "lm_head" for p in plans):
        raise BadInput(
            "--quantize-lm-head: this checkpoint has no separate lm_head.weight (tied to the embeddings)",
            ckpt.path,
        )
    layers = {p.layer for p in plans if p.layer is not None}
    return plans, (n_layers or (max(layers) + 1 if layers else 0))


def plan_quantization(ckpt, opts: QuantizeOptions) -> Plan:
    if opts.method not in METHODS:
        raise BadInput(f"--method {opts.method!r}: choose one of {', '.join(METHODS)}")
    if opts.format not in FORMATS:
        raise BadInput(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if not 0 < opts.damp < 1:
        raise BadInput(f"--damp {opts.damp}: must be between 0 and 1 (a fraction of mean(diag H))")
    if opts.static_groups and not opts.act_order:
        raise BadInput("--static-groups only matters with --act-order")
    fmt = FORMATS[opts.format]()
    user = opts.spec()
    fmt.check_spec(user, act_order=opts.act_order, static_groups=opts.static_groups)

    lc = load_layer_config(opts.layer_config)
    ignore = _compile(list(DEFAULT_IGNORE) + list(opts.ignore) + list(lc.get("ignore") or []), "--ignore")
    rules = [
        (rx, rule)
        for rx, rule in zip(
            _compile([r["match"] for r in lc.get("overrides") or []], "override"),
            lc.get("overrides") or [],
            strict=True,
        )
    ]
    plans, n_layers = find_linears(ckpt, ignore, opts.quantize_lm_head)
    quantized = [p for p in plans if p.spec is not None]
    if not quantized:
        raise BadInput("no Linear layers to quantize (check --ignore and the layer config)", ckpt.path)

    model_dtype = _model_dtype(ckpt, [p.weight for p in quantized])
    default = fmt.adapt(user, model_dtype)
    for p in quantized:
        spec = default
        for rx, rule in rules:
            if rx.search(p.prefix):
                changes = {k: rule[k] for k in ("bits", "group_size", "sym") if k in rule}
                spec = fmt.adapt(replace(user, **changes), model_dtype)
                fmt.check_spec(spec, act_order=opts.act_order, static_groups=opts.static_groups)
                break
        n, k = p.shape
        g = spec.group_for(k)
        if k % g:
            raise BadInput(
                f"{p.prefix}: group size {g} does not divide its {k} input columns; choose a group that "
                f"divides {k} or skip it with --ignore '{re.escape(p.prefix)}'"
            )
        fmt.check_layer(p.prefix, n, k, spec)
        p.spec = spec
    overrides = {p.prefix: p.spec for p in quantized if p.spec != default}
    skipped = [p.prefix for p in plans if p.spec is None]
    qcfg = fmt.quantization_config(
        default,
        overrides,
        skipped,
        method=opts.method,
        act_order=opts.act_order,
        static_groups=opts.static_groups,
        damp=opts.damp,
        true_sequential=opts.true_sequential,
        lm_head=opts.quantize_lm_head,
    )
    return Plan(plans, default, fmt, qcfg, n_layers)


# ------------------------------------------------------------------------------------------------------------
# per layer


def quantize_linear(
    plan: LayerPlan,
    weight: torch.Tensor | np.ndarray,
    opts: QuantizeOptions,
    hessian: torch.Tensor | np.ndarray | None = None,
) -> tuple[QuantizedTensor, float]:
    """Run the chosen method on one Linear; GPTQ needs the layer's Hessian (from the calibration runner)."""
    assert plan.spec is not None
    if opts.method == "rtn":
        qt = rtn_quantize(weight, plan.spec)
        return qt, relative_error(weight, qt)
    if opts.method == "gptq":
        if hessian is None:
            raise ValueError(f"{plan.prefix}: GPTQ needs a Hessian")
        return gptq_quantize(
            weight,
            hessian,
            plan.spec,
            act_order=opts.act_order,
            static_groups=opts.static_groups,
            damp=opts.damp,
            name=plan.prefix,
        )
    raise ValueError(f"quantize_linear: no per-layer path for --method {opts.method}")


def _label(p: LayerPlan, error: float) -> str:
    short = p.prefix.split(f"layers.{p.layer}.", 1)[-1] if p.layer is not None else p.prefix
    where = f"layers.{p.layer}" if p.layer is not None else "head"
    return f"{where} {short} err {error:.4g}"


def write_packed(out: CheckpointWriter, fmt: Any, prefix: str, qt: QuantizedTensor, err: float
                 ) -> LayerResult:
    """Pack one quantized Linear in the output format, write its tensors, and report it."""
    result = LayerResult(prefix, qt.bits, qt.group_size, qt.sym, tuple(qt.shape), err, 0)  # type: ignore[arg-type]
    return write_tensors(out, fmt.pack(prefix, qt), result)


def write_tensors(out: CheckpointWriter, tensors: dict[str, torch.Tensor], result: LayerResult
                  ) -> LayerResult:
    """Write a quantized Linear's packed tensors; `result` gets their size in bytes."""
    for name, t in tensors.items():
        out.add(name, t)
    return replace(result, bytes=sum(t.numel() * t.element_size() for t in tensors.values()))


def stream_quantized(
    ckpt: Checkpoint,
    out: CheckpointWriter,
    wanted: dict[str, LayerPlan],
    quantize: Callable[[CheckpointWriter, LayerPlan, torch.Tensor], LayerResult],
    n_layers: int,
    progress: Progress | None,
) -> list[LayerResult]:
    """Copy every tensor of `ckpt` to `out` in checkpoint order, replacing each weight named in `wanted` by
    what `quantize(out, plan, weight)` writes. One tensor is in memory at a time (data-free methods)."""
    results: list[LayerResult] = []
    done_layers: set[int] = set()
    for name in ckpt.tensors:
        p = wanted.get(name)
        if p is None:
            out.add(name, ckpt.read(name))
            continue
        result = quantize(out, p, ckpt.read(name))
        results.append(result)
        if p.layer is not None:
            done_layers.add(p.layer)
        if progress:
            progress(len(done_layers), n_layers, _label(p, result.error))
    return results


def run_quantize(opts: QuantizeOptions, progress: Progress | None = None) -> QuantizeSummary:
    """Plan, then run the chosen method (RTN here; GPTQ, AWQ and FP8 in their own functions)."""
    from qconvert.load import open_checkpoint

    t0 = time.monotonic()
    ckpt = open_checkpoint(opts.model)
    from qconvert.calib.runner import resolve_dtype

    resolve_dtype(opts.calib_dtype)  # a bad --calib-dtype fails before any work
    if opts.method == "fp8":
        from qconvert.quantize_fp8 import run_fp8

        return run_fp8(ckpt, opts, progress, t0)
    plan = plan_quantization(ckpt, opts)
    if opts.method == "awq":
        return run_awq(ckpt, plan, opts, progress, t0)
    if opts.method == "gptq":
        return run_gptq(ckpt, plan, opts, progress, t0)
    fmt = plan.fmt

    def rtn(out: CheckpointWriter, p: LayerPlan, w: torch.Tensor) -> LayerResult:
        qt, err = quantize_linear(p, w, opts)
        return write_packed(out, fmt, p.prefix, qt, err)

    with CheckpointWriter(opts.output, max_shard_bytes=opts.max_shard_bytes, overwrite=opts.overwrite) as out:
        results = stream_quantized(ckpt, out, plan.by_weight(), rtn, plan.n_decoder_layers, progress)
        _write_side_files(out, ckpt, plan, fmt)
        output_bytes = out.total_bytes
    return _summary(ckpt, plan, opts, results, output_bytes, t0)


# ------------------------------------------------------------------------------------------------------------
# AWQ: the calibration runner walks the decoder blocks; each block is scaled, clipped and quantized in place
# (methods/awq_block.py), written out, and re-run so the next block sees the quantized block's outputs.

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def run_awq(ckpt, plan: Plan, opts: QuantizeOptions, progress: Progress | None, t0: float) -> QuantizeSummary:
    from qconvert.calib.datasets import load_calibration, load_tokenizer
    from qconvert.calib.runner import LayerwiseRunner
    from qconvert.methods.awq import AWQConfig, awq_quantize
    from qconvert.methods.awq_block import family, quantize_block

    family(ckpt.config)  # refuse unsupported architectures before reading any data
    if not opts.dataset:
        raise BadInput("--method awq needs calibration text: --dataset FILE.txt|.jsonl|.parquet|hf:NAME")
    data = load_calibration(
        opts.dataset, load_tokenizer(ckpt), seq_len=opts.seq_len, num_samples=opts.num_samples
    )
    cfg = AWQConfig()
    specs = {p.prefix: p.spec for p in plan.layers}
    fmt = plan.fmt
    results: list[LayerResult] = []
    written: set[str] = set()
    total = plan.n_decoder_layers

    def store_dtype(name: str) -> torch.dtype:
        info = ckpt.tensors.get(name)
        return TORCH_DTYPES.get(info.dtype, torch.float32) if info is not None else torch.float32

    def add_quantized(out: CheckpointWriter, prefix: str, qt: QuantizedTensor, err: float) -> None:
        results.append(write_packed(out, fmt, prefix, qt, err))
        written.add(f"{prefix}.weight")

    with CheckpointWriter(opts.output, max_shard_bytes=opts.max_shard_bytes, overwrite=opts.overwrite) as out:

        def on_layer(step) -> bool:
            block = quantize_block(step, specs, ckpt.config, cfg, store_dtype)
            for prefix, r in block.quantized.items():
                add_quantized(out, prefix, r.qt, r.error)
            for pname, param in step.module.named_parameters():
                name = f"{step.name}.{pname}"
                if name not in written and name in ckpt.tensors:
                    out.add(name, param.detach().to("cpu", store_dtype(name)).clone())
                    written.add(name)
            if progress:
                worst = max((r.error for r in block.quantized.values()), default=0.0)
                progress(step.index + 1, total, f"layers.{step.index} max err {worst:.4g}")
            return True  # re-run the block: the next one sees the quantized outputs

        runner = LayerwiseRunner(ckpt, device=opts.device, dtype=opts.calib_dtype)
        runner.run(data.tokens, kinds=("abs_sum",), on_layer=on_layer)
        wanted = plan.by_weight()
        for name in ckpt.tensors:
            if name in written:
                continue
            p = wanted.get(name)
            if p is None:
                out.add(name, ckpt.read(name))
                continue
            # lm_head (--quantize-lm-head): no scaling group feeds it; the AWQ quantizer alone
            w = ckpt.read(name).to(torch.float32)
            qt = awq_quantize(w, p.spec)
            add_quantized(out, p.prefix, qt, relative_error(w, qt))
        _write_side_files(out, ckpt, plan, fmt)
        output_bytes = out.total_bytes
    return _summary(ckpt, plan, opts, results, output_bytes, t0)


# ------------------------------------------------------------------------------------------------------------
# GPTQ: the calibration runner walks the decoder layers, each fed by the already-quantized layers before; a
# layer's Linears are quantized (sub-layer groups in order with --true-sequential) and written as soon as they
# are known (methods/gptq_layerwise.py). --stats: Hessians from a `qconvert calibrate` file instead (one pass
# over the original model, so not sequential).


def run_gptq(
    ckpt, plan: Plan, opts: QuantizeOptions, progress: Progress | None, t0: float
) -> QuantizeSummary:
    from qconvert.methods.gptq_layerwise import GPTQConfig, gptq_weight, run_layerwise_gptq

    if opts.stats and opts.dataset:
        raise BadInput("give either --dataset (calibrate while quantizing) or --stats (a calibrate file)")
    if not opts.stats and not opts.dataset:
        raise BadInput("--method gptq needs calibration text: --dataset FILE.txt|.jsonl|.parquet|hf:NAME "
                       "(or --stats FILE from 'qconvert calibrate')")
    cfg = GPTQConfig(act_order=opts.act_order, static_groups=opts.static_groups, damp=opts.damp,
                     true_sequential=opts.true_sequential)
    quantized = {p.prefix: p for p in plan.quantized}
    hessians = _stats_hessians(ckpt, list(quantized), opts.stats) if opts.stats else None
    tokens = None
    if hessians is None:
        from qconvert.calib.datasets import load_calibration, load_tokenizer
        from qconvert.calib.runner import resolve_device

        resolve_device(opts.device)  # a bad --device fails before the data is read
        tokens = load_calibration(
            opts.dataset, load_tokenizer(ckpt), seq_len=opts.seq_len, num_samples=opts.num_samples
        ).tokens
    fmt = plan.fmt
    results: list[LayerResult] = []
    written: set[str] = set()

    def add(out: CheckpointWriter, prefix: str, qt: QuantizedTensor, err: float) -> None:
        results.append(write_packed(out, fmt, prefix, qt, err))
        written.add(quantized[prefix].weight)

    with CheckpointWriter(opts.output, max_shard_bytes=opts.max_shard_bytes, overwrite=opts.overwrite) as out:
        if hessians is None:
            head = quantized.get("lm_head")
            run_layerwise_gptq(
                ckpt, tokens, {k: p.spec for k, p in quantized.items() if p.layer is not None}, cfg,
                lambda prefix, qt, err: add(out, prefix, qt, err), n_layers=plan.n_decoder_layers,
                device=opts.device, dtype=opts.calib_dtype, lm_head=head.spec if head else None,
                lm_head_weight=ckpt.read(head.weight) if head else None, progress=progress,
            )
        else:
            for prefix, p in quantized.items():
                qt, _deq, err = gptq_weight(ckpt.read(p.weight), hessians(prefix), p.spec, cfg, prefix)
                add(out, prefix, qt, err)
                if progress:
                    progress((p.layer or 0) + 1, plan.n_decoder_layers, _label(p, err))
        for name in ckpt.tensors:
            if name not in written:
                out.add(name, ckpt.read(name))
        _write_side_files(out, ckpt, plan, fmt)
        output_bytes = out.total_bytes
    return _summary(ckpt, plan, opts, results, output_bytes, t0)


def _stats_hessians(ckpt, prefixes: list[str], path: str) -> Callable[[str], torch.Tensor]:
    """Reader of the Hessian of each Linear to quantize, from a stats file made on this model. All are checked
    up front; each is read when its Linear's turn comes (together they can outweigh the model)."""
    from qconvert.calib.stats import StatsFile

    stats = StatsFile(path, ckpt)
    for prefix in prefixes:
        kinds = stats.kinds(prefix)
        if "hessian" not in kinds:
            what = "no Hessian" if kinds else "no statistics"
            raise BadInput(f"{what} for {prefix}; collect them with 'qconvert calibrate --stats hessian"
                           f"{' --lm-head' if prefix == 'lm_head' else ''}'", path)
    return lambda prefix: stats.read(prefix, ("hessian",)).hessian  # type: ignore[return-value]


def _write_side_files(out: CheckpointWriter, ckpt: Checkpoint, plan: Plan, fmt: Any) -> None:
    """config.json with quantization_config, the format's extra files, the tokenizer/generation files."""
    config = dict(ckpt.config)
    config["quantization_config"] = plan.quantization_config
    out.write_json("config.json", config)
    for fname, obj in fmt.extra_files(plan.quantization_config).items():
        out.write_json(fname, obj)
    for fname, src in ckpt.tokenizer_files.items():
        out.copy_file(src, fname)


def _summary(
    ckpt: Checkpoint, plan: Plan, opts: QuantizeOptions, results: list, output_bytes: int, t0: float
) -> QuantizeSummary:
    source_bytes = sum(info.nbytes for info in ckpt.tensors.values())
    skipped = [p.prefix for p in plan.layers if p.spec is None]
    return QuantizeSummary(
        str(opts.output), opts.method, opts.format, results, skipped, source_bytes, output_bytes,
        time.monotonic() - t0,
    )
