"""`qconvert quantize`: checkpoint → per-Linear method → packed format → atomic writer, for every method.

    summary = run_quantize(QuantizeOptions(model, output, method="gptq", options={"bits": 4, ...}))

One shell: plan (every check that can fail runs here, before any work), open the writer, let the method run
(data-free methods tensor by tensor, calibrated ones layer by layer; methods/plan.py), copy what it left,
write config.json with the format's quantization_config, the format's side files and the tokenizer.

Which tensors are quantized: 2-D ``*.weight`` tensors inside decoder layers (``…layers.<i>.…``) of the text
model, minus MoE routers and anything matching ``--ignore`` or the layer config's ``ignore``; ``lm_head``
only with ``--quantize-lm-head``; embeddings never. Per-layer overrides come from a YAML
(``--layer-config``, a path or a preset name under ``configs/quantize/``): ``ignore: [regex…]`` and
``overrides: [{match: regex, bits, group_size, sym}]``, first match wins, regexes are searched in the module
prefix (``model.layers.3.mlp.down_proj``).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from qconvert.arch.tensors import LM_HEAD, NOT_QUANTIZED, check_checkpoint_shapes, linear_module
from qconvert.errors import BadInput
from qconvert.formats.packed import packed_format
from qconvert.formats.packed.base import PackedFormat, PackPlan
from qconvert.formats.packed.dense import dense_note, dense_source
from qconvert.formats.safetensors_out import DEFAULT_SHARD_BYTES, CheckpointWriter
from qconvert.load.checkpoint import Checkpoint
from qconvert.load.config import text_config
from qconvert.load.dtypes import FLOAT_NAMES
from qconvert.methods import method as find_method
from qconvert.methods.plan import Job, LayerPlan, Progress, Quantized, Spec
from qconvert.methods.types import SCHEMES, FP4Tensor, FP8Spec, FP8Tensor, QuantSpec

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "quantize"
FP8_GROUP = {"tensor": 0, "channel": -1}  # LayerResult.group_size of FP8 strategies: 0 = one scale per tensor


@dataclass
class QuantizeOptions:
    model: str
    output: Path
    method: str = "gptq"
    options: dict[str, Any] = field(default_factory=dict)  # the method's own (its Config's fields)
    format: str | None = None  # None: the method's native layout
    ignore: list[str] = field(default_factory=list)
    layer_config: str | None = None
    quantize_lm_head: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    lora: Path | None = None  # PEFT adapter merged into the base on read


@dataclass
class Plan:
    layers: list[LayerPlan]
    fmt: PackedFormat
    pack: PackPlan
    quantization_config: dict
    n_decoder_layers: int

    @property
    def skipped(self) -> list[str]:
        return [p.prefix for p in self.layers if p.spec is None]


@dataclass
class LayerResult:
    name: str
    bits: int
    group_size: int
    sym: bool
    shape: tuple[int, int]
    error: float  # RTN, AWQ, FP8: ||W-Wq||/||W||; GPTQ: ||(W-Wq)X||/||WX|| on the calibration inputs
    bytes: int
    kind: str = "int"  # int, fp8-tensor / fp8-channel / fp8-block, nvfp4 / mxfp4

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
    scheme: str = ""  # the --scheme (fp8, nvfp4a16, mxfp4a16, w8a8)
    notes: tuple[str, ...] = ()  # what a quantized source dequantized; checks that could not be made

    def table(self) -> list[dict]:
        """One row per scheme: layers, bits, group, size, bits per weight (packed tensors incl.
        scales/zeros)."""
        rows: dict[tuple, dict] = {}
        for r in self.layers:
            row = rows.setdefault(
                (r.kind, r.bits, r.group_size, r.sym),
                {"kind": r.kind, "bits": r.bits, "group_size": r.group_size, "sym": r.sym, "layers": 0,
                 "params": 0, "bytes": 0, "max_error": 0.0},
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
            "notes": list(self.notes),
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
    cfg = text_config(config)
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return int(n) if n is not None else None


def _model_dtype(ckpt: Checkpoint, names: list[str]) -> str:
    for name in names:
        dt = FLOAT_NAMES.get(ckpt.tensors[name].dtype)
        if dt:
            return dt
    return "float16"


def find_linears(ckpt: Checkpoint, ignore: list[re.Pattern], lm_head: bool) -> tuple[list[LayerPlan], int]:
    """Decoder Linear weights (and lm_head when asked), in file order, with ignored ones marked spec=None
    (the others get a placeholder spec until planning sets theirs)."""
    n_layers = _n_layers(ckpt.config)
    plans = []
    for name, info in ckpt.tensors.items():
        found = linear_module(name)
        if found is None or len(info.shape) != 2 or info.dtype not in FLOAT_NAMES:
            continue
        prefix, layer = found
        if layer is not None and n_layers is not None and layer >= n_layers:
            continue  # e.g. multi-token-prediction layers past the decoder
        skip = (prefix == LM_HEAD and not lm_head) or any(rx.search(prefix) for rx in ignore)
        plans.append(LayerPlan(prefix, name, layer, tuple(info.shape), None if skip else QuantSpec()))
    if lm_head and not any(p.prefix == LM_HEAD for p in plans):
        raise BadInput(
            "--quantize-lm-head: this checkpoint has no separate lm_head.weight (tied to the embeddings)",
            ckpt.path,
        )
    layers = {p.layer for p in plans if p.layer is not None}
    return plans, (n_layers or (max(layers) + 1 if layers else 0))


def plan_quantization(ckpt: Checkpoint, opts: QuantizeOptions, config: Any) -> Plan:
    """Every Linear's spec (the method's grid, the layer config's overrides, the format's constraints), the
    format, and the quantization_config it will write."""
    user: Spec = config.spec()
    scheme = SCHEMES.get(getattr(config, "scheme", None) or "")
    if scheme is not None and scheme.kind != "fp8":  # a scheme of its own format kind (nvfp4, w8a8, ...)
        fmt = packed_format(opts.format or "compressed-tensors", scheme.kind, f"--scheme {scheme.name}")
    else:
        kind = "fp8" if isinstance(user, FP8Spec) else "int"
        fmt = packed_format(opts.format or find_method(opts.method).default_format, kind,
                            f"--method {opts.method}")
    options = config.pack_options(opts.quantize_lm_head)
    fmt.check_spec(user, options)

    lc = load_layer_config(opts.layer_config)
    if lc.get("overrides") and (scheme is not None or not isinstance(user, QuantSpec)):
        what = "fp8" if isinstance(user, FP8Spec) or scheme is None else f"--scheme {scheme.name}"
        raise BadInput(f"layer config overrides (bits, group size) do not apply to {what}; "
                       "only 'ignore' does")
    ignore = _compile(list(NOT_QUANTIZED) + list(opts.ignore) + list(lc.get("ignore") or []), "--ignore")
    overrides = lc.get("overrides") or []
    rules = list(zip(_compile([r["match"] for r in overrides], "override"), overrides, strict=True))
    plans, n_layers = find_linears(ckpt, ignore, opts.quantize_lm_head)
    quantized = [p for p in plans if p.spec is not None]
    if not quantized:
        raise BadInput("no Linear layers to quantize (check --ignore and the layer config)", ckpt.path)

    model_dtype = _model_dtype(ckpt, [p.weight for p in quantized])
    default = fmt.adapt(user, model_dtype)
    for p in quantized:
        p.spec = default
        for rx, rule in rules:
            if rx.search(p.prefix):
                changes = {k: rule[k] for k in ("bits", "group_size", "sym") if k in rule}
                p.spec = fmt.adapt(replace(user, **changes), model_dtype)
                fmt.check_spec(p.spec, options)
                break
    bad = [(p.prefix, p.shape) for p in quantized if not p.spec.fits(*p.shape)]  # type: ignore[union-attr]
    if bad:
        raise BadInput(default.misfit(bad))
    for p in quantized:
        fmt.check_layer(p.prefix, *p.shape, p.spec)  # type: ignore[arg-type]
    pack = PackPlan(options, default, {p.prefix: p.spec for p in quantized if p.spec != default},  # type: ignore[misc]
                    tuple(p.prefix for p in plans if p.spec is None))
    return Plan(plans, fmt, pack, fmt.quantization_config(pack), n_layers)


# ------------------------------------------------------------------------------------------------------------
# the run


def _result(p: LayerPlan, qt: Quantized, err: float, nbytes: int) -> LayerResult:
    if isinstance(qt, FP4Tensor):
        return LayerResult(p.prefix, 4, qt.spec.group_size, True, p.shape, err, nbytes, kind=qt.spec.variant)
    if isinstance(qt, FP8Tensor):
        spec = qt.spec
        group = spec.block[1] if spec.strategy == "block" else FP8_GROUP[spec.strategy]
        return LayerResult(p.prefix, 8, group, True, p.shape, err, nbytes, kind=f"fp8-{spec.strategy}")
    return LayerResult(p.prefix, qt.bits, qt.group_size, qt.sym, tuple(qt.shape), err, nbytes)  # type: ignore[arg-type]


def run_quantize(opts: QuantizeOptions, progress: Progress | None = None) -> QuantizeSummary:
    from qconvert.load import open_checkpoint

    t0 = time.monotonic()
    entry = find_method(opts.method)
    config = entry.make_config(opts.options)
    config.check()
    from qconvert.formats.packed.mxfp4_experts import mxfp4_experts_source
    from qconvert.load.expert_slices import per_expert_note, per_expert_source
    from qconvert.load.lora import lora_note, lora_source

    # gpt-oss's MXFP4 experts as the bf16 values transformers dequantizes them to (the output is an ordinary
    # checkpoint of them); a quantized source: its dequantized checkpoint
    raw = mxfp4_experts_source(open_checkpoint(opts.model))
    ckpt = dense_source(raw)
    notes = [getattr(raw, "note", None), dense_note(ckpt)]
    # transformers 5's fused experts: one Linear per expert, quantized and written under the hub's names
    ckpt = per_expert_source(ckpt)
    notes.append(per_expert_note(ckpt))
    ckpt = lora_source(ckpt, opts.lora)  # before anything else: every later stage sees the merged weights
    notes.append(lora_note(ckpt))
    shape_note = check_checkpoint_shapes(ckpt)
    plan = plan_quantization(ckpt, opts, config)
    kv_cache = _plan_kv_cache(ckpt, plan, config)
    results: list[LayerResult] = []

    with CheckpointWriter(opts.output, max_shard_bytes=opts.max_shard_bytes, overwrite=opts.overwrite) as out:

        def write(name: str, tensor: torch.Tensor) -> None:
            out.add(name, tensor)
            job.written.add(name)

        def emit(p: LayerPlan, qt: Quantized, err: float, input_scale: torch.Tensor | None) -> None:
            packed = plan.fmt.pack(p.prefix, qt, input_scale)
            for name, t in packed.items():
                out.add(name, t)
            job.written.add(p.weight)
            results.append(_result(p, qt, err, sum(t.numel() * t.element_size() for t in packed.values())))

        job = Job(ckpt, config, plan.layers, plan.n_decoder_layers, emit, write, progress)
        entry.load().run(job)
        if kv_cache:
            _write_kv_scales(out, ckpt, plan, config)
        job.stream(_nothing_left)  # whatever the method did not write, as it is, in checkpoint order
        _write_side_files(out, ckpt, plan)
        output_bytes = out.total_bytes
    source_bytes = sum(info.nbytes for info in getattr(ckpt, "source", ckpt).tensors.values())  # as stored
    fmt_name = plan.fmt.name
    return QuantizeSummary(str(opts.output), opts.method, fmt_name, results, plan.skipped, source_bytes,
                           output_bytes, time.monotonic() - t0, scheme=getattr(config, "scheme", None) or "",
                           notes=tuple(n for n in (*notes, shape_note, *job.notes) if n))


def _plan_kv_cache(ckpt: Checkpoint, plan: Plan, config: Any) -> bool:
    """--kv-cache fp8: refused where it cannot be written (before any work); else kv_cache_scheme goes into
    the config (calib/kvcache.py)."""
    kv = getattr(config, "kv_cache", None)
    if kv is None:
        return False
    from qconvert.calib import kvcache

    if kv != "fp8":
        raise BadInput(f"--kv-cache {kv!r}: the one KV-cache scheme is fp8")
    if plan.quantization_config.get("quant_method") != "compressed-tensors":
        raise BadInput(f"--kv-cache fp8 is compressed-tensors' kv_cache_scheme; --format {plan.fmt.name} "
                       "has none (use --format compressed-tensors)")
    kvcache.check_model(ckpt.tensors, ckpt.path)
    if not getattr(config, "dataset", None):
        raise BadInput("--kv-cache fp8 needs --dataset: the keys after RoPE and the values come from a "
                       "calibration pass (a stats file does not hold them)")
    plan.quantization_config["kv_cache_scheme"] = dict(kvcache.KV_CACHE_SCHEME)
    return True


def _write_kv_scales(out: CheckpointWriter, ckpt: Checkpoint, plan: Plan, config: Any) -> None:
    from qconvert.calib import kvcache
    from qconvert.load.dtypes import TORCH_BY_NAME

    dtype = TORCH_BY_NAME[_model_dtype(ckpt, [p.weight for p in plan.layers])]
    scales = kvcache.kv_scales(ckpt, config.tokens(ckpt), dtype, config.device, config.calib_dtype)
    for name, t in scales.items():
        out.add(name, t)


def _nothing_left(p: LayerPlan, w: torch.Tensor) -> tuple[Quantized, float]:
    raise RuntimeError(f"{p.prefix}: the method left a Linear it was asked to quantize")


def _write_side_files(out: CheckpointWriter, ckpt: Checkpoint, plan: Plan) -> None:
    """config.json with quantization_config, the format's extra files, the tokenizer/generation files."""
    config = dict(ckpt.config)
    config["quantization_config"] = plan.quantization_config
    out.write_json("config.json", config)
    for fname, obj in plan.fmt.extra_files(plan.quantization_config).items():
        out.write_json(fname, obj)
    for fname, src in ckpt.tokenizer_files.items():
        out.copy_file(src, fname)
