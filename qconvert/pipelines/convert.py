"""`qconvert convert --to gguf`: HF checkpoint (or GGUF) → quantized GGUF in one step.

convert_hf_to_gguf.py followed by llama-quantize, without the intermediate file: open the checkpoint,
plan every tensor's type with llama.cpp's mixture rules, write the header, then for each tensor in
llama-quantize's order read → transform → check finite → quantize → write. The output equals, byte for
byte, what llama-quantize makes from our own BF16 output (same KV order, tensor order and bytes).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qconvert.arch.facts import ModelFacts, facts_from_kv
from qconvert.arch.table import resolve
from qconvert.arch.tensors import PlannedTensor, plan_tensors, written_as_f32
from qconvert.errors import BadInput
from qconvert.formats.gguf.metadata import build_header, parameter_counts, tokenizer_kvs
from qconvert.formats.gguf.reader import GGUFSource, read_gguf_source
from qconvert.formats.gguf.tokenizer import llama_load_problem
from qconvert.formats.gguf.writer import GGUFOutput, header_nbytes, tensor_nbytes, write_gguf
from qconvert.formats.output import check_output_path
from qconvert.kernels import FLOAT_TYPES, quantize
from qconvert.load.config import text_config

Q = gguf.GGMLQuantizationType
_MAX_KV_STR = 127  # llama_model_kv_override.val_str is char[128]


@dataclass
class ConvertOptions:
    file_type: str | None = None                            # None: the --config's type, else Q4_K_M
    output: Path | None = None
    config: Path | None = None                              # YAML mixture preset (mixture.load_config)
    imatrix: Path | None = None
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[str] = field(default_factory=list)   # "REGEX=TYPE", first match wins
    override_kv: list[str] = field(default_factory=list)    # "KEY=TYPE:VALUE", TYPE in int/float/bool/str
    dry_run: bool = False
    threads: int | None = None
    pre_tokenizer: str | None = None
    allow_requantize: bool = False
    lora: Path | None = None                                # PEFT adapter merged into the base on read
    target_bpw: float | None = None                         # choose tensor types to this size (budget.py)
    target_size: str | None = None                          # file size: bytes or "2.1GB", "900MiB"
    save_config: Path | None = None                         # write the chosen mixture as a YAML recipe


@dataclass
class TensorRecord:
    name: str
    ne: tuple[int, ...]
    qtype: Q
    nbytes: int
    quantized: bool
    fallback: bool
    reason: str = ""

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))


@dataclass
class ConvertResult:
    source: str
    output: Path | None
    file_type: str
    records: list[TensorRecord]
    seconds: float = 0.0
    note: str | None = None  # what a quantized source was dequantized from ("dequantized 210 fp8-block ...")

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    @property
    def n_elements(self) -> int:
        return sum(r.n_elements for r in self.records)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(1, self.n_elements)

    @property
    def n_fallback(self) -> int:
        return sum(r.fallback for r in self.records)

    def by_type(self) -> dict[str, tuple[int, int]]:
        """type name -> (tensor count, bytes)."""
        count: Counter[str] = Counter()
        size: Counter[str] = Counter()
        for r in self.records:
            count[r.qtype.name] += 1
            size[r.qtype.name] += r.nbytes
        return {k: (count[k], size[k]) for k in sorted(count)}


ProgressFn = Callable[[TensorRecord, int, int], None]   # (record, index done, total)


@dataclass
class _Source:
    label: str                      # path for messages
    name: str                       # model name for the default output file
    arch: str
    facts: ModelFacts
    header: GGUFOutput
    tensors: list[PlannedTensor]
    gguf: GGUFSource | None = None  # set for .gguf input (raw copies, requantize checks)
    note: str | None = None         # a quantized HF source: what it dequantizes


# ---------------------------------------------------------------------------------------------------------
# option parsing (llama-quantize's spellings)

def _parse_type(name: str, option: str) -> Q:
    from qconvert.formats.gguf.mixture import parse_tensor_type

    try:
        return parse_tensor_type(name)
    except BadInput as e:
        raise BadInput(f"{option}: {e}") from None


def parse_tensor_types(specs: list[str]) -> list[tuple[str, Q]]:
    out = []
    for spec in specs:
        regex, sep, tname = spec.rpartition("=")
        if not sep or not regex:
            raise BadInput(f"--tensor-type {spec!r}: expected REGEX=TYPE")
        try:
            re.compile(regex)
        except re.error as e:
            raise BadInput(f"--tensor-type {spec!r}: bad regex: {e}") from e
        out.append((regex, _parse_type(tname, "--tensor-type")))
    return out


def parse_override_kv(spec: str) -> tuple[str, Any, gguf.GGUFValueType]:
    """KEY=TYPE:VALUE as llama.cpp parses it; INT is written as u32 of |value| (llama-quant.cpp)."""
    key, sep, rest = spec.partition("=")
    kind, sep2, value = rest.partition(":")
    if not sep or not sep2 or not key or len(key) > 127:
        raise BadInput(f"--override-kv {spec!r}: expected KEY=TYPE:VALUE with TYPE int, float, bool or str")
    try:
        if kind == "int":
            return key, abs(int(value)) & 0xFFFFFFFF, gguf.GGUFValueType.UINT32
        if kind == "float":
            return key, float(value), gguf.GGUFValueType.FLOAT32
    except ValueError:
        raise BadInput(f"--override-kv {spec!r}: {value!r} is not a {kind}") from None
    if kind == "bool" and value in ("true", "false"):
        return key, value == "true", gguf.GGUFValueType.BOOL
    if kind == "str" and len(value) <= _MAX_KV_STR:
        return key, value, gguf.GGUFValueType.STRING
    raise BadInput(f"--override-kv {spec!r}: bad {kind} value (bool: true/false; str: at most 127 chars)")


# ---------------------------------------------------------------------------------------------------------
# sources

def _open_source(model: str, opts: ConvertOptions) -> _Source:
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise BadInput("no such GGUF file", path)
        if opts.lora is not None:
            raise BadInput("--lora merges into an HF checkpoint; a GGUF input takes the adapter in llama.cpp "
                           "(convert ADAPTER_DIR --to gguf --base MODEL writes it)", path)
        src = read_gguf_source(path)
        facts = _facts(src.arch, src.header)
        return _Source(str(path), path.stem, src.arch, facts, src.header, src.tensors, src)
    from qconvert.formats.packed.dense import dense_note, dense_source
    from qconvert.load import open_checkpoint
    from qconvert.load.lora import lora_note, lora_source

    # a quantized source is read as its dequantized checkpoint: the same tensors, so the same bytes out
    ckpt = dense_source(open_checkpoint(model))
    note = dense_note(ckpt)
    ckpt = lora_source(ckpt, opts.lora)  # the adapter merged before anything else reads a weight
    cfg = text_config(ckpt.config)
    if not cfg:
        raise BadInput("no config.json next to the weights: cannot tell the architecture", ckpt.path)
    spec = resolve(cfg, ckpt.path)
    tok, info = tokenizer_kvs(spec, cfg, ckpt.path, opts.pre_tokenizer)
    planned = plan_tensors(ckpt, spec, cfg, info.n_vocab_real)
    if spec.needs_output and not any(t.name == "output.weight" for t in planned):
        # convert_hf_to_gguf.py writes such a file anyway; llama.cpp then fails to load it
        raise BadInput(f"llama.cpp's {spec.name} loader needs an lm_head (output.weight), and this "
                       "checkpoint ties it to the embedding (tie_word_embeddings)", ckpt.path)
    params = parameter_counts((t.name, t.shape) for t in planned)
    header = build_header(spec, cfg, ckpt.path, ckpt.name, params, tok)
    notes = [n for n in (note, lora_note(ckpt)) if n]
    return _Source(str(ckpt.path), ckpt.name, spec.name, _facts(spec.name, header), header, planned,
                   note="; ".join(notes) or None)


def _facts(arch: str, header: GGUFOutput) -> ModelFacts:
    # from the KVs for both inputs: llama-quantize reads them from its input file (for an HF checkpoint,
    # the BF16 GGUF we would write: these very KVs)
    return facts_from_kv(arch, {k: v.value for k, v in header.kv().items()})


# ---------------------------------------------------------------------------------------------------------
# plan

def _imatrix(opts: ConvertOptions) -> Any:
    if opts.imatrix is None:
        return None
    from qconvert.formats.gguf.imatrix import read_imatrix

    return read_imatrix(opts.imatrix)


def mixture_options(opts: ConvertOptions, has_imatrix: bool) -> Any:
    """MixtureOptions from the flags, on top of --config (flags win; --tensor-type patterns come first)."""
    from qconvert.formats.gguf.mixture import MixtureOptions, load_config, parse_file_type

    base = load_config(opts.config, has_imatrix=has_imatrix) if opts.config else None
    if opts.file_type is not None:
        file_type = parse_file_type(opts.file_type)
    else:
        file_type = base.file_type if base else parse_file_type("Q4_K_M")
    out_t = _opt_type(opts.output_tensor_type, "--output-tensor-type")
    emb_t = _opt_type(opts.token_embedding_type, "--token-embedding-type")
    return MixtureOptions(
        file_type=file_type, has_imatrix=has_imatrix,
        pure=opts.pure or bool(base and base.pure),
        leave_output_tensor=opts.leave_output_tensor or bool(base and base.leave_output_tensor),
        output_tensor_type=out_t if out_t is not None else (base.output_tensor_type if base else None),
        token_embedding_type=emb_t if emb_t is not None else (base.token_embedding_type if base else None),
        tensor_types=parse_tensor_types(opts.tensor_types) + (list(base.tensor_types) if base else []))


def _choices(src: _Source, mix: Any) -> list[Any]:
    from qconvert.formats.gguf.mixture import choose_types, is_quantized

    items = [(t.name, t.ne, _kept_type(t, src)) for t in src.tensors]
    choices = choose_types(items, src.facts, mix)
    if is_quantized(mix.file_type.default):
        return choices
    by_name = {t.name: t for t in src.tensors}
    return [_keep_native(c, by_name[c.name]) for c in choices]


def _keep_native(choice: Any, t: PlannedTensor) -> Any:
    """An F32/F16/BF16 file keeps the checkpoint's own GGML blocks (gpt-oss's MXFP4 experts) as they are:
    convert_hf_to_gguf.py writes them raw whatever --outtype says."""
    from qconvert.formats.gguf.mixture import TensorChoice

    if t.raw is None or not choice.quantized:
        return choice
    return TensorChoice(choice.name, Q[t.dtype], False, False, f"kept: the checkpoint's own {t.dtype} blocks")


def _file_type_id(src: _Source, mix: Any) -> int:
    """general.file_type: an F32/F16/BF16 file of a checkpoint with MXFP4 experts is MOSTLY_MXFP4_MOE, as
    the converter labels it (ModelBase.prepare_metadata); otherwise the file type's own id."""
    from qconvert.formats.gguf.mixture import is_quantized

    if not is_quantized(mix.file_type.default) and any(t.raw is not None and t.dtype == "MXFP4"
                                                       for t in src.tensors):
        return int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    return int(mix.file_type.ftype)


