"""The model skeleton the calibration engine runs: transformers modules with their parameters on the meta
device, materialised one decoder layer at a time from checkpoint tensors (load stage, lazy reads).

Buffers (rotary inv_freq, embedding scales) are computed normally while parameters are created on meta, so
the skeleton costs no memory and its non-parameter state is exactly what transformers would compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qconvert.arch.table import resolve
from qconvert.calib.experts import LinearExperts, linearise
from qconvert.errors import BadInput
from qconvert.load.config import attn_implementation
from qconvert.load.quiet import one_line, quiet_transformers


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real); init then costs nothing."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass
class Skeleton:
    model: nn.Module  # the *ForCausalLM, parameters on meta
    decoder: nn.Module  # the base model holding embed_tokens / layers / norm
    layers: nn.ModuleList
    layers_prefix: str  # e.g. "model.layers"
    lm_head: nn.Module | None
    experts: list[LinearExperts] = field(default_factory=list)  # the MoE layers' experts, layer order


def build_skeleton(ckpt, dtype: torch.dtype) -> Skeleton:
    """The checkpoint's transformers model with parameters on meta (nothing read yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = resolve(ckpt.config, ckpt.path)  # BadInput naming the supported families for anything else
    try:
        with quiet_transformers():
            cfg = AutoConfig.from_pretrained(str(ckpt.path))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise BadInput(f"cannot read config.json: {one_line(e)}", ckpt.path) from e
    cfg.use_cache = False
    for c in (cfg, getattr(cfg, "text_config", None)):  # a quantized source runs dequantized: plain Linears
        if c is not None and hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    with params_on_meta(), quiet_transformers():
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=attn_implementation(ckpt.config)
        )
    model.eval()
    # transformers keeps routed experts as 3-D parameters, not Linears: one Linear per expert instead
    experts = linearise(model, spec) if spec.experts is not None else []
    decoder = model.get_decoder()
    layers = decoder.layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    lm_head = model.get_output_embeddings()
    return Skeleton(model, decoder, layers, prefix, lm_head, experts)


def materialise(
    module: nn.Module,
    prefix: str,
    ckpt,
    device: torch.device,
    dtype: torch.dtype,
    fallbacks: dict[str, str] | None = None,
    recurse: bool = True,
) -> None:
    """Give `module`'s meta parameters real values from checkpoint tensors named `prefix.<param>`."""
    for pname, param in list(module.named_parameters(recurse=recurse)):
        full = f"{prefix}.{pname}" if prefix else pname
        src = full if full in ckpt.tensors else (fallbacks or {}).get(full)
        if src is None or src not in ckpt.tensors:
            raise BadInput(f"tensor {full} is missing from the checkpoint", ckpt.path)
        t = ckpt.read(src)
        if tuple(t.shape) != tuple(param.shape):
            raise BadInput(
                f"tensor {src} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}", ckpt.path
            )
        value = t.to(device=device, dtype=dtype, copy=True)  # copy: a callback may edit weights in place
        _set_param(module, pname, value)


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to meta) so the next layer can take their memory."""
    for pname, param in list(module.named_parameters(recurse=True)):
        _set_param(module, pname, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def _set_param(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def linear_modules(module: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Full HF names (without .weight) of the matmuls inside `module`: its nn.Linear modules and the MoE
    routers (a module of its own holding a 2-D ``weight`` [E, H], applied as a Linear; llama-imatrix collects
    their input too)."""
    return {
        f"{prefix}.{n}" if n else prefix: m for n, m in module.named_modules()
        if isinstance(m, nn.Linear) or _is_router(m)
    }


def in_features(mod: nn.Module) -> int:
    """The input width of a Linear or router."""
    return int(mod.weight.shape[-1])


def _is_router(mod: nn.Module) -> bool:
    w = mod._parameters.get("weight")
    return w is not None and w.ndim == 2 and not isinstance(mod, nn.Embedding) and hasattr(mod, "top_k")
