"""llama.cpp as a test oracle, through ctypes, from the libraries bundled in the llama-cpp-python 0.3.36
wheel.

    ggml_quantize_chunk(qtype, x, imatrix=None) -> uint8 [nrows, row_bytes]   (libggml-base.so)
    ggml_dequantize(qtype, q) -> float32 [nrows, n_per_row]                      (type traits' to_float)
    model_quantize(src_gguf, dst_gguf, ftype, imatrix=None, nthread=2, **params) (libllama.so)
    lib_dir() -> Path of llama_cpp/lib

The wheel is built from the sdist whose vendor/llama.cpp is the source base of shared/reference/gguf.md.
Install it with ``pip install --no-deps ~/.cache/qconvert/wheels/llama_cpp_python-0.3.36-*.whl``.
Missing wheel -> RuntimeError (tests that need the oracle fail, they never skip).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

WHEEL_VERSION = "0.3.36"
_INSTALL_HINT = (
    f"llama-cpp-python {WHEEL_VERSION} is not installed in this environment "
    "(pip install --no-deps ~/.cache/qconvert/wheels/llama_cpp_python-*.whl)"
)


def lib_dir() -> Path:
    """Directory with libggml-base.so / libllama.so of the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_INSTALL_HINT)
    d = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not (d / "libggml-base.so").exists():
        raise RuntimeError(f"{d}: libggml-base.so not found ({_INSTALL_HINT})")
    return d


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL = none)
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


def _row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        # ggml only assert()s this in debug builds; a release build would read/write out of bounds
        raise ValueError(f"{qtype.name}: n_per_row {n_per_row} is not a multiple of {block}")
    return n_per_row // block * type_size


def ggml_quantize_chunk(
    qtype: GGMLQuantizationType | int, x: np.ndarray, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """The bytes llama.cpp's ``ggml_quantize_chunk`` writes for float32 rows ``x`` [nrows, n_per_row]."""
    qtype = GGMLQuantizationType(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    nrows, n_per_row = x.shape
    lib = _ggml()
    row_bytes = _row_bytes(qtype, n_per_row)
    if lib.ggml_row_size(int(qtype), n_per_row) != row_bytes:
        raise RuntimeError(f"{qtype.name}: gguf-py and ggml disagree on the row size")
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if im.shape[0] != n_per_row:
            raise ValueError(f"imatrix has {im.shape[0]} values, expected {n_per_row}")
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} requires an imatrix (ggml would abort)")
    dst = np.zeros((nrows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype),
        x.ctypes.data,
        dst.ctypes.data,
        0,
        nrows,
        n_per_row,
        None if im is None else im.ctypes.data,
    )
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def ggml_dequantize(qtype: GGMLQuantizationType | int, q: np.ndarray) -> np.ndarray:
    """ggml's own ``to_float`` for rows of type ``qtype``: uint8 [nrows, row_bytes] -> float32."""
    qtype = GGMLQuantizationType(qtype)
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if q.shape[-1] % type_size:
        raise ValueError(f"{qtype.name}: row of {q.shape[-1]} bytes is not a multiple of {type_size}")
    n = q.shape[-1] // type_size * block
    if qtype == GGMLQuantizationType.F32:
        return q.view(np.float32).copy()
    traits = _ggml().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no to_float for {qtype.name}")
    y = np.empty((q.shape[0], n), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(q.ctypes.data, y.ctypes.data, q.shape[0] * n)
    return y


# ------------------------------------------------------------------------------------------- libllama


# Structs of the vendored llama.h (the same layout llama_cpp/llama_cpp.py declares). Declared here rather than
# imported so that the oracle needs only the wheel's shared libraries, not the package's Python deps.
(
    LLAMA_KV_OVERRIDE_TYPE_INT,
    LLAMA_KV_OVERRIDE_TYPE_FLOAT,
    LLAMA_KV_OVERRIDE_TYPE_BOOL,
    LLAMA_KV_OVERRIDE_TYPE_STR,
) = range(4)
GGML_TYPE_COUNT = 43


class ImatrixData(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.POINTER(ctypes.c_float)),
        ("size", ctypes.c_size_t),
    ]


class _KvValue(ctypes.Union):
    _fields_ = [
        ("val_i64", ctypes.c_int64),
        ("val_f64", ctypes.c_double),
        ("val_bool", ctypes.c_bool),
        ("val_str", ctypes.c_char * 128),
    ]


class KvOverride(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_int), ("key", ctypes.c_char * 128), ("value", _KvValue)]


class TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


class QuantizeParams(ctypes.Structure):
    """struct llama_model_quantize_params."""

    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int),  # enum llama_ftype
        ("output_tensor_type", ctypes.c_int),  # enum ggml_type
        ("token_embedding_type", ctypes.c_int),
        ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool),
        ("only_copy", ctypes.c_bool),
        ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.POINTER(ImatrixData)),  # NULL-terminated (name == NULL)
        ("kv_overrides", ctypes.POINTER(KvOverride)),  # terminated by key[0] == 0
        ("tt_overrides", ctypes.POINTER(TensorOverride)),  # terminated by pattern == NULL
        ("prune_layers", ctypes.POINTER(ctypes.c_int32)),  # terminated by -1
        ("max_buf_size", ctypes.c_size_t),
    ]


@functools.cache
def _llama() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_dir() / "libllama.so"))
    lib.llama_backend_init.argtypes = []
    lib.llama_backend_init.restype = None
    lib.llama_model_quantize_default_params.argtypes = []
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_backend_init()
    return lib


_POINTER_FIELDS = ("imatrix", "kv_overrides", "tt_overrides", "prune_layers")


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list):
    arr = (ImatrixData * (len(imatrix) + 1))()  # zeroed: the last entry is the terminator
    for i, (name, values) in enumerate(imatrix.items()):
        v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        keep.append(v)
        arr[i].name = name.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(ImatrixData))


def _kv_override_array(overrides: Mapping[str, bool | int | float | str], keep: list):
    arr = (KvOverride * (len(overrides) + 1))()  # zeroed: key[0] == 0 terminates
    for i, (key, value) in enumerate(overrides.items()):
        o = arr[i]
        o.key = key.encode()
        if isinstance(value, bool):
            o.tag, o.value.val_bool = LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            o.tag, o.value.val_i64 = LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            o.tag, o.value.val_f64 = LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        else:
            o.tag, o.value.val_str = LLAMA_KV_OVERRIDE_TYPE_STR, str(value).encode()[:127]
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(KvOverride))


def _tensor_type_array(tensor_types: Iterable[tuple[str, int]], keep: list):
    items = [(p.encode(), int(t)) for p, t in tensor_types]
    keep.append(items)
    arr = (TensorOverride * (len(items) + 1))()
    for i, (pattern, t) in enumerate(items):
        arr[i].pattern, arr[i].type = pattern, t
    arr[len(items)].pattern, arr[len(items)].type = None, GGML_TYPE_COUNT
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(TensorOverride))


def model_quantize(
    src_gguf: Path | str,
    dst_gguf: Path | str,
    ftype: int,
    imatrix: Mapping[str, np.ndarray] | None = None,
    nthread: int = 2,
    *,
    kv_overrides: Mapping[str, bool | int | float | str] | None = None,
    tensor_types: Iterable[tuple[str, int]] | None = None,
    **params: object,
) -> None:
    """``llama_model_quantize(src, dst, &params)``, as llama-quantize calls it.

    ``imatrix``: tensor name -> float32 values (``ne0*ne2`` per tensor), passed as the NULL-terminated
    ``llama_model_imatrix_data`` array. ``kv_overrides`` (e.g. the ``quantize.imatrix.*`` keys llama-quantize
    adds) and ``tensor_types`` (``--tensor-type`` pattern, ggml type) become their NULL-terminated arrays.
    Other keyword arguments set fields of ``llama_model_quantize_params`` by name (``pure=True``,
    ``allow_requantize=True``, ``output_tensor_type=...``, ``quantize_output_tensor=False``, ...)."""
    lib = _llama()
    p = lib.llama_model_quantize_default_params()
    p.ftype = int(ftype)
    p.nthread = int(nthread)
    fields = {name for name, _ in QuantizeParams._fields_}
    for name, value in params.items():
        if name not in fields or name in _POINTER_FIELDS:
            raise TypeError(f"model_quantize: unknown or unsupported parameter {name!r}")
        setattr(p, name, value)
    keep: list = []  # ctypes buffers must outlive the call
    if imatrix:
        p.imatrix = _imatrix_array(imatrix, keep)
    if kv_overrides:
        p.kv_overrides = _kv_override_array(kv_overrides, keep)
    if tensor_types:
        p.tt_overrides = _tensor_type_array(tensor_types, keep)
    rc = lib.llama_model_quantize(str(src_gguf).encode(), str(dst_gguf).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src_gguf} -> {dst_gguf}, ftype={ftype}) failed with {rc}")