def _opt_type(name: str | None, option: str) -> Q | None:
    return None if name is None else _parse_type(name, option)


def _kept_type(t: PlannedTensor, src: _Source) -> Q:
    """Type of a tensor that is not quantized: what our BF16 file (or the input GGUF) holds for it."""
    if src.gguf is not None:
        return src.gguf.raw[t.name][0]
    if t.raw is not None:
        return Q[t.dtype]
    if written_as_f32(t.name, t.shape):
        return Q.F32
    return Q.F16 if t.dtype == "F16" else (Q.F32 if t.dtype == "F32" else Q.BF16)


def _records(src: _Source, choices: list[Any]) -> list[TensorRecord]:
    ne = {t.name: t.ne for t in src.tensors}
    return [TensorRecord(c.name, ne[c.name], Q(c.qtype), tensor_nbytes(Q(c.qtype), ne[c.name]),
                         bool(c.quantized), bool(c.fallback), c.reason) for c in choices]


def _imatrix_for(imx: Any, r: TensorRecord) -> np.ndarray | None:
    """The weights llama-quantize would use for this tensor, [n_mat, ne0] (size mismatch → BadInput)."""
    if imx is None or not r.quantized:
        return None
    n_mat = r.ne[2] if len(r.ne) > 2 else 1
    w = imx.weights_for(r.name, r.ne[0], n_mat)
    return None if w is None else np.asarray(w, dtype=np.float32).reshape(n_mat, r.ne[0])


