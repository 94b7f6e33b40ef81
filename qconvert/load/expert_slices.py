"""Fused expert tensors read as one tensor per expert: the Checkpoint interface over a MoE checkpoint whose
routed experts are stored as transformers 5 holds them, each expert's Linear a slice of the fused tensor.

    src = per_expert_source(ckpt)                      # quantize: the qwen2_moe-style fused form
    src = calibration_source(ckpt)                     # the calibration engine: gpt-oss's experts too

transformers 5 saves ``<layer>.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
``<layer>.mlp.experts.down_proj`` [E, H, I]; the hub (and vLLM's fused-MoE loaders, and our per-expert
calibration modules, calib.experts.LinearExperts) name one Linear per expert and projection:
``<layer>.mlp.experts.X.gate_proj.weight`` = gate_up_proj[X, :I], ``up_proj`` = gate_up_proj[X, I:],
``down_proj`` = down_proj[X]. The view lists those per-expert names in place of the fused tensors (sorted by
name, as safetensors orders a per-expert checkpoint's header) and reads each as a slice of its fused tensor,
lazily: a source's mapped tensor is sliced without a copy; a view that makes its fused tensor on read (gpt-oss
MXFP4 blocks) is asked once per tensor, the last one kept. Every fused tensor's shape is checked when the
view is made (one BadInput line before any work).

gpt-oss (``interleaved``; only for the calibration engine, quantize keeps its fused experts as they are):
gate_up_proj [E, H, 2I] in x@W orientation with gate/up interleaved in the columns, its bias [E, 2I],
down_proj [E, I, H] and its bias [E, H]: gate_proj.weight = gate_up_proj[X][:, 0::2]ᵀ [I, H] and its bias
gate_up_proj_bias[X][0::2], up_proj the odd columns, down_proj.weight = down_proj[X]ᵀ [H, I] (GptOssModel's
split, the converter's ffn_{gate,up,down}_exps slice X).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.load.checkpoint import TensorTable
from qconvert.load.dtypes import DTYPES, FLOAT_NAMES
from qconvert.load.safetensors import TensorInfo

if TYPE_CHECKING:
    import torch

_PROJS = ("gate_up_proj", "down_proj")


def per_expert_source(ckpt: Any, *, interleaved: bool = False) -> Any:
    """`ckpt` with its fused routed experts read as per-expert Linears (a PerExpertView, checked now), or
    `ckpt` itself when it has none (a dense or unknown family, experts already per expert). ``interleaved``
    also splits gpt-oss's x@W experts and their biases."""
    from qconvert.arch.hparams import n_expert
    from qconvert.arch.table import resolve
    from qconvert.load.config import text_config

    if not ckpt.config:
        return ckpt
    try:
        spec = resolve(ckpt.config, ckpt.path)
    except BadInput:  # a family outside the table: data-free quantize still works on it
        return ckpt
    ex = spec.experts
    if ex is None or not (ex.interleaved and interleaved or ex.fused and not ex.interleaved):
        return ckpt
    pattern = re.compile(r"^(?P<pre>(?:.*\.)?layers\.\d+\." + re.escape(ex.module) + r")\.(?P<proj>"
                         + "|".join(_PROJS) + r")(?P<part>" + ("_bias" if ex.interleaved else r"\.weight")
                         + ")?$")
    found: dict[str, dict[str, str]] = {}  # experts module -> {"gate_up_proj" / "down_proj" [+ "_bias"]: raw}
    for raw in ckpt.tensors:
        if (m := pattern.match(raw)) is not None:
            part = m["part"] if m["part"] == "_bias" else ""
            found.setdefault(m["pre"], {})[m["proj"] + part] = raw
    if not found:
        return ckpt
    cfg = text_config(ckpt.config)
    n = n_expert(cfg)
    if not n:
        raise BadInput(f"{spec.name}: config.json names no expert count (num_experts / num_local_experts)",
                       ckpt.path)
    hidden = cfg.get("hidden_size")
    return PerExpertView(ckpt, found, (ex.gate, ex.up, ex.down), int(n),
                         None if hidden is None else int(hidden), ex.interleaved)


