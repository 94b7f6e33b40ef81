"""Models that turn token chunks into next-token logits: llama.cpp for .gguf files, transformers for HF
directories (dense, or quantized checkpoints made dense on load).

Every backend answers the same three questions the perplexity loop asks:
  tokenize(text)            -> token ids as llama-perplexity's ``common_tokenize(text, add_special=True)``
                               gives them for this model (BOS first if the vocab adds BOS; special-token
                               text is split, not parsed)
  logits(chunks, first)     -> float32 [n_seq, ctx - first, n_vocab]: logits at positions first .. ctx-1
  seqs_per_call(ctx)        -> how many chunks one ``logits`` call takes (llama.cpp batches 2048 // ctx
                               sequences like llama-perplexity; transformers one)

HF checkpoints are made dense by one of two loaders (``open_backend(..., loader=)``):
  "transformers"  ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors with ``dequantize=True``,
                  checkpoint-formats.md §5.3)
  "unpack"        our own reference kernels (each packed format's unpack, formats.packed) unpack every
                  packed Linear to a dense float32 weight, and the model is built from its config without the
                  quantization_config — the hook for formats transformers cannot load on CPU (GPTQ, AWQ)
  "emulate"       compressed-tensors kept compressed by transformers: the forward also quantizes activations
                  as the scheme says (FP8 dynamic per token, static per tensor, INT8...) — W8A8 as an engine
                  would run it, emulated in float (FP4 schemes in bf16: compressed-tensors 0.20 decompresses
                  them to bf16 and cannot mix them with float32 activations)
  "auto"          dense and compressed-tensors → transformers; gptq / awq → unpack
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qconvert.errors import BadInput, IOFailure
from qconvert.load.config import attn_implementation, text_config
from qconvert.load.gguf_file import is_gguf, open_gguf
from qconvert.load.quiet import one_line, quiet_transformers

LLAMA_N_BATCH = 2048  # llama-perplexity's default -b: it packs n_batch // ctx chunks into one decode
LOADERS = ("auto", "transformers", "unpack", "emulate")


class Backend(Protocol):
    kind: str  # "llama.cpp" or "transformers"
    path: Path
    n_vocab: int
    add_bos: bool
    bos_id: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def load(self) -> None: ...

    def seqs_per_call(self, ctx: int) -> int: ...

    def logits(self, chunks: np.ndarray, first: int) -> torch.Tensor: ...

    def close(self) -> None: ...


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------------------
# llama.cpp (through llama-cpp-python's low-level bindings: we need llama-perplexity's exact batch layout
# and per-position output flags, which the high-level Llama class does not expose)


_LOG_SINK = None  # the ctypes callback must outlive every llama.cpp call


def _llama_lib():
    try:
        import llama_cpp
    except ImportError as e:
        raise BadInput(f"evaluating a .gguf needs llama-cpp-python ({e}); install it with "
                       "pip install llama-cpp-python") from None
    global _LOG_SINK
    if _LOG_SINK is None:  # llama.cpp's own log lines (warnings included) would break one-line errors
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
    return llama_cpp


def _extra_bufts() -> bool:
    """Weight-repacking buffer types (AMX, CPU_REPACK) are off unless QCONVERT_LLAMA_EXTRA_BUFTS=1: a wheel
    built with -march=native crashes in ggml_backend_amx_mul_mat on VMs that advertise AMX (seen here), and
    the plain CPU buffers are what a portable llama-perplexity build runs."""
    return os.environ.get("QCONVERT_LLAMA_EXTRA_BUFTS", "") not in ("", "0")


class LlamaCppBackend:
    kind = "llama.cpp"

    def __init__(self, path: Path, ctx: int, threads: int | None = None):
        self.path = Path(path)
        open_gguf(self.path).close()  # validates the header: a bad file is one BadInput line, not a crash
        self._lib = _llama_lib()
        self._lib.llama_backend_init()
        self._ctx = self._batch = self._model = None
        # the vocabulary alone first (fast): tokenization and vocab checks come before any heavy work
        self._vocab_model = self._load_model(vocab_only=True)
        vocab = self._lib.llama_model_get_vocab(self._vocab_model)
        self._vocab = vocab
        self.n_vocab = int(self._lib.llama_vocab_n_tokens(vocab))
        self.add_bos = bool(self._lib.llama_vocab_get_add_bos(vocab))
        bos = int(self._lib.llama_vocab_bos(vocab))
        self.bos_id = bos if bos >= 0 else None
        self.threads = threads or default_threads()
        self._n_seq = max(1, LLAMA_N_BATCH // ctx)
        self._ctx_size = ctx

    def _load_model(self, vocab_only: bool):
        lib = self._lib
        mparams = lib.llama_model_default_params()
        mparams.vocab_only = vocab_only
        mparams.use_extra_bufts = _extra_bufts()
        model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise BadInput("llama.cpp cannot load this model (unsupported architecture or tensor type?)",
                           self.path)
        return model

    def load(self) -> None:
        """Weights, context and batch (idempotent)."""
        if self._ctx is not None:
            return
        self._model = self._load_model(vocab_only=False)
        self._ctx = self._new_context(self._ctx_size)
        self._batch = self._lib.llama_batch_init(self._n_seq * self._ctx_size, 0, self._n_seq)

    def _new_context(self, ctx: int):
        lib = self._lib
        cparams = lib.llama_context_default_params()
        # the layout llama-perplexity sets up: n_parallel = n_batch / ctx sequences in one batch
        cparams.n_ctx = self._n_seq * ctx
        cparams.n_batch = self._n_seq * ctx  # one decode per call (ctx > 2048: llama.cpp splits the batch)
        cparams.n_seq_max = self._n_seq
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        handle = lib.llama_init_from_model(self._model, cparams)
        if not handle:
            self.close()
            raise IOFailure(f"llama.cpp cannot create a context of {self._n_seq}x{ctx} tokens "
                            "(out of memory?)", self.path)
        return handle

    def tokenize(self, text: str) -> list[int]:
        lib, raw = self._lib, text.encode("utf-8")
        cap = len(raw) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:  # never for byte-level vocabs (a token is at least one byte), but the API allows it
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, True, False)
        return list(buf[:n])

    def seqs_per_call(self, ctx: int) -> int:
        return self._n_seq

    def logits(self, chunks: np.ndarray, first: int) -> torch.Tensor:
        self.load()
        lib, batch = self._lib, self._batch
        n_seq, ctx = chunks.shape
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        n = 0
        for s in range(n_seq):
            for k in range(ctx):
                batch.token[n] = int(chunks[s, k])
                batch.pos[n] = k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = s
                batch.logits[n] = k >= first  # outputs only where llama-perplexity asks for them
                n += 1
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise IOFailure(f"llama_decode failed (code {rc})", self.path)
        rows = n_seq * (ctx - first)
        ptr = lib.llama_get_logits(self._ctx)
        out = np.ctypeslib.as_array(ptr, shape=(rows * self.n_vocab,)).copy()
        return torch.from_numpy(out).view(n_seq, ctx - first, self.n_vocab)

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        for attr in ("_model", "_vocab_model"):
            if getattr(self, attr, None):
                lib.llama_model_free(getattr(self, attr))
                setattr(self, attr, None)


# ------------------------------------------------------------------------------------------------------------
# transformers


def quant_method(config: dict) -> str | None:
    """The checkpoint's quantization method from config.json (None for a dense checkpoint)."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    return str(qc.get("quant_method", "unknown")).lower()


