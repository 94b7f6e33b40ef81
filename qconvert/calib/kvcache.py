"""FP8 KV-cache scales (``quantize --kv-cache fp8``): per-tensor ``k_scale`` / ``v_scale`` of every attention
layer from the keys after RoPE and the values as projected, as compressed-tensors observes them
(packed-formats-2026.md §5): its QuantizedKVCache stands in for the HF cache, so it sees what the attention
hands ``cache.update``. Here a recorder takes that place on the calibration engine's layers.

llm-compressor's default KV observer (``minmax``) keeps a moving average of each sample's min and max,
``m ← m + 0.01 · (m_sample − m)`` (the first sample sets it), and the scale is ``max(|min|, |max|) / 448``
stored in the model dtype ([1] per layer: strategy ``tensor``). vLLM loads ``…self_attn.k_scale`` /
``v_scale`` (remapped to ``…self_attn.attn.k_scale``) when ``kv_cache_scheme`` is in the config.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable

import torch
from torch import nn

from qconvert.errors import BadInput

E4M3_MAX = 448.0
AVERAGING = 0.01  # llm-compressor MinMaxObserver averaging_constant
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # what attentions call the cache, by version
# compressed-tensors 0.19's QuantizationArgs as llm-compressor writes kv_cache_scheme (§5.1)
KV_CACHE_SCHEME = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                   "num_bits": 8, "observer": None, "observer_kwargs": {}, "scale_dtype": None,
                   "strategy": "tensor", "symmetric": True, "type": "float", "zp_dtype": None}
_KV_WEIGHTS = re.compile(
    r"layers\.\d+\..*\.(k_proj|v_proj|qkv_proj|query_key_value|kv_a_proj_with_mqa)\.weight$")


class _Stop(Exception):
    """Raised by the recorder: nothing after the cache update is needed."""


class _Running:
    """The moving average of per-sample min and max."""

    def __init__(self) -> None:
        self.lo: float | None = None
        self.hi: float | None = None

    def add(self, x: torch.Tensor) -> None:
        lo, hi = float(x.amin()), float(x.amax())
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
            return
        self.lo += AVERAGING * (lo - self.lo)
        self.hi += AVERAGING * (hi - self.hi)

    def amax(self) -> float:
        assert self.lo is not None and self.hi is not None
        return max(abs(self.lo), abs(self.hi))


class _Recorder:
    """Stands in for the HF cache in one attention call: records the keys and values, then stops."""

    def __init__(self, keys: _Running, values: _Running):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.add(key_states)
        self.values.add(value_states)
        raise _Stop


def check_model(tensors: Iterable[str], where: object = None) -> None:
    """A model without attention projections has no KV cache to scale (refused before any work)."""
    if not any(_KV_WEIGHTS.search(n) for n in tensors):
        raise BadInput("--kv-cache fp8: the model has no attention layers (no k_proj / v_proj / qkv_proj in "
                       "its decoder layers): there is no KV cache to scale", where)


def cached_attention(layer: nn.Module, layer_name: str) -> tuple[str, nn.Module, str]:
    """The layer's attention module (a module named …Attention whose forward takes the cache) and the
    keyword it takes the cache by."""
    for name, mod in layer.named_modules():
        if "attention" not in type(mod).__name__.lower():
            continue
        params = inspect.signature(mod.forward).parameters
        kw = next((k for k in CACHE_KWARGS if k in params), None)
        if kw is not None:
            return name, mod, kw
    raise BadInput(f"--kv-cache fp8: {layer_name} has no attention module that takes a KV cache")


def layer_kv_scales(step, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``k_scale`` / ``v_scale`` of one decoder layer (a calib.runner LayerStep), running each sample up to
    its attention's cache update."""
    name, attn, kw = cached_attention(step.module, step.name)
    keys, values = _Running(), _Running()

    def inject(_m, args, kwargs):
        return args, {**kwargs, kw: _Recorder(keys, values)}

    args, kwargs = step.call_args()
    handle = attn.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        for x in step.inputs:
            try:
                step.module(x, *args, **kwargs)
            except _Stop:
                continue
            raise BadInput(f"--kv-cache fp8: {step.name}.{name} never updated its KV cache")
    finally:
        handle.remove()
    prefix = f"{step.name}.{name}" if name else step.name
    return {f"{prefix}.k_scale": _scale(keys.amax(), dtype),
            f"{prefix}.v_scale": _scale(values.amax(), dtype)}


def _scale(amax: float, dtype: torch.dtype) -> torch.Tensor:
    if amax != amax or amax in (float("inf"), float("-inf")):
        raise BadInput(f"--kv-cache fp8: the calibration keys or values contain NaN or Inf (max {amax})")
    s = torch.tensor([amax / E4M3_MAX], dtype=torch.float32).to(dtype)
    return torch.where(s == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), s)


def kv_scales(ckpt, tokens: torch.Tensor, dtype: torch.dtype, device: str = "auto",
              calib_dtype: str = "bf16") -> dict[str, torch.Tensor]:
    """Every attention layer's scales, from one pass of the calibration engine over the original model."""
    from qconvert.calib.runner import LayerwiseRunner

    out: dict[str, torch.Tensor] = {}

    def on_layer(step) -> bool:
        out.update(layer_kv_scales(step, dtype))
        return False  # the statistics pass's outputs feed the next layer

    LayerwiseRunner(ckpt, device=device, dtype=calib_dtype).run(tokens, kinds=("abs_max",), on_layer=on_layer)
    return out
