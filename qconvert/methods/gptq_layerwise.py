"""GPTQ over the decoder layers, driven by the calibration engine in quantize-as-you-go mode.

The engine (calib.runner.LayerwiseRunner) walks the decoder layers with inputs produced by the layers
before, already quantized; for each layer ``on_layer`` quantizes its Linears and returns True, so the engine
re-runs the layer and the next one sees the quantized layer's outputs (errors propagate, as in AutoGPTQ and
llm-compressor).

Sub-layer groups are found from the engine's statistics, without an architecture table: Linears fed the very
same input tensor share one statistics object (q/k/v, gate/up), and the statistics dict is in call order, so
llama-like layers give ``[q,k,v] → [o] → [gate,up] → [down]`` and phi3 ``[qkv] → [o] → [gate_up] → [down]``.

* true-sequential (default): for each group in order, run the layer over all samples with the earlier groups
  already fake-quantized, stopping the forward as soon as the group's input is seen (the rest of the layer is
  not computed), accumulate H = Σ x xᵀ in float32 and quantize the group.
* not true-sequential: every Hessian comes from the engine's own statistics pass (original weights).

``--smoothquant ALPHA`` (--scheme w8a8): at the start of each layer the SmoothQuant factors of its mappings
(methods/smoothquant.py) come from the engine's max |x| of that layer's inputs (the layers before already
quantized) and are folded into the materialised layer (awq_block.fold_scales: the norm divided, the balanced
columns multiplied); the Hessians are then those of the smoothed inputs. The folded norms are written as they
are. With --stats, max |x| and the Hessians come from the file (H of the smoothed inputs = H / s sᵀ).

Each Linear's weight is replaced by its dequantized value (what every reader reconstructs), computed in the
engine's dtype. The error reported per Linear is the relative output error on the calibration inputs,
``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))`` with ``E = W - deq(Q)`` — scale-free, unlike the raw GPTQ loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qconvert.arch.tensors import LM_HEAD
from qconvert.calib.experts import expert_of, experts_modules, routed_tokens
from qconvert.errors import BadInput
from qconvert.methods import smoothquant as sq
from qconvert.methods.gptq import gptq_quantize
from qconvert.methods.plan import CalibrationOptions, ExpertOptions, IntOptions, Job, check_maxima
from qconvert.methods.types import PackOptions, QuantizedTensor, QuantSpec

log = logging.getLogger("qconvert.gptq")

# (layer index, decoder layers, text): "layers.3 mlp.down_proj err 0.012"
Progress = Callable[[int, int, str], None]
# (full Linear name, result, relative output error)
OnQuantized = Callable[[str, QuantizedTensor, float], None]
# (tensor name, value): a float tensor SmoothQuant changed (a folded norm, a balanced Linear kept dense)
OnSmoothed = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class Config(IntOptions, CalibrationOptions, ExpertOptions):
    """``--method gptq``: the integer grid, the calibration data (or a stats file's Hessians), the solver."""

    stats: str | None = None  # Hessians from a `qconvert calibrate` file instead of --dataset
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (desc_act)
    static_groups: bool = False  # act-order with group scales fixed up front: g_idx stays sequential
    damp: float = 0.01  # a fraction of mean(diag H); raised on failure
    true_sequential: bool = True  # sub-layers in order, each on quantized inputs
    block_size: int = 128  # columns per lazy-batch update
    smoothquant: float | None = None  # SmoothQuant's α (--scheme w8a8)

    def check(self) -> None:
        self.check_scheme()
        self.check_experts()
        if self.smoothquant is not None:
            sq.check_alpha(self.smoothquant)
            if self.scheme != "w8a8":
                raise BadInput("--smoothquant applies to --scheme w8a8 (int8 activations)")
        if not 0 < self.damp < 1:
            raise BadInput(f"--damp {self.damp}: must be between 0 and 1 (a fraction of mean(diag H))")
        if self.static_groups and not self.act_order:
            raise BadInput("--static-groups only matters with --act-order")
        if self.stats and self.dataset:
            raise BadInput("give either --dataset (calibrate while quantizing) or --stats (a calibrate file)")
        if not self.stats and not self.dataset:
            raise BadInput("--method gptq needs calibration text: --dataset FILE.txt|.jsonl|.parquet|hf:NAME "
                           "(or --stats FILE from 'qconvert calibrate')")
        self.check_calibration()

    def pack_options(self, lm_head: bool) -> PackOptions:
        return PackOptions(method="gptq", lm_head=lm_head, act_order=self.act_order,
                           static_groups=self.static_groups, damp=self.damp,
                           true_sequential=self.true_sequential)


# The GPTQ column loop is thousands of small ops on [N]-vectors: below this many rows one thread is faster
# than several (measured 5-25x on 2 busy cores: OpenMP workers spin and get descheduled)
SINGLE_THREAD_ROWS = 4096


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stop(Exception):
    """Raised from a hook: the rest of the layer's forward is not needed."""


# ------------------------------------------------------------------------------------------------------------
# one Linear


def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))``: ||(W - Q) X|| / ||W X|| over the calibration inputs."""
    e = w - deq
    num = float((e @ h * e).sum())
    den = float((w @ h * w).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def gptq_weight(weight: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: Config,
                name: str) -> tuple[QuantizedTensor, torch.Tensor, float]:
    """GPTQ ``W [N, K]`` with ``H [K, K]`` (on the CPU: the column loop is many small ops); returns the
    result, its dequantized weight (float32) and the relative output error."""
    w = weight.detach().to("cpu", torch.float32)
    h = h.detach().to("cpu", torch.float32)
    with _threads(1 if w.shape[0] <= SINGLE_THREAD_ROWS else None):
        qt, _loss = gptq_quantize(w, h, spec, act_order=cfg.act_order, static_groups=cfg.static_groups,
                                  damp=cfg.damp, block_size=cfg.block_size, name=name)
    deq = torch.from_numpy(qt.dequantize())
    return qt, deq, output_error(w, deq, h)


def gptq_or_rtn(weight: torch.Tensor, h: torch.Tensor, rows: int, spec: QuantSpec, cfg: Config, name: str,
                fallbacks: dict[str, int]) -> tuple[QuantizedTensor, torch.Tensor, float]:
    """GPTQ ``weight`` with its Hessian; a routed expert whose Linear saw fewer than --min-expert-tokens rows
    is rounded to nearest instead (recorded in ``fallbacks``: expert -> rows), its error the output error on
    the rows it did see (0 without any). Returns the result, its dequantized weight and the error."""
    expert = expert_of(name)
    if expert is None or rows >= cfg.min_expert_tokens:
        return gptq_weight(weight, h, spec, cfg, name)
    from qconvert.methods.rtn import rtn_quantize

    fallbacks[expert] = rows
    w = weight.detach().to("cpu", torch.float32)
    qt = rtn_quantize(w, spec)
    deq = torch.from_numpy(qt.dequantize())
    return qt, deq, output_error(w, deq, h.detach().to("cpu", torch.float32))


# ------------------------------------------------------------------------------------------------------------
# one decoder layer


def sublayer_groups(stats: dict) -> list[list[str]]:
    """Full Linear names grouped by shared input, in call order (the engine's stats dict is in call order
    and gives Linears fed the same tensor one shared statistics object)."""
    groups: dict[int, list[str]] = {}
    for name, st in stats.items():
        groups.setdefault(id(st), []).append(name)
    return list(groups.values())




def collect_hessians(step, lins: dict[str, nn.Linear], args: tuple,
                     kwargs: dict) -> dict[str, tuple[torch.Tensor, int]]:
    """Σ x xᵀ (float32) and the row count of each Linear's input over every sample, each forward stopped as
    soon as every one of them has seen its input (the rest of the layer is not computed)."""
    sums: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(lins, 0)
    seen: set[str] = set()

    def hook_for(name: str, k: int):
        def hook(_m, a):
            x = a[0].reshape(-1, k)
            x = x if x.dtype == torch.float32 else x.float()
            if name not in sums:
                sums[name] = torch.zeros(k, k, dtype=torch.float32, device=x.device)
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(lins):
                raise _Stop
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(n, lin.in_features)) for n, lin in lins.items()]
    size = None
    try:
        for x in step.inputs:
            size = x.shape[0] if size is None else size
            if x.shape[0] != size:
                # the call arguments were caught for the first batch's size (the engine runs batch_size 1)
                raise RuntimeError(f"{step.name}: batches of different sizes ({size}, {x.shape[0]})")
            seen.clear()
            try:
                step.module(x, *args, **kwargs)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    never = [n for n in lins if n not in sums]
    if never:
        raise RuntimeError(f"{step.name}: {', '.join(never)} never received an input")
    return {n: (sums[n], rows[n]) for n in lins}


def stages(groups: list[list[str]]) -> list[list[list[str]]]:
    """The groups in the order they are quantized, those that can share one Hessian pass together: the
    routed experts' groups of one role (every expert's [gate, up], then every [down]) depend on no other
    expert, so one forward collects all of them; every other group is a stage of its own."""
    out: list[list[list[str]]] = []
    by_role: dict[tuple, list[list[str]]] = {}
    for g in groups:
        expert = expert_of(g[0])
        if expert is None:
            out.append([g])
            continue
        role = (expert.rsplit(".", 1)[0], tuple(n[len(expert):] for n in g))  # (the experts module, names)
        if role not in by_role:
            by_role[role] = []
            out.append(by_role[role])
        by_role[role].append(g)
    return out


class LayerwiseGPTQ:
    """The ``on_layer`` callback (and the lm_head ``on_final`` one) of the engine for GPTQ.

    ``specs``: full Linear name (HF module name) -> QuantSpec, or None / absent to keep it in float.
    ``on_quantized(name, qt, error)`` receives each result as soon as it is known (to be packed and written).
    """

    def __init__(self, specs: dict[str, QuantSpec | None], cfg: Config, on_quantized: OnQuantized,
                 n_layers: int, progress: Progress | None = None,
                 smooth: tuple[list[sq.SmoothGroup], OnSmoothed] | None = None):
        self.specs = specs
        self.cfg = cfg
        self.on_quantized = on_quantized
        self.n_layers = n_layers
        self.progress = progress
        self.smooth = smooth
        self.smoothed: dict[str, torch.Tensor] = {}  # balanced Linear -> its factors (this layer)
        self.lm_head_hessian: torch.Tensor | None = None
        self.lm_head_tokens = 0
        self.fallbacks: dict[str, int] = {}  # MoE: experts RTN-quantized (too few rows) -> their row count
        self.expert_tokens: dict[str, int] = {}  # MoE: tokens routed to each expert, every batch

    @property
    def kinds(self) -> tuple[str, ...]:
        """Statistics to ask the engine for: Hessians only when its own pass provides them; else the
        cheapest statistic (only the engine's grouping of the Linears is used, from one probe batch);
        SmoothQuant needs max |x| over every batch."""
        if self.cfg.true_sequential:
            return ("abs_max",)
        return ("hessian", "abs_max") if self.smooth else ("hessian",)

    @property
    def stats_batches(self) -> int | None:
        """Batches of the engine's statistics pass: one shows the grouping; SmoothQuant needs them all."""
        return 1 if self.cfg.true_sequential and not self.smooth else None

    def _smooth_layer(self, step) -> None:
        """Fold this layer's SmoothQuant factors into the materialised layer; write what is stored dense."""
        assert self.smooth is not None
        groups, write = self.smooth
        self.smoothed = {}
        from qconvert.methods.awq_block import fold_scales

        for g in groups:
            if not g.norm.startswith(f"{step.name}."):
                continue
            lins = [step.module.get_submodule(_rel(step.name, b)) for b in g.balanced]
            act = check_maxima(g.balanced[0], step.stats[g.balanced[0]].abs_max, "--smoothquant", None)
            s = sq.smoothing_scales(act, [lin.weight for lin in lins], self.cfg.smoothquant)  # type: ignore[arg-type]
            fold_scales(step.module, g.group, s)
            norm = step.module.get_submodule(_rel(step.name, g.norm[: -len(".weight")]))
            write(g.norm, norm.weight.detach().to("cpu").clone())
            for b, lin in zip(g.balanced, lins, strict=True):
                self.smoothed[b] = s
                if self.specs.get(b) is None:
                    write(f"{b}.weight", lin.weight.detach().to("cpu").clone())

    def _tell(self, index: int, text: str) -> None:
        if self.progress is not None:
            self.progress(index, self.n_layers, text)

    def on_layer(self, step) -> bool:
        groups = [[n for n in g if self.specs.get(n) is not None] for g in sublayer_groups(step.stats)]
        groups = [g for g in groups if g]
        missing = [n for n, s in self.specs.items() if s is not None and n.startswith(f"{step.name}.")
                   and n not in step.stats]
        if missing:
            raise RuntimeError(f"{step.name}: {', '.join(missing)} never ran in the calibration forward")
        if self.smooth is not None:
            self._smooth_layer(step)
        if not self.cfg.true_sequential:  # the engine's statistics pass ran every batch
            self.expert_tokens.update(step.expert_tokens)
        if not groups:
            return bool(self.smoothed)
        call = step.call_args() if self.cfg.true_sequential else None
        routers = experts_modules(step.module, step.name)
        counted = False  # the routed tokens per expert: taken in the first pass that runs the experts
        for stage in stages(groups):
            firsts = {g[0]: step.module.get_submodule(_rel(step.name, g[0])) for g in stage}
            experts = [expert_of(g[0]) for g in stage]
            if call is not None:
                self._tell(step.index, f"layers.{step.index} inputs of {_short(step.name, stage[0])}"
                           + (f" (+{len(stage) - 1} experts)" if len(stage) > 1 else ""))
                for m in routers.values():
                    m.routed.zero_()
                hessians = collect_hessians(step, firsts, *call)
                if routers and not counted and any(experts):
                    # every expert has run on every batch (its first Linear fired): complete counts
                    self.expert_tokens.update(routed_tokens(routers))
                    counted = True
            else:
                hessians = {n: (self._stats_hessian(step, n), step.stats[n].count) for n in firsts}
            for group in stage:
                h, rows = hessians.pop(group[0])
                for name in group:
                    lin = step.module.get_submodule(_rel(step.name, name))
                    qt, err = self._quantize(lin, h, rows, name)
                    self.on_quantized(name, qt, err)
                    self._tell(step.index, f"layers.{step.index} {_rel(step.name, name)} err {err:.4g}")
                del h
        self._tell(step.index + 1, f"layers.{step.index} done")
        return True  # re-run the layer: the next one sees the quantized layer's outputs

    def _stats_hessian(self, step, name: str) -> torch.Tensor:
        h = step.stats[name].hessian
        if name in self.smoothed:  # the statistics pass saw the inputs before smoothing
            h = smoothed_hessian(h, self.smoothed[name])
        return h

    def _quantize(self, lin: nn.Linear, h: torch.Tensor, rows: int,
                  name: str) -> tuple[QuantizedTensor, float]:
        """Quantize one Linear; its weight becomes the dequantized result (in place)."""
        qt, deq, err = gptq_or_rtn(lin.weight, h, rows, self.specs[name], self.cfg, name, self.fallbacks)
        lin.weight.copy_(deq.to(device=lin.weight.device, dtype=lin.weight.dtype))
        return qt, err

    # -- lm_head (--quantize-lm-head): its input is the final norm's output over the quantized model ------
    def on_final(self, _batch: int, normed: torch.Tensor, _tokens: torch.Tensor, _head) -> None:
        x = normed.reshape(-1, normed.shape[-1]).float()
        if self.lm_head_hessian is None:
            self.lm_head_hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.lm_head_hessian.addmm_(x.T, x)
        self.lm_head_tokens += x.shape[0]

    def quantize_lm_head(self, weight: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedTensor, float]:
        if self.lm_head_hessian is None:
            raise RuntimeError("lm_head: no Hessian collected (on_final was not called)")
        qt, _deq, err = gptq_weight(weight, self.lm_head_hessian, spec, self.cfg, LM_HEAD)
        return qt, err


def smoothed_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ of the smoothed inputs x / s."""
    inv = 1.0 / s.to(device=h.device, dtype=torch.float32)
    return h * inv[:, None] * inv[None, :]


def _rel(layer_name: str, full: str) -> str:
    return full[len(layer_name) + 1 :]


def _short(layer_name: str, group: list[str]) -> str:
    return ",".join(_rel(layer_name, n) for n in group)


def run_layerwise_gptq(ckpt, tokens: torch.Tensor, specs: dict[str, QuantSpec | None], cfg: Config,
                       on_quantized: OnQuantized, *, n_layers: int, device: str | None = "auto",
                       dtype: str | torch.dtype = "bf16", lm_head: QuantSpec | None = None,
                       lm_head_weight: torch.Tensor | None = None,
                       progress: Progress | None = None,
                       smooth: tuple[list[sq.SmoothGroup], OnSmoothed] | None = None) -> LayerwiseGPTQ:
    """GPTQ every Linear of ``specs`` over the calibration ``tokens`` [n, seq] (and lm_head when its spec is
    given), results passed to ``on_quantized`` in quantization order. Returns the driver (its
    ``fallbacks``)."""
    from qconvert.calib.runner import LayerwiseRunner

    driver = LayerwiseGPTQ(specs, cfg, on_quantized, n_layers, progress, smooth)
    runner = LayerwiseRunner(ckpt, device=device, dtype=dtype, batch_size=1, all_experts=cfg.all_experts)
    # true-sequential collects its own Hessians: the engine's pass only has to show which Linears share an
    # input, which one batch does
    runner.run(tokens, kinds=driver.kinds, on_layer=driver.on_layer, stats_batches=driver.stats_batches,
               on_final=driver.on_final if lm_head is not None else None)
    if lm_head is not None:
        assert lm_head_weight is not None
        qt, err = driver.quantize_lm_head(lm_head_weight, lm_head)
        on_quantized(LM_HEAD, qt, err)
    return driver


def run(job: Job) -> None:
    """Layer by layer on the calibration engine, each Linear written as soon as it is quantized; with
    --stats, tensor by tensor from the file's Hessians (one pass over the original model, so not
    sequential)."""
    cfg: Config = job.config
    quantized = {p.prefix: p for p in job.quantized}
    groups = sq.model_groups(job.ckpt.config, job.layers) if cfg.smoothquant is not None else None
    if groups is not None:
        sq.check_tensors(job.ckpt, groups)
    if cfg.stats:
        hessian = _stats_hessians(job.ckpt, list(quantized), cfg.stats)
        columns = sq.fold_from_maxima(job, groups) if groups is not None else {}
        fallbacks: dict[str, int] = {}
        for prefix, p in quantized.items():
            assert isinstance(p.spec, QuantSpec)
            (h, rows), w = hessian(prefix), job.ckpt.read(p.weight)
            if prefix in columns:
                w, h = sq.scale_columns(w, columns[prefix]), smoothed_hessian(h, columns[prefix])
            qt, _deq, err = gptq_or_rtn(w, h, rows, p.spec, cfg, prefix, fallbacks)
            job.emit(p, qt, err, None)
            if job.progress:
                job.progress((p.layer or 0) + 1, job.n_layers, p.label(err))
        job.notes.extend(cfg.expert_notes({}, fallbacks, _RTN_FALLBACK))
        return
    tokens = cfg.tokens(job.ckpt)
    head = quantized.get(LM_HEAD)
    driver = run_layerwise_gptq(
        job.ckpt, tokens, {k: p.spec for k, p in quantized.items() if p.layer is not None}, cfg,  # type: ignore[misc]
        lambda prefix, qt, err: job.emit(quantized[prefix], qt, err, None), n_layers=job.n_layers,
        device=cfg.device, dtype=cfg.calib_dtype, lm_head=head.spec if head else None,  # type: ignore[arg-type]
        lm_head_weight=job.ckpt.read(head.weight) if head else None, progress=job.progress,
        smooth=(groups, job.write) if groups is not None else None,
    )
    job.notes.extend(cfg.expert_notes(driver.expert_tokens, driver.fallbacks, _RTN_FALLBACK))


# what the summary says of an expert below --min-expert-tokens
_RTN_FALLBACK = "were quantized with RTN instead of GPTQ"


def _stats_hessians(ckpt, prefixes: list[str], path: str) -> Callable[[str], tuple[torch.Tensor, int]]:
    """Reader of the Hessian of each Linear to quantize, from a stats file made on this model. All are checked
    up front; each is read when its Linear's turn comes (together they can outweigh the model)."""
    from qconvert.calib.stats import StatsFile

    stats = StatsFile(path, ckpt)
    for prefix in prefixes:
        kinds = stats.kinds(prefix)
        if "hessian" not in kinds:
            what = "no Hessian" if kinds else "no statistics"
            raise BadInput(f"{what} for {prefix}; collect them with 'qconvert calibrate --stats hessian"
                           f"{' --lm-head' if prefix == LM_HEAD else ''}'", path)
    def read(prefix: str) -> tuple[torch.Tensor, int]:
        st = stats.read(prefix, ("hessian",))
        return st.hessian, st.count  # type: ignore[return-value]

    return read