def _check_imatrix(records: list[TensorRecord], choices: list[Any], imx: Any, mix: Any) -> None:
    from qconvert.formats.gguf.mixture import requires_imatrix

    for r, c in zip(records, choices, strict=True):
        w = _imatrix_for(imx, r)  # raises on a size mismatch, before anything is written
        if w is None and requires_imatrix(c, mix):
            # llama-quantize refuses too ("this quantization requires an importance matrix", with the tensor)
            where = "no imatrix given" if imx is None else "the imatrix has no entry for it"
            raise BadInput(f"{mix.file_type.name}: tensor {r.name} as {r.qtype.name} needs an importance "
                           f"matrix; {where}: make one with `qconvert imatrix MODEL --dataset TEXT -o "
                           f"imatrix.gguf` and pass --imatrix imatrix.gguf")


def _imatrix_kvs(imx: Any, path: Path) -> list[tuple[str, Any, gguf.GGUFValueType]]:
    """The quantize.imatrix.* KVs llama-quantize's CLI appends (after the user's --override-kv)."""
    s, u = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    kvs = [("quantize.imatrix.file", str(path)[:_MAX_KV_STR], s)]
    if imx.datasets:
        kvs.append(("quantize.imatrix.dataset", str(imx.datasets[0])[:_MAX_KV_STR], s))
    kvs.append(("quantize.imatrix.entries_count", len(imx.entries), u))
    if imx.chunk_count > 0:
        kvs.append(("quantize.imatrix.chunks_count", int(imx.chunk_count), u))
    return kvs


