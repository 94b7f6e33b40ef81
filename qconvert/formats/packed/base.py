"""The one interface every packed safetensors format implements, and the records it reads and writes.

A format is one class in one module (gptq.py, awq.py, ...), registered once in ``formats/packed/__init__``.
It answers, for its own layout, every question a stage asks:

    write  (quantize)  check_spec / check_layer / adapt  before any work, then pack per Linear, then
                       quantization_config + extra_files for config.json and its side files
    read   (inspect, eval --loader unpack, quantized sources)
                       claims + detect: which tensors of a module prefix are this layout, and their bits,
                       group and size; unpack: the dense float32 weight every reader reconstructs

N = out_features, K = in_features of a Linear ``W [N, K]`` throughout (checkpoint-formats.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qconvert.arch.tensors import LM_HEAD
from qconvert.methods.types import (
    FP4Spec,
    FP4Tensor,
    FP8Spec,
    FP8Tensor,
    PackOptions,
    QuantizedTensor,
    QuantSpec,
)

if TYPE_CHECKING:  # torch only where tensors are made: inspect reads layouts without it
    import torch

Spec = QuantSpec | FP8Spec | FP4Spec
Quantized = QuantizedTensor | FP8Tensor | FP4Tensor


class TensorInfo(Protocol):
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class Source(Protocol):
    """What unpack reads: a checkpoint's config, tensor table and readers (load.checkpoint.Checkpoint)."""

    path: Any
    config: dict
    quantization_config: dict | None
    tensors: Mapping[str, TensorInfo]

    def read(self, name: str) -> torch.Tensor: ...
    def read_numpy(self, name: str) -> Any: ...


@dataclass(frozen=True)
class PackPlan:
    """Everything quantization_config needs: the default spec, per-module overrides, modules kept dense."""

    options: PackOptions
    default: Spec
    overrides: dict[str, Spec]
    skipped: tuple[str, ...]


@dataclass
class QuantizedLayer:
    """One quantized Linear as found in a checkpoint (what inspect shows)."""

    name: str  # module prefix, e.g. model.layers.0.mlp.down_proj
    method: str  # gptq | awq | compressed-tensors | fp8 | int8
    bits: int | None
    group_size: int | None  # -1 = one group per output channel; None = not grouped / unknown
    parameters: int  # logical weights K*N (not packed element counts)
    nbytes: int  # all of the layer's quantization tensors
    tensors: list[str] = field(default_factory=list)
    shape: tuple[int, int] | None = None  # logical [N, K]
    granularity: str | None = None  # tensor | channel | group | block

    @property
    def bits_per_weight(self) -> float | None:
        return self.nbytes * 8 / self.parameters if self.parameters else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
            "parameters": self.parameters, "nbytes": self.nbytes,
            "bits_per_weight": None if self.bits_per_weight is None else round(self.bits_per_weight, 4),
            "shape": None if self.shape is None else list(self.shape), "granularity": self.granularity,
            "tensors": self.tensors,
        }


ReadSmall = Callable[[str], Any]  # reads a tiny tensor (compressed-tensors weight_shape); may be None


class Layout(Protocol):
    """The read side: recognise and unpack this layout's tensors. Optional (dense.DenseView asks with
    getattr): ``check(prefix, tensors, qc)`` raises ValueError for tensors that disagree (before any work),
    ``unpack_as(src, prefix, qc, dtype)`` gives the float32 array already rounded to BF16/F16/F32."""

    method: str  # what inspect reports for its layers
    suffixes: tuple[str, ...]  # every tensor suffix that belongs to a packed Linear of this layout

    def claims(self, prefix: str, suffix: str, tensors: Mapping[str, TensorInfo], method: str) -> bool: ...
    def detect(self, prefix: str, tensors: Mapping[str, TensorInfo], hints: dict[str, Any],
               read_small: ReadSmall | None) -> QuantizedLayer | None: ...
    def unpack(self, src: Source, prefix: str, qc: dict) -> torch.Tensor: ...


class PackedFormat(Layout, Protocol):
    """The write side as well: a ``--format`` choice."""

    name: str  # the --format value
    kind: str  # "int" (QuantizedTensor), "fp8" (FP8Tensor), or a --scheme's kind (methods.types.SCHEMES:
    #            nvfp4 / mxfp4 hold FP4Tensor, w8a8 QuantizedTensor): which results it holds

    def check_spec(self, spec: Spec, options: PackOptions) -> None: ...
    def check_layer(self, name: str, n: int, k: int, spec: Spec) -> None: ...
    def adapt(self, spec: Spec, model_dtype: str) -> Spec: ...
    def pack(self, prefix: str, qt: Quantized, input_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]: ...
    def quantization_config(self, plan: PackPlan) -> dict: ...
    def extra_files(self, quantization_config: dict) -> dict[str, dict]: ...


# -- helpers the layouts share -------------------------------------------------------------------------------

def group_size(k: int, groups: int, hint: Any) -> tuple[int | None, str]:
    """Group size from K and the number of groups; the config's value wins when it is consistent."""
    if isinstance(hint, int) and hint > 0 and -(-k // hint) == groups:
        return hint, "group" if groups > 1 else "channel"
    if groups == 1:
        return -1, "channel"
    return (k // groups if k and k % groups == 0 else None), "group"


def members(prefix: str, suffixes: tuple[str, ...], tensors: Mapping[str, TensorInfo]) -> list[str]:
    return [f"{prefix}.{s}" for s in suffixes if f"{prefix}.{s}" in tensors]


def layer(prefix: str, method: str, bits: int | None, group: int | None, n: int, k: int,
          names: list[str], tensors: Mapping[str, TensorInfo], granularity: str | None) -> QuantizedLayer:
    nbytes = sum(tensors[m].nbytes for m in names)
    return QuantizedLayer(prefix, method, bits, group, n * k, nbytes, names, (n, k), granularity)


def ignore_list(skipped: tuple[str, ...], lm_head: bool) -> list[str]:
    """Modules the engines must load dense: the skipped ones, and lm_head unless it was quantized."""
    return sorted(set(skipped) | (set() if lm_head else {LM_HEAD}))