def pick_loader(method: str | None, loader: str, partial_fp8_blocks: bool = False) -> str:
    """auto: our unpacker where transformers cannot dequantize on CPU (GPTQ/AWQ; FP8 block grids with partial
    edge tiles, which its Fp8Dequantize refuses), transformers otherwise."""
    if loader not in LOADERS:
        raise BadInput(f"unknown loader {loader!r} (choose from {', '.join(LOADERS)})")
    if loader != "auto":
        return loader
    return "unpack" if method in ("gptq", "awq") or partial_fp8_blocks else "transformers"


class HFBackend:
    kind = "transformers"

    def __init__(self, path: Path, loader: str = "auto", threads: int | None = None):
        from qconvert.arch.tensors import check_checkpoint_shapes
        from qconvert.calib.datasets import adds_bos, load_tokenizer
        from qconvert.formats.packed import dense
        from qconvert.formats.packed.fp8 import partial_blocks
        from qconvert.load import open_checkpoint

        self.ckpt = open_checkpoint(path)
        self.path = self.ckpt.path
        # transformers' own size-mismatch report is many lines; a quantized source's dequantized shapes and
        # scales are checked too
        check_checkpoint_shapes(dense.dense_source(self.ckpt))
        self.method = quant_method(self.ckpt.config)
        self.loader = pick_loader(self.method, loader, self.method == "fp8" and bool(
            partial_blocks(self.ckpt.tensors, dense.quantization_config(self.ckpt))))
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(self.ckpt)
        self.add_bos = adds_bos(self.tokenizer)
        self.bos_id = self.tokenizer.bos_token_id
        text = text_config(self.ckpt.config)
        self.n_vocab = int(text.get("vocab_size") or len(self.tokenizer))
        self.model = None

    def load(self) -> None:
        """The weights (idempotent): only once tokenization and vocabulary checks have passed."""
        if self.model is not None:
            return
        if self.loader == "unpack":
            self.model = _load_unpacked(self.ckpt)
        else:
            self.model = _load_transformers(self.ckpt, self.method, emulate=self.loader == "emulate")
        self.model.eval()
        rows = int(self.model.get_output_embeddings().weight.shape[0])
        if rows != self.n_vocab:  # logits must have the width the vocabulary checks assumed
            self.n_vocab = rows

    def tokenize(self, text: str) -> list[int]:
        from qconvert.calib.datasets import encode

        with quiet_transformers():  # "sequence longer than the model maximum": we chunk it ourselves
            ids = encode(self.tokenizer, text)
        return [self.bos_id, *ids] if self.add_bos else ids

    def seqs_per_call(self, ctx: int) -> int:
        return 1

    @torch.inference_mode()
    def logits(self, chunks: np.ndarray, first: int) -> torch.Tensor:
        self.load()
        ids = torch.from_numpy(np.ascontiguousarray(chunks, dtype=np.int64))
        keep = ids.shape[1] - first
        out = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        return out[:, -keep:].float()

    def close(self) -> None:
        self.model = None