# ---------------------------------------------------------------------------------------------------------
# quantize + stream

def _prepare(t: PlannedTensor, r: TensorRecord, src: _Source, opts: ConvertOptions) -> np.ndarray:
    """What the quantizer takes for one tensor: checked float32, or the stored bytes of a GGUF input tensor
    that keeps its type (uint8). Runs on the prefetch thread, so it must not touch shared state."""
    if src.gguf is not None:
        raw_type, raw = src.gguf.raw[t.name]
        if raw_type == r.qtype:
            return np.asarray(raw).view(np.uint8)  # unchanged: copied as is, like llama-quantize
        if raw_type not in FLOAT_TYPES and not opts.allow_requantize:
            raise BadInput(f"tensor {t.name} is already {raw_type.name}; pass --allow-requantize", src.label)
    if t.raw is not None and Q[t.dtype] == r.qtype:
        # the checkpoint's own blocks (gpt-oss's MXFP4 experts): copied, never dequantized and requantized.
        # Any other type requantizes their exact float32 values, as llama-quantize --allow-requantize does:
        # these blocks are the model's own precision, so no flag is asked for
        return t.raw()
    x = t.read()
    if x.shape != t.shape:
        raise BadInput(f"tensor {t.source or t.name} has shape {x.shape}, expected {t.shape}", src.label)
    if not np.isfinite(x).all():
        raise BadInput(f"tensor {t.source or t.name} contains NaN or Inf values", src.label)
    if t.rescaled and t.dtype in ("BF16", "F16"):
        x = _rounded_for_quantizer(x, t.dtype, r.qtype)
    return x