def calibration_source(ckpt: Any) -> Any:
    """What the calibration engine reads: gpt-oss's MXFP4 experts dequantized (formats.packed.mxfp4_experts)
    and every family's fused experts, gpt-oss's included, as per-expert Linears (calib.experts.linearise
    builds a Linear for each)."""
    from qconvert.formats.packed.mxfp4_experts import mxfp4_experts_source

    return per_expert_source(mxfp4_experts_source(ckpt), interleaved=True)


def per_expert_note(src: Any) -> str | None:
    """The one line saying what `src` splits (None when it is no PerExpertView)."""
    return src.note if isinstance(src, PerExpertView) else None


class PerExpertView(TensorTable):
    """The Checkpoint interface over `source`, each fused experts tensor replaced by its per-expert slices."""

    def __init__(self, source: Any, found: dict[str, dict[str, str]], names: tuple[str, str, str], n: int,
                 hidden: int | None, interleaved: bool):
        self.source = source
        self.path, self.name = source.path, source.name
        self.files = getattr(source, "files", [])
        self.metadata = getattr(source, "metadata", {})
        self.tokenizer_files = source.tokenizer_files
        self.config = source.config
        self.quantization_config = getattr(source, "quantization_config", None)
        self.quantization_config_file = getattr(source, "quantization_config_file", None)
        self.interleaved = interleaved
        # per-expert name -> (fused source tensor, how to slice it: torch tensor -> the expert's tensor)
        self.slices: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
        made: dict[str, dict[str, TensorInfo]] = {}  # first fused tensor of a module -> its expert entries
        order = {raw: i for i, raw in enumerate(source.tensors)}
        for pre, parts in found.items():
            entries = self._plan(pre, parts, names, n, hidden)
            first = min(parts.values(), key=order.__getitem__)
            made[first] = dict(sorted(entries.items()))
        consumed = {raw for parts in found.values() for raw in parts.values()}
        self.tensors: dict[str, TensorInfo] = {}
        for raw, info in source.tensors.items():
            if raw in made:
                self.tensors.update(made[raw])
            elif raw not in consumed:
                self.tensors[raw] = info
        self.note = (f"read {len(consumed)} fused expert tensors as {len(self.slices)} per-expert tensors "
                     f"({n} experts x {len(found)} layers)")
        self._cache: tuple[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"PerExpertView({self.name!r}, {len(self.slices)} per-expert tensors)"

    # -- the plan: shapes checked, one TensorInfo per expert tensor ---------------------------------------
    def _plan(self, pre: str, parts: dict[str, str], names: tuple[str, str, str], n: int,
              hidden: int | None) -> dict[str, TensorInfo]:
        src = self.source.tensors
        for proj in _PROJS:
            if proj not in parts:
                raise BadInput(f"{pre}.{proj} is missing (fused experts need both gate_up_proj and "
                               "down_proj)", self.path)
        gu, down = src[parts["gate_up_proj"]], src[parts["down_proj"]]
        for info in (gu, down):
            if info.dtype not in FLOAT_NAMES:
                raise BadInput(f"fused expert tensor {info.name} is {info.dtype}, expected BF16, F16 or F32",
                               self.path)
        h = f", H={hidden}" if hidden is not None else ""
        if self.interleaved:  # x@W: [E, H, 2I] and [E, I, H]
            gu_ok = len(gu.shape) == 3 and gu.shape[0] == n and gu.shape[2] % 2 == 0 and \
                (hidden is None or gu.shape[1] == hidden)
            want_gu, want_down = "[E, H, 2*I]", "[E, I, H]"
        else:  # [E, 2I, H] and [E, H, I]
            gu_ok = len(gu.shape) == 3 and gu.shape[0] == n and gu.shape[1] % 2 == 0 and \
                (hidden is None or gu.shape[2] == hidden)
            want_gu, want_down = "[E, 2*I, H]", "[E, H, I]"
        if not gu_ok:
            raise BadInput(f"fused expert tensor {gu.name} has shape {list(gu.shape)}, expected {want_gu} "
                           f"with E={n}{h}", self.path)
        if self.interleaved:
            hid, inter = gu.shape[1], gu.shape[2] // 2
            down_want = (n, inter, hid)
        else:
            hid, inter = gu.shape[2], gu.shape[1] // 2
            down_want = (n, hid, inter)
        if tuple(down.shape) != down_want:
            raise BadInput(f"fused expert tensor {down.name} has shape {list(down.shape)}, expected "
                           f"{want_down} with E={n}, H={hid}, I={inter} (from {gu.name} {list(gu.shape)})",
                           self.path)
        gate, up, dn = names
        out: dict[str, TensorInfo] = {}

        def add(name: str, info: TensorInfo, shape: tuple[int, ...], cut: Callable) -> None:
            nbytes = int(np.prod(shape)) * DTYPES[info.dtype].bits // 8
            # offset -1: no bytes of its own in any file (read() slices them out of the fused tensor)
            out[name] = replace(info, name=name, shape=shape, nbytes=nbytes, offset=-1)
            self.slices[name] = (info.name, cut)

        for x in range(n):
            e = f"{pre}.{x}"
            if self.interleaved:
                add(f"{e}.{gate}.weight", gu, (inter, hid), lambda t, x=x: t[x][:, 0::2].T)
                add(f"{e}.{up}.weight", gu, (inter, hid), lambda t, x=x: t[x][:, 1::2].T)
                add(f"{e}.{dn}.weight", down, (hid, inter), lambda t, x=x: t[x].T)
            else:
                add(f"{e}.{gate}.weight", gu, (inter, hid), lambda t, x=x: t[x, :inter])
                add(f"{e}.{up}.weight", gu, (inter, hid), lambda t, x=x, i=inter: t[x, i:2 * i])
                add(f"{e}.{dn}.weight", down, (hid, inter), lambda t, x=x: t[x])
        if self.interleaved:
            for proj, width in (("gate_up_proj", 2 * inter), ("down_proj", hid)):
                raw = parts.get(f"{proj}_bias")
                if raw is None:
                    continue
                b = src[raw]
                if tuple(b.shape) != (n, width) or b.dtype not in FLOAT_NAMES:
                    raise BadInput(f"expert bias {raw} is {b.dtype} {list(b.shape)}, expected [{n}, {width}]",
                                   self.path)
                for x in range(n):
                    e = f"{pre}.{x}"
                    if proj == "down_proj":
                        add(f"{e}.{dn}.bias", b, (hid,), lambda t, x=x: t[x])
                    else:
                        add(f"{e}.{gate}.bias", b, (inter,), lambda t, x=x: t[x][0::2])
                        add(f"{e}.{up}.bias", b, (inter,), lambda t, x=x: t[x][1::2])
        return out

    # -- reads -----------------------------------------------------------------------------------------------
    def _fused(self, raw: str) -> torch.Tensor:
        # a Checkpoint's read is a view of the mapped bytes (free); a view that computes its tensor (MXFP4
        # blocks) is asked once for all the experts of the tensor
        if self._cache is None or self._cache[0] != raw:
            self._cache = None
            self._cache = (raw, self.source.read(raw))
        return self._cache[1]

    def read(self, name: str) -> torch.Tensor:
        """torch.Tensor in the stored dtype: the expert's slice of its fused tensor (contiguous)."""
        if name not in self.slices:
            return self.source.read(name)
        raw, cut = self.slices[name]
        return cut(self._fused(raw)).contiguous()

    def read_raw(self, name: str) -> np.ndarray:
        import torch

        if name not in self.slices:
            return self.source.read_raw(name)
        t = self.read(name)
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

    def read_numpy(self, name: str) -> np.ndarray:
        """float32 (exact for bf16 / f16 sources)."""
        import torch

        if name not in self.slices:
            return self.source.read_numpy(name)
        return self.read(name).to(torch.float32).numpy()

    def close(self) -> None:
        self._cache = None
        self.source.close()

    def __enter__(self) -> PerExpertView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
