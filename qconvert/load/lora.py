"""PEFT LoRA adapters in: `--lora ADAPTER_DIR` merges an adapter into its base checkpoint on read.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r] under ``base_model.model.``).
`LoraView` is the Checkpoint interface over the base with each targeted Linear merged when it is read, as
PEFT's ``merge_and_unload`` does: ``W + (B @ A) * alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), the product
in float32 and the sum rounded once to the weight's dtype. Everything is checked when the view is made (one
BadInput line, before any work): the adapter kind and options, every target present in the base as a 2-D
Linear of matching shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.load.checkpoint import TensorTable
from qconvert.load.safetensors import TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# options that change what a merge is; the adapter is refused when one of them is set
_UNSUPPORTED = {"target_parameters": "target_parameters (nn.Parameter targets, e.g. fused experts)",
                "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
                "lora_bias": "lora_bias", "modules_to_save": "modules_to_save (full weights in the adapter)",
                "alpha_pattern": "alpha_pattern",
                "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
                "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA"}


@dataclass(frozen=True)
class LoraPair:
    """One targeted Linear: its base weight and its two adapter tensors."""

    weight: str        # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a: str             # adapter tensor names
    b: str
    rank: int
    scaling: float


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    pairs: dict[str, LoraPair]     # base weight name -> pair
    tensors: Any                   # the adapter's own Checkpoint (lazy)

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])


def _config(path: Path) -> dict[str, Any]:
    cfg_path = path / ADAPTER_CONFIG
    if not path.is_dir() or not cfg_path.is_file():
        raise BadInput(f"not a PEFT adapter directory (no {ADAPTER_CONFIG})", path)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {ADAPTER_CONFIG}: {e}", cfg_path) from None
    if cfg.get("peft_type") != "LORA":
        raise BadInput(f"peft_type {cfg.get('peft_type')!r}: only LORA adapters can be merged", cfg_path)
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise BadInput(f"{key} is set: {what} cannot be merged by qconvert", cfg_path)
    if not isinstance(cfg.get("lora_alpha"), int | float):
        raise BadInput("lora_alpha is missing or not a number", cfg_path)
    return cfg


def _split(name: str) -> tuple[str, str]:
    """adapter tensor name -> (base module, 'A'/'B'); BadInput for what is not a LoRA Linear pair."""
    inner = name.removeprefix(_PREFIX)
    for kind in ("A", "B"):
        suffix = f".lora_{kind}.weight"
        if inner.endswith(suffix):
            return inner.removesuffix(suffix), kind
    if ".lora_embedding_" in inner:
        raise BadInput(f"adapter tensor {name}: embedding (lora_embedding) targets are not supported")
    raise BadInput(f"adapter tensor {name} is not a lora_A / lora_B weight (unsupported target module)")


def open_lora(path: str | Path) -> LoraAdapter:
    """Read and check an adapter directory (config, tensor names and pairing; shapes: `lora_source`)."""
    from qconvert.load import open_checkpoint

    path = Path(path)
    cfg = _config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise BadInput(f"no {ADAPTER_WEIGHTS} (only safetensors adapters are read)", path)
    tensors = open_checkpoint(path / ADAPTER_WEIGHTS)
    found: dict[str, dict[str, str]] = {}
    for name in tensors:
        module, kind = _split(name)
        found.setdefault(module, {})[kind] = name
    pairs: dict[str, LoraPair] = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise BadInput(f"adapter module {module} has lora_{''.join(ab)} without its other half", path)
        shape_a = tuple(tensors.info(ab["A"]).shape)
        rank = int(shape_a[0]) if len(shape_a) == 2 else 0
        if rank <= 0:
            raise BadInput(f"{ab['A']} has shape {list(shape_a)}, expected [r, in_features]", path)
        scale = cfg["lora_alpha"] / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        pairs[f"{module}.weight"] = LoraPair(f"{module}.weight", ab["A"], ab["B"], rank, scale)
    if not pairs:
        raise BadInput("the adapter holds no lora_A / lora_B tensors", path)
    return LoraAdapter(path, cfg, pairs, tensors)


def check_adapter(base: Any, adapter: LoraAdapter) -> None:
    """Every target a 2-D float Linear of the base, A [r, in] and B [out, r] fitting it."""
    for weight, pair in adapter.pairs.items():
        if weight not in base.tensors:
            raise BadInput(f"the adapter targets {weight.removesuffix('.weight')}, which the base model "
                           "does not have (an adapter for another model?)", adapter.path)
        shape = tuple(base.tensors[weight].shape)
        a, b = (tuple(adapter.tensors.info(n).shape) for n in (pair.a, pair.b))
        if len(shape) != 2:
            raise BadInput(f"the adapter targets {weight} of shape {list(shape)}: only 2-D Linear weights "
                           "are supported", adapter.path)
        if a[1] != shape[1] or b != (shape[0], pair.rank):
            raise BadInput(f"{weight} is {list(shape)} in the base but the adapter's A is {list(a)} and B "
                           f"{list(b)} (expected [r, {shape[1]}] and [{shape[0]}, r]): "
                           "an adapter for another base model", adapter.path)
        if base.tensors[weight].dtype not in ("BF16", "F16", "F32"):
            raise BadInput(f"{weight} is {base.tensors[weight].dtype}: LoRA merges into float weights only",
                           adapter.path)


class LoraView(TensorTable):
    """The Checkpoint interface over `base` with the adapter's Linears merged on read."""

    def __init__(self, base: Any, adapter: LoraAdapter):
        check_adapter(base, adapter)
        self.source = base
        self.adapter = adapter
        self.path = base.path
        self.name = base.name
        self.files = getattr(base, "files", [])
        self.metadata = getattr(base, "metadata", {})
        self.tokenizer_files = base.tokenizer_files
        self.config = base.config
        self.quantization_config = getattr(base, "quantization_config", None)
        self.quantization_config_file = getattr(base, "quantization_config_file", None)
        self.note = getattr(base, "note", None)
        # merged tensors have no bytes of their own in a file (offset -1, as DenseView's)
        self.tensors: dict[str, TensorInfo] = {
            n: (replace(i, offset=-1) if n in adapter.pairs else i) for n, i in base.tensors.items()}
        merged = f"merged LoRA {adapter.path.name} ({len(adapter.pairs)} Linears, r={_ranks(adapter)}, " \
                 f"alpha={adapter.config['lora_alpha']})"
        self.lora_note = merged

    def __repr__(self) -> str:
        return f"LoraView({self.name!r}, {len(self.adapter.pairs)} Linears merged from {self.adapter.path})"

    def _merged(self, name: str) -> np.ndarray:
        """float32 [out, in]: PEFT's merge (float32 B @ A times the scaling, added in float32), rounded once
        to the weight's dtype (torch's matmul, as PEFT's: the same sums to the last bit)."""
        import torch

        from qconvert.load.dtypes import round_float32

        pair = self.adapter.pairs[name]
        a = torch.from_numpy(np.asarray(self.adapter.tensors.read_numpy(pair.a), dtype=np.float32))
        b = torch.from_numpy(np.asarray(self.adapter.tensors.read_numpy(pair.b), dtype=np.float32))
        # float32 whatever the adapter's dtype: PEFT loads adapters upcast (autocast_adapter_dtype)
        delta = (b @ a) * pair.scaling
        w = np.asarray(self.source.read_numpy(name), dtype=np.float32) + delta.numpy()
        return round_float32(np.ascontiguousarray(w, dtype=np.float32), self.tensors[name].dtype)

    def read(self, name: str) -> Any:
        import torch

        from qconvert.load.dtypes import TORCH_FLOATS

        if name not in self.adapter.pairs:
            return self.source.read(name)
        return torch.from_numpy(self._merged(name)).to(TORCH_FLOATS[self.tensors[name].dtype])

    def read_raw(self, name: str) -> np.ndarray:
        import torch

        if name not in self.adapter.pairs:
            return self.source.read_raw(name)
        t = self.read(name)
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

    def read_numpy(self, name: str) -> np.ndarray:
        if name not in self.adapter.pairs:
            return self.source.read_numpy(name)
        return self._merged(name)

    def close(self) -> None:
        self.adapter.tensors.close()
        self.source.close()

    def __enter__(self) -> LoraView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ranks(adapter: LoraAdapter) -> str:
    ranks = sorted({p.rank for p in adapter.pairs.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def lora_source(base: Any, adapter_dir: str | Path | None) -> Any:
    """`base` with the adapter merged on read (checked now), or `base` itself without an adapter."""
    if adapter_dir is None:
        return base
    return LoraView(base, open_lora(adapter_dir))


def lora_note(src: Any) -> str | None:
    return src.lora_note if isinstance(src, LoraView) else None