def _rounded_for_quantizer(x: np.ndarray, dtype: str, qtype: Any) -> np.ndarray:
    """A rescaled tensor rounded to its source's 16-bit type when it is quantized: llama-quantize quantizes
    the converter's BF16 / F16 file, not the float32 product."""
    import torch

    from qconvert.formats.gguf.mixture import is_quantized

    if not is_quantized(qtype):
        return x
    half = torch.bfloat16 if dtype == "BF16" else torch.float16
    return torch.from_numpy(np.ascontiguousarray(x)).to(half).float().numpy()


def _prefetched(jobs: list[Callable[[], np.ndarray]]) -> Iterator[np.ndarray]:
    """Each job's result in order, the next one computed on a second thread meanwhile: reading and
    widening tensor i+1 (numpy and mmap page-ins release the GIL) overlaps quantizing tensor i. One job
    ahead at most, so memory grows by one tensor, not with the model."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="qconvert-read")
    try:
        ahead = pool.submit(jobs[0]) if jobs else None
        for i in range(len(jobs)):
            current = ahead.result()
            ahead = pool.submit(jobs[i + 1]) if i + 1 < len(jobs) else None
            yield current
            del current
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stream(src: _Source, records: list[TensorRecord], imx: Any, opts: ConvertOptions,
            progress: ProgressFn | None) -> Iterator[np.ndarray]:
    by_name = {t.name: t for t in src.tensors}
    jobs = [partial(_prepare, by_name[r.name], r, src, opts) for r in records]
    for i, (r, x) in enumerate(zip(records, _prefetched(jobs), strict=True)):
        data = x if x.dtype == np.uint8 else quantize(x, r.qtype, _imatrix_for(imx, r), opts.threads)
        del x
        if data.nbytes != r.nbytes:
            raise RuntimeError(f"{r.name}: quantizer returned {data.nbytes} bytes, expected {r.nbytes}")
        yield data
        if progress is not None:
            progress(r, i + 1, len(records))


def _check_budget_options(opts: ConvertOptions, has_imatrix: bool) -> None:
    if opts.target_bpw is None and opts.target_size is None:
        if opts.save_config is not None:
            raise BadInput("--save-config writes the plan of --target-bpw / --target-size; give one of them")
        return
    if opts.target_bpw is not None and opts.target_size is not None:
        raise BadInput("give --target-bpw or --target-size, not both")
    if opts.target_bpw is not None and not 1.0 <= opts.target_bpw <= 16.0:
        raise BadInput(f"--target-bpw {opts.target_bpw}: expected bits per weight between 1 and 16")
    if not has_imatrix:
        raise BadInput("--target-bpw / --target-size weigh each tensor's error by the importance matrix: "
                       "make one with `qconvert imatrix MODEL --dataset TEXT -o imatrix.gguf` and pass "
                       "--imatrix")
    if opts.save_config is not None:
        check_output_path(Path(opts.save_config))


def _fit_to_budget(src: _Source, mix: Any, choices: list[Any], imx: Any, opts: ConvertOptions) -> Any:
    """MixtureOptions whose exact-name tensor_types give the budget's types (formats/gguf/budget.py);
    the tensors it leaves alone keep llama-quantize's choice."""
    from dataclasses import replace

    from qconvert.formats.gguf import budget

    if mix.pure:
        raise BadInput("--pure gives every tensor one type; it cannot be combined with a size target")
    records = _records(src, choices)
    free = [r for r, c in zip(records, choices, strict=True)
            if r.quantized and r.name not in budget.PINNED_NAMES and not c.reason.startswith("--")
            and _imatrix_for(imx, r) is not None]
    free_names = {r.name for r in free}
    fixed = sum(r.nbytes for r in records if r.name not in free_names)
    if opts.target_bpw is not None:
        total = int(opts.target_bpw * sum(r.n_elements for r in records) / 8)
        target = f"--target-bpw {opts.target_bpw}"
    else:
        size = budget.parse_size(str(opts.target_size))
        # worst-case padding per tensor and room for the KVs the writer adds (file type, imatrix, overrides)
        header = header_nbytes(src.header, [(r.name, r.ne) for r in records]) + 4096
        total = size - header - 31 * len(records)
        target = f"--target-size {opts.target_size}"
    by_name = {t.name: t for t in src.tensors}
    jobs = [partial(_prepare, by_name[r.name], r, src, opts) for r in free]
    measured = [budget.measure_tensor(r.name, x, r.ne, _imatrix_for(imx, r), opts.threads)
                for r, x in zip(free, _prefetched(jobs), strict=True)]
    assignment = budget.allocate(measured, total - fixed)
    patterns = [(f"^{re.escape(name)}$", c.qtype) for name, c in assignment.items()]
    if opts.save_config is not None:
        comment = (f"qconvert convert {target} --type {mix.file_type.name} --imatrix {opts.imatrix}\n"
                   f"reproduce with: qconvert convert MODEL --config THIS_FILE --imatrix {opts.imatrix}")
        budget.write_recipe(Path(opts.save_config), budget.recipe(mix.file_type.name, assignment, comment))
    return replace(mix, tensor_types=list(mix.tensor_types) + patterns)


