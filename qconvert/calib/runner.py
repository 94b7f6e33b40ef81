"""Layer-sequential forward ("Catcher" technique): the engine behind calibrate, imatrix, GPTQ, AWQ and FP8.

1. Build the transformers model on the meta device; materialise only the embeddings (and other small
   non-layer tensors).
2. Replace every decoder layer by a catcher and run the model on the calibration tokens: the catcher of
   layer 0 keeps the hidden states, every catcher keeps the extra arguments its layer receives (masks,
   position embeddings: gemma2/3 give each layer type its own), and the last one stops the forward.
3. For each layer: read its weights from the checkpoint, run all samples through it with pre-hooks on every
   nn.Linear that accumulate statistics, call `on_layer`, and keep the outputs as the next layer's inputs.
   The weights are then dropped. Peak memory = one layer's weights + the activations (kept in the compute
   dtype, or spilled to disk when they would not fit comfortably in RAM).

Quantize-as-you-go (GPTQ): `on_layer(step)` runs after the statistics of layer `step.index` are complete and
before its outputs are propagated. It may replace weights in `step.module` (e.g. with fake-quantized values)
and return True; the runner then re-runs the layer over all samples so the next layer sees the outputs of the
modified layer (errors propagate, as in AutoGPTQ / llm-compressor). Returning False/None keeps the outputs of
the statistics pass (AutoAWQ semantics: next inputs computed with the original weights). `step.forward()`
re-runs the layer over all samples with the current weights (AWQ's scale search), `step.inputs` gives the
layer's input hidden states batch by batch.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qconvert.arch.tensors import LM_HEAD
from qconvert.calib.experts import experts_modules, routed_tokens
from qconvert.calib.model import Skeleton, build_skeleton, in_features, linear_modules, materialise, release
from qconvert.calib.stats import LinearStats, parse_kinds
from qconvert.errors import BadInput
from qconvert.load.config import text_config
from qconvert.load.dtypes import TORCH_BY_NAME

Progress = Callable[[str, int, int], None]  # (what, done, total) after each unit of work


class _Stop(Exception):
    """Raised by the last catcher: nothing after the decoder layers is needed while catching."""


class ActivationStore:
    """Hidden states per batch, in memory or (spill_dir) as one file per batch read back through mmap."""

    def __init__(self, device: torch.device, spill_dir: Path | None = None):
        self.device = device
        self.spill_dir = spill_dir
        self._items: list[torch.Tensor | Path] = []

    def append(self, t: torch.Tensor) -> None:
        if self.spill_dir is None:
            self._items.append(t)
            return
        path = self.spill_dir / f"{id(self)}-{len(self._items)}.pt"
        torch.save(t.detach().cpu(), path)
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, Path):
            return torch.load(item, mmap=True).to(self.device)
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def clear(self) -> None:
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items = []


@dataclass
class LayerStep:
    """What `on_layer` receives: one decoder layer with its weights loaded and its statistics complete."""

    index: int
    name: str  # HF module name, e.g. "model.layers.3"
    module: nn.Module  # the materialised decoder layer (its weights may be replaced in place)
    stats: dict[str, LinearStats]  # full linear names -> statistics (q/k/v may share one object)
    inputs: ActivationStore  # the layer's input hidden states, one entry per batch
    _run: Callable[[], list[torch.Tensor]] = field(repr=False, default=None)  # type: ignore[assignment]
    # MoE: tokens routed to each expert ("<layer>.mlp.experts.X") in the statistics pass
    expert_tokens: dict[str, int] = field(default_factory=dict)

    def forward(self) -> list[torch.Tensor]:
        """Run the layer (current weights) over all input batches; returns the outputs per batch."""
        return self._run()

    def call_args(self) -> tuple[tuple, dict]:
        """The (args, kwargs) the layer is called with besides the hidden states (masks, position
        embeddings), caught on the first batch of a forward that is then abandoned."""
        got: dict = {}

        def hook(_m, args, kwargs):
            got["call"] = (tuple(args[1:]), dict(kwargs))
            raise _Stop

        handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.forward()
        except _Stop:
            pass
        finally:
            handle.remove()
        if "call" not in got:
            raise RuntimeError(f"{self.name}: the layer was never called")
        return got["call"]


OnLayer = Callable[[LayerStep], "bool | None"]
OnFinal = Callable[[int, torch.Tensor, torch.Tensor, nn.Module | None], None]
OnStats = Callable[[dict[str, LinearStats]], None]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInput(f"unknown --device '{device}' (use auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available")
    return dev


_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16"}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in TORCH_BY_NAME:
        raise BadInput(f"unknown dtype '{name}' (use f32, bf16 or f16)")
    return TORCH_BY_NAME[key]


class LayerwiseRunner:
    """Runs calibration tokens through a checkpoint one decoder layer at a time (see the module docstring)."""

    def __init__(
        self,
        ckpt,
        *,
        device: str | None = "auto",
        dtype: str | torch.dtype = torch.float32,
        batch_size: int = 1,
        threads: int | None = None,
        offload_dir: str | Path | None = None,
        max_activation_bytes: int | None = None,
        all_experts: bool = False,
    ):
        from qconvert.load.expert_slices import calibration_source

        # fused experts (transformers 5's, gpt-oss's, MXFP4 blocks) read as the per-expert Linears the
        # skeleton runs (calib.experts): a slice of the fused tensor each
        self.ckpt = calibration_source(ckpt)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = max(1, batch_size)
        self.threads = threads
        self.offload_dir = Path(offload_dir) if offload_dir else None
        self.max_activation_bytes = max_activation_bytes
        self.skeleton: Skeleton | None = None
        # MoE: every expert runs on every token for its statistics (the output still follows the routing)
        self.all_experts = all_experts
        # MoE: tokens the router sent to each expert in the statistics pass, "<layer>.mlp.experts.X" -> n
        self.expert_tokens: dict[str, int] = {}

    # -- public --------------------------------------------------------------------------------------------
    def run(
        self,
        tokens: torch.Tensor,
        *,
        kinds=None,
        on_layer: OnLayer | None = None,
        stats_batches: int | None = None,
        lm_head_stats: bool = False,
        on_final: OnFinal | None = None,
        on_stats: OnStats | None = None,
        progress: Progress | None = None,
    ) -> dict[str, LinearStats]:
        """Statistics of every linear input (decoder layers; plus "lm_head" if lm_head_stats) over `tokens`.

        `tokens` int64 [n_samples, seq_len]. `kinds`: the statistics to compute (see stats.STAT_KINDS).
        `on_final(batch_index, normed_hidden, token_batch, lm_head)` sees the final-norm output of each batch,
        with the lm_head module materialised (for perplexity). `stats_batches` (with `on_layer`): the
        statistics pass runs over the first n batches only — for callers that only need the layer's shape
        (which Linears share an input) and re-run the layer anyway; the outputs then come from the re-run.
        `on_stats(stats)` receives each layer's finished statistics (and lm_head's) instead of the returned
        dict, which is then empty: a caller that writes them away holds one layer's statistics at a time.
        """
        kinds = parse_kinds(kinds)
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise BadInput("calibration tokens must be a non-empty [samples, seq_len] array")
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode(), self._spill_dir(tokens) as spill:
            sk = self.skeleton = build_skeleton(self.ckpt, self.dtype)
            for m in sk.experts:
                m.all_experts = self.all_experts
            self._materialise_outer(sk)
            batches = list(torch.split(tokens, self.batch_size))
            n_layers = len(sk.layers)
            total = (n_layers + (1 if (lm_head_stats or on_final) else 0)) * len(batches)
            tick = _ticker(progress, total)
            hidden, layer_args = self._catch(sk, batches, spill)
            stats: dict[str, LinearStats] = {}
            sink = stats.update if on_stats is None else on_stats
            for i in range(n_layers):
                hidden = self._run_layer(
                    sk,
                    i,
                    hidden,
                    layer_args,
                    kinds,
                    sink,
                    on_layer,
                    stats_batches if on_layer is not None else None,
                    spill,
                    lambda b, i=i: tick(f"layer {i + 1}/{n_layers}"),
                )
                trim_heap()
            if lm_head_stats or on_final:
                self._final(
                    sk, hidden, batches, kinds, sink, lm_head_stats, on_final, lambda b: tick("output")
                )
            hidden.clear()
        return stats

    # -- stages ----------------------------------------------------------------------------------------------
    def _materialise_outer(self, sk: Skeleton) -> None:
        """Embeddings and other small non-layer parameters (final norm); lm_head only on demand."""
        for name, mod in sk.model.named_modules():
            if mod is sk.layers or mod is sk.lm_head or name.startswith(sk.layers_prefix + "."):
                continue
            if any(True for _ in mod.parameters(recurse=False)):
                materialise(mod, name, self.ckpt, self.device, self.dtype, recurse=False)

    def _catch(self, sk: Skeleton, batches, spill) -> tuple[ActivationStore, dict[int, list]]:
        """Layer-0 inputs per batch, and per batch size the (args, kwargs) each layer is called with."""
        hidden = ActivationStore(self.device, spill)
        args_by_size: dict[int, list] = {}
        real = list(sk.layers)
        n = len(real)
        for b in batches:
            size = b.shape[0]
            sink: list = [None] * n
            for i in range(n):
                sk.layers[i] = _Catcher(i, n, sink, record=size not in args_by_size, keep_hidden=(i == 0))
            try:
                sk.decoder(input_ids=b.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                for i in range(n):
                    sk.layers[i] = real[i]
            hidden.append(sink[0][0])
            if size not in args_by_size:
                args_by_size[size] = [(s[1], s[2]) for s in sink]
        return hidden, args_by_size

    def _run_layer(self, sk, i, hidden: ActivationStore, layer_args, kinds, sink, on_layer, probe, spill,
                   tick):
        layer = sk.layers[i]
        name = f"{sk.layers_prefix}.{i}"
        materialise(layer, name, self.ckpt, self.device, self.dtype)
        linears = linear_modules(layer, name)
        layer_stats: dict[str, LinearStats] = {}
        handles, memo = _attach_stats_hooks(linears, kinds, layer_stats)

        def run_all(collect: bool, limit: int | None = None) -> ActivationStore:
            out = ActivationStore(self.device, spill)
            for b in range(len(hidden)):
                if limit is not None and b >= limit:
                    if collect:
                        tick(b)  # the progress bar counts batches either way
                    continue
                h = hidden[b]
                args, kwargs = layer_args[h.shape[0]][i]
                y = layer(h, *args, **kwargs)
                out.append(y[0] if isinstance(y, tuple) else y)
                memo.clear()
                if collect:
                    tick(b)
            return out

        moe = experts_modules(layer, name)
        for m in moe.values():
            m.routed.zero_()
        try:
            out = run_all(collect=True, limit=probe)
        finally:
            for hd in handles:
                hd.remove()
        routed = routed_tokens(moe)
        self.expert_tokens.update(routed)
        sink(layer_stats)
        if on_layer is not None:
            step = LayerStep(i, name, layer, layer_stats, hidden, lambda: list(run_all(collect=False)),
                             routed)
            if on_layer(step) or probe is not None:  # a probe pass has no complete outputs
                out.clear()
                out = run_all(collect=False)
        release(layer)
        hidden.clear()
        return out

    def _final(self, sk, hidden, batches, kinds, sink, lm_head_stats, on_final, tick) -> None:
        head = sk.lm_head
        if on_final is not None and head is not None:
            fallback = {f"{LM_HEAD}.weight": _embed_name(sk)} if _embed_name(sk) else None  # tied
            materialise(head, LM_HEAD, self.ckpt, self.device, self.dtype, fallbacks=fallback)
        st = LinearStats(sk.decoder.norm.weight.shape[-1], kinds) if lm_head_stats else None
        for b, h in enumerate(hidden):
            normed = sk.decoder.norm(h)
            if st is not None:
                st.add(normed)
            if on_final is not None:
                on_final(b, normed, batches[b], head)
            tick(b)
        if st is not None:
            sink({LM_HEAD: st})
        if head is not None:
            release(head)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _spill_dir(self, tokens: torch.Tensor):
        return _SpillDir(self, tokens)


class _SpillDir:
    """Context: a temp dir for activations when they should not stay in memory, else None."""

    def __init__(self, runner: LayerwiseRunner, tokens: torch.Tensor):
        self.runner = runner
        self.tokens = tokens
        self.path: Path | None = None

    def __enter__(self) -> Path | None:
        r = self.runner
        if r.offload_dir is None and not self._too_big():
            return None
        base = r.offload_dir or _cache_dir() / "activations"
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="calib-", dir=base))
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def _too_big(self) -> bool:
        import psutil

        cfg = self.runner.ckpt.config
        hidden = int(text_config(cfg).get("hidden_size", 0))
        elem = torch.finfo(self.runner.dtype).bits // 8
        need = 2 * self.tokens.numel() * hidden * elem  # inputs + outputs of one layer
        limit = self.runner.max_activation_bytes
        if limit is None:
            limit = psutil.virtual_memory().available // 2
        return need > limit


def trim_heap() -> None:
    """Give the freed memory of a finished layer back to the OS. glibc serves the many tens-of-MB tensors of
    a layer from its heap once its adaptive mmap threshold has grown, and fragmentation then keeps the
    process growing layer after layer (measured: +40 MB per layer on a 1B model); malloc_trim releases the
    free pages. A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols: libc is loaded
    except (OSError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("QCONVERT_CACHE") or Path.home() / ".cache" / "qconvert")