def _load_transformers(ckpt, method: str | None, emulate: bool = False):
    """from_pretrained in float32 (bf16 weights widen exactly; CPU bf16 matmuls would add their own error)."""
    from transformers import AutoModelForCausalLM

    # compressed-tensors 0.20 decompresses FP4 weights to bf16 and then multiplies them with the float32
    # activations ("expected m1 and m2 to have the same dtype"): FP4 checkpoints are emulated in bf16
    dtype = torch.bfloat16 if emulate and _fp4_weights(ckpt.config) else torch.float32
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation(ckpt.config)}
    if emulate and method != "compressed-tensors":
        raise BadInput("--loader emulate runs compressed-tensors checkpoints only", ckpt.path)
    if method == "compressed-tensors" and not emulate:
        from transformers import CompressedTensorsConfig

        # dense at load: the default mode emulates activation quantization and fails on asym packs (§5.3)
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    elif method == "mxfp4":  # gpt-oss's experts: dequantized in float32 at load (exact), no triton kernels
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif method is not None and method not in ("fp8", "compressed-tensors"):
        raise BadInput(f"transformers cannot load {method} checkpoints on CPU here; use --loader unpack",
                       ckpt.path)
    try:
        with quiet_transformers():  # also mutes "quantization_config passed twice": intended, dequantize wins
            return AutoModelForCausalLM.from_pretrained(str(ckpt.path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise BadInput(f"transformers cannot load this checkpoint: {one_line(e)}", ckpt.path) from e


def _fp4_weights(config: dict) -> bool:
    qc = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    groups = qc.get("config_groups") if isinstance(qc, dict) else None
    return isinstance(groups, dict) and any(
        isinstance(g, dict) and isinstance(g.get("weights"), dict) and g["weights"].get("type") == "float"
        and g["weights"].get("num_bits") == 4 for g in groups.values())


def _load_unpacked(ckpt):
    """The model from its config with parameters on meta, then dense weights assigned from our unpacker."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qconvert.calib.model import params_on_meta
    from qconvert.formats.packed import dense_tensors

    try:
        cfg = AutoConfig.from_pretrained(str(ckpt.path))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise BadInput(f"cannot read config.json: {one_line(e)}", ckpt.path) from e
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    with params_on_meta(), quiet_transformers():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation=attn_implementation(ckpt.config))
    _per_expert_linears(model, ckpt)
    params = dict(model.named_parameters())
    # persistent buffers the checkpoint holds (DeepSeek-V3 / GLM-4.5's router e_score_correction_bias):
    # from_config leaves them at their initial zeros
    persistent = model.state_dict().keys()
    buffers = {n: b for n, b in model.named_buffers() if n in persistent}
    seen: set[str] = set()
    for name, value in dense_tensors(ckpt):
        if name in buffers and tuple(value.shape) == tuple(buffers[name].shape):
            buffers[name].copy_(value.to(buffers[name].dtype))
            continue
        if name not in params:
            continue  # e.g. rotary caches some checkpoints carry
        if tuple(value.shape) != tuple(params[name].shape):
            raise BadInput(f"tensor {name}: shape {tuple(value.shape)} after unpacking, the config implies "
                           f"{tuple(params[name].shape)}", ckpt.path)
        _set_param(model, name, value.to(torch.float32))
        seen.add(name)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise BadInput(f"tensor {missing[0]} is missing from the checkpoint", ckpt.path)
    return model


def _per_expert_linears(model: torch.nn.Module, ckpt) -> None:
    """A MoE checkpoint with one tensor per expert (as the hub and our quantize write them): the model's fused
    3-D experts become one Linear per expert under those names (calib.experts, transformers' own eager
    forward and router), so each unpacked expert weight has a parameter to go to."""
    from qconvert.arch.table import resolve
    from qconvert.calib.experts import linearise

    spec = resolve(ckpt.config, ckpt.path)
    if spec.experts is not None and any(f".{spec.experts.module}.0." in n for n in ckpt.tensors):
        linearise(model, spec)


def _set_param(model: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


# ------------------------------------------------------------------------------------------------------------


def open_backend(source: str | Path, ctx: int, *, loader: str = "auto",
                 threads: int | None = None) -> Backend:
    """A .gguf file → llama.cpp; anything else (HF directory, .safetensors, hub id) → transformers."""
    p = Path(source)
    if p.is_file() and (p.suffix.lower() == ".gguf" or is_gguf(p)):
        return LlamaCppBackend(p, ctx, threads)
    if p.suffix.lower() == ".gguf":
        raise BadInput("no such file", p)
    return HFBackend(p, loader=loader, threads=threads)



def check_ctx(ctx: int) -> None:
    if ctx < 4 or ctx % 2:
        raise BadInput(f"--ctx-size must be an even number >= 4, got {ctx}")