def default_output(name: str, file_type_name: str) -> Path:
    return Path.cwd() / f"{Path(name).name}-{file_type_name}.gguf"


def convert(model: str, opts: ConvertOptions, progress: ProgressFn | None = None) -> ConvertResult:
    """Convert MODEL to a GGUF file (or only plan it with opts.dry_run)."""
    start = time.perf_counter()
    overrides = [parse_override_kv(s) for s in opts.override_kv]
    if opts.pre_tokenizer is not None and Path(model).suffix.lower() == ".gguf":
        raise BadInput("--pre-tokenizer only applies to HF checkpoints (a GGUF input keeps its tokenizer)")
    target = None if opts.dry_run or opts.output is None else Path(opts.output)
    if target is not None:
        check_output_path(target)
    imx = _imatrix(opts)
    _check_budget_options(opts, imx is not None)
    mix = mixture_options(opts, imx is not None)
    src = _open_source(model, opts)
    choices = _choices(src, mix)
    if opts.target_bpw is not None or opts.target_size is not None:
        mix = _fit_to_budget(src, mix, choices, imx, opts)
        choices = _choices(src, mix)
    records = _records(src, choices)
    _check_imatrix(records, choices, imx, mix)
    result = ConvertResult(src.label, None, mix.file_type.name, records, note=src.note)
    if not opts.dry_run:
        result.output = _write(src, records, imx, mix, overrides, target, opts, progress)
    result.seconds = time.perf_counter() - start
    return result


def _write(src: _Source, records: list[TensorRecord], imx: Any, mix: Any, overrides: list,
           target: Path | None, opts: ConvertOptions, progress: ProgressFn | None) -> Path:
    target = target or default_output(src.name, mix.file_type.name)
    check_output_path(target)
    if src.gguf is not None and target.resolve() == src.gguf.path.resolve():
        raise BadInput("output would overwrite the input", target)
    if imx is not None:
        overrides = overrides + _imatrix_kvs(imx, Path(opts.imatrix))
    src.header.finalize_kv(_file_type_id(src, mix), overrides)
    if (problem := llama_load_problem(src.header.kv())) is not None:
        raise BadInput(problem, src.label)
    for r in records:
        src.header.add_planned_tensor(r.name, r.ne, r.qtype)
    write_gguf(src.header, target, _stream(src, records, imx, opts, progress))
    return target