class _Catcher(nn.Module):
    def __init__(self, index: int, n: int, sink: list, record: bool, keep_hidden: bool):
        super().__init__()
        self.index, self.n, self.sink, self.record, self.keep_hidden = index, n, sink, record, keep_hidden

    def forward(self, hidden_states, *args, **kwargs):
        kept = hidden_states if self.keep_hidden else None
        self.sink[self.index] = (kept, args, kwargs) if self.record or self.keep_hidden else None
        if self.index == self.n - 1:
            raise _Stop
        return hidden_states


def _attach_stats_hooks(linears: dict[str, nn.Linear], kinds, layer_stats: dict[str, LinearStats]):
    """Pre-hooks accumulating each linear's input. Linears fed the very same tensor in one forward (q/k/v,
    gate/up) share one LinearStats, computed once. `memo` must be cleared after every forward."""
    memo: dict[int, tuple[LinearStats, torch.Tensor]] = {}

    def make(name: str, mod: nn.Linear):
        def hook(_m, args):
            x = args[0]
            hit = memo.get(id(x))
            if hit is not None:
                mine = layer_stats.setdefault(name, hit[0])
                if mine is not hit[0]:
                    mine.add(x)
                return
            st = layer_stats.get(name)
            if st is None:
                st = layer_stats[name] = LinearStats(in_features(mod), kinds)
            st.add(x)
            memo[id(x)] = (st, x)  # holding x keeps its id from being reused within this forward

        return hook

    handles = [m.register_forward_pre_hook(make(n, m)) for n, m in linears.items()]
    return handles, memo


def _embed_name(sk: Skeleton) -> str | None:
    emb = sk.model.get_input_embeddings()
    for n, m in sk.model.named_modules():
        if m is emb:
            return f"{n}.weight"
    return None


def _ticker(progress: Progress | None, total: int) -> Callable[[str], None]:
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, total)

    return tick
