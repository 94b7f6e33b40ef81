"""The one dtype table: every safetensors dtype with its bit width and its numpy and torch equivalents, and
the torch-style names ("bfloat16", ...) that options, configs and the stored scales use.

    DTYPES["BF16"]          -> DType(name, bits, torch_name, numpy, is_float)
    FLOAT_NAMES             {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}: the float dtypes a model
                            or a scale is kept in, safetensors name -> torch name
    TORCH_BY_NAME           {"bfloat16": torch.bfloat16, ...}: FLOAT_NAMES' torch names -> torch dtypes
    TORCH_FLOATS            {"BF16": torch.bfloat16, ...}: FLOAT_NAMES' safetensors names -> torch dtypes
    torch_dtype(name)       any safetensors name -> its torch dtype (None where this torch has none)
    numpy_values(name)      the numpy dtype that holds a safetensors dtype's values (None for BF16, F8, F4...)
    name_of_numpy(dtype)    the inverse, numpy dtype -> safetensors name
    round_float32(x, name)  float32 values rounded in place as a cast to BF16 / F16 / F32 rounds them

torch is imported only when a torch dtype is asked for (TORCH_BY_NAME / TORCH_FLOATS are built on first
access), so the load stage and `inspect` stay free of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str
    bits: int  # per element; sub-byte types (F4, F6_*) pack several elements per byte
    torch_name: str | None  # attribute of the torch module; None -> read as raw uint8 bytes
    numpy: str | None  # numpy dtype holding the raw bits (BF16 -> uint16, F8 -> uint8); None -> flat bytes
    is_float: bool


_TABLE = [
    DType("BOOL", 8, "bool", "bool", False),
    DType("U8", 8, "uint8", "uint8", False),
    DType("I8", 8, "int8", "int8", False),
    DType("F8_E5M2", 8, "float8_e5m2", "uint8", True),
    DType("F8_E4M3", 8, "float8_e4m3fn", "uint8", True),
    DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", "uint8", True),
    DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", "uint8", True),
    DType("F8_E8M0", 8, "float8_e8m0fnu", "uint8", True),
    DType("I16", 16, "int16", "<i2", False),
    DType("U16", 16, "uint16", "<u2", False),
    DType("F16", 16, "float16", "<f2", True),
    DType("BF16", 16, "bfloat16", "<u2", True),
    DType("I32", 32, "int32", "<i4", False),
    DType("U32", 32, "uint32", "<u4", False),
    DType("F32", 32, "float32", "<f4", True),
    DType("I64", 64, "int64", "<i8", False),
    DType("U64", 64, "uint64", "<u8", False),
    DType("F64", 64, "float64", "<f8", True),
    DType("C64", 64, "complex64", "<c8", False),
    DType("F4", 4, None, None, True),
    DType("F6_E2M3", 6, None, None, True),
    DType("F6_E3M2", 6, None, None, True),
]
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}

FLOAT_NAMES: dict[str, str] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _holds_values(d: DType) -> bool:
    # BF16 and the F8 types are kept as raw bits in an integer dtype: numpy has no dtype for their values
    return d.numpy is not None and (not d.is_float or np.dtype(d.numpy).kind == "f")


_NUMPY_VALUES = {d.name: np.dtype(d.numpy) for d in _TABLE if _holds_values(d)}
_NAME_OF_NUMPY = {dt: name for name, dt in _NUMPY_VALUES.items()}


def numpy_values(name: str) -> np.dtype | None:
    """The numpy dtype whose values are those of safetensors dtype `name`; None if numpy has none."""
    return _NUMPY_VALUES.get(name)


def name_of_numpy(dtype: np.dtype | type) -> str:
    """The safetensors name of a numpy dtype (KeyError for one safetensors cannot hold)."""
    return _NAME_OF_NUMPY[np.dtype(dtype)]


def round_float32(x: np.ndarray, name: str) -> np.ndarray:
    """`x` (float32, C-contiguous) rounded in place to the values of float dtype `name`, still float32: what
    ``tensor.to(bfloat16 / float16)`` keeps, round to nearest even (overflow to inf, NaN stays NaN)."""
    if name == "BF16":
        u = x.view(np.uint32)
        nan = np.isnan(x)
        u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        u &= np.uint32(0xFFFF0000)
        x[nan] = np.nan  # a NaN payload near the top must not carry into the exponent
    elif name == "F16":
        with np.errstate(over="ignore"):
            x[...] = x.astype(np.float16)  # numpy's cast is IEEE round to nearest even
    elif name != "F32":
        raise ValueError(f"cannot round to {name}")
    return x


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of safetensors dtype `name`; None for sub-byte types and dtypes this torch lacks."""
    import torch  # lazy: see the module docstring

    d = DTYPES[name]
    return getattr(torch, d.torch_name, None) if d.torch_name else None


@functools.cache
def _torch_tables() -> dict[str, dict[str, Any]]:
    import torch

    by_name = {t: getattr(torch, t) for t in FLOAT_NAMES.values()}
    return {"TORCH_BY_NAME": by_name, "TORCH_FLOATS": {st: by_name[t] for st, t in FLOAT_NAMES.items()}}


def __getattr__(name: str) -> Any:
    # PEP 562: `from qconvert.load.dtypes import TORCH_BY_NAME` imports torch then, not at module import
    if name in ("TORCH_BY_NAME", "TORCH_FLOATS"):
        return _torch_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
