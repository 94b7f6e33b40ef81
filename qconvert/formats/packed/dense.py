"""A quantized checkpoint as a dense one: every packed layout's read side behind the Checkpoint interface.

    src = dense_source(open_checkpoint(path))   # the checkpoint itself when nothing in it is packed
    src.note    # "dequantized 210 fp8-block tensors (weight_scale_inv 128x128) to bf16"

Every packed Linear becomes one ``<prefix>.weight`` in the dtype the dense checkpoint would have (its
unquantized float tensors' dtype: bf16 for DeepSeek's FP8 releases and for our own outputs of a bf16
model), placed where its first packed tensor was; scales, zero points, shapes and activation scales
disappear; config.json loses its quantization_config. `read` dequantizes one tensor at a time, on demand,
with the layout's own ``unpack`` (float32 products, each rounded once) and rounds it once to that dtype, so
``convert``/``quantize``/``calibrate``/``imatrix`` see exactly the tensors of the dequantized checkpoint,
with the memory of a dense source. Every layer's tensors are checked (``check``, where a layout has one)
before anything is read, so a bad scale is one BadInput line and no output.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.formats.packed import base
from qconvert.formats.packed.fp8 import block_of
from qconvert.load.checkpoint import TensorTable
from qconvert.load.dtypes import FLOAT_NAMES
from qconvert.load.safetensors import TensorInfo

if TYPE_CHECKING:
    import torch

DEFAULT_DTYPE = "BF16"  # no unquantized float tensor and no torch_dtype to go by: what DeepSeek's cast writes


def quantization_config(src: Any) -> dict[str, Any]:
    """config.json's (or a side file's) quantization_config; a multimodal checkpoint may keep it in its
    text_config."""
    return src.quantization_config or (src.config.get("text_config") or {}).get("quantization_config") or {}


def _dense_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the dequantized checkpoint has it: without quantization_config."""
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    if isinstance(out.get("text_config"), dict):
        out["text_config"].pop("quantization_config", None)
    return out


class DenseView(TensorTable):
    """The Checkpoint interface (path, name, config, tensors, tokenizer_files, read / read_raw / read_numpy)
    over a quantized checkpoint, its packed Linears dequantized on read. `dtype` None: the dense
    checkpoint's float dtype; "F32": the unrounded dequantization (eval --loader unpack)."""

    def __init__(self, ckpt: Any, dtype: str | None = None):
        from qconvert.formats.packed import find_packed

        self.source = ckpt
        self.path = ckpt.path
        self.name = ckpt.name
        self.files = getattr(ckpt, "files", [])
        self.metadata = getattr(ckpt, "metadata", {})
        self.tokenizer_files = ckpt.tokenizer_files
        self.qc = quantization_config(ckpt)
        self.config = _dense_config(ckpt.config)
        self.quantization_config: dict[str, Any] | None = None
        self.quantization_config_file: str | None = None
        self.packed = find_packed(ckpt.tensors, self.qc)  # prefix -> layout
        self.layers = {q.name: q for q in _detect(ckpt, self.packed, self.qc)}
        for prefix, lay in self.packed.items():
            _check(ckpt, prefix, lay, self.qc)
        self.dtype = dtype or _dense_dtype(ckpt, self.packed)
        self.tensors = self._table()
        self.note = self._note()

    # -- the tensor table ------------------------------------------------------------------------------------
    def _table(self) -> dict[str, TensorInfo]:
        from qconvert.formats.packed import AUX_SUFFIXES

        ckpt, table = self.source, {}
        for name, info in ckpt.tensors.items():
            head, _, leaf = name.rpartition(".")
            if head in self.packed:
                if f"{head}.weight" not in table:
                    table[f"{head}.weight"] = self._dense_info(head, info)
                if leaf in AUX_SUFFIXES or leaf == "weight":
                    continue
            elif leaf in AUX_SUFFIXES and leaf != "scales":
                continue  # stray activation / kv-cache scales: the dense model has none
            if FLOAT_NAMES.get(info.dtype) is not None:
                table[name] = info
        return table

    def _dense_info(self, prefix: str, first: Any) -> TensorInfo:
        n, k = self.layers[prefix].shape or (0, 0)
        nbytes = n * k * {"BF16": 2, "F16": 2, "F32": 4}[self.dtype]
        # offset -1: no bytes of its own in any file (read() makes them)
        return replace(first, name=f"{prefix}.weight", dtype=self.dtype, shape=(n, k), nbytes=nbytes,
                       offset=-1)

    def _note(self) -> str:
        kinds = Counter(_kind(q, self.source.tensors, self.qc) for q in self.layers.values())
        parts = [f"{n} {kind.replace('{s}', 's' if n > 1 else '')}" for kind, n in kinds.items()]
        return f"dequantized {' + '.join(parts)} to {self.dtype.lower()}"  # bf16 / f16 / f32

    # -- the Checkpoint interface ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"DenseView({self.name!r}, {len(self.packed)} packed Linears dequantized to {self.dtype})"

    def read(self, name: str) -> torch.Tensor:
        """torch.Tensor in the advertised dtype: a packed Linear dequantized now, anything else as stored."""
        import torch

        from qconvert.load.dtypes import TORCH_FLOATS

        if not self._made(name):
            return self.source.read(name)
        return torch.from_numpy(self._dequantize(name)).to(TORCH_FLOATS[self.dtype])  # exact: values in dtype

    def read_raw(self, name: str) -> np.ndarray:
        """numpy view of the bits (BF16 as uint16), as Checkpoint.read_raw."""
        import torch

        if not self._made(name):
            return self.source.read_raw(name)
        t = self.read(name)
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

    def read_numpy(self, name: str) -> np.ndarray:
        """float32 (exact: every dense dtype widens exactly), as Checkpoint.read_numpy; for a packed Linear
        the dequantized array itself, no further copy."""
        if not self._made(name):
            return self.source.read_numpy(name)
        return self._dequantize(name)

    def _made(self, name: str) -> bool:
        """Whether `name` is a dequantized Linear (else a tensor the source stores as it is)."""
        return self.info(name).offset < 0

    def _dequantize(self, name: str) -> np.ndarray:
        """float32 [N, K], row-major, each value the float32 product rounded once to the view's dtype. A
        layout with ``unpack_as`` rounds as it goes (FP8 blocks: one lookup table per tile); the others'
        float32 unpack is rounded here. Row-major as a stored tensor: GPTQ unpacks transposed, and a
        transposed weight takes another matmul path (other sums in the last bits)."""
        from qconvert.load.dtypes import round_float32

        prefix = name.removesuffix(".weight")
        lay = self.packed[prefix]
        try:
            unpack_as = getattr(lay, "unpack_as", None)
            if unpack_as is not None:
                w = unpack_as(self.source, prefix, self.qc, self.dtype)
            else:
                w = round_float32(np.ascontiguousarray(lay.unpack(self.source, prefix, self.qc).numpy(),
                                                       dtype=np.float32), self.dtype)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:  # RuntimeError: torch shape clash
            raise BadInput(f"cannot dequantize {prefix} ({lay.method}): {e}", self.path) from None
        if w.shape != self.tensors[name].shape:
            raise BadInput(f"{prefix} ({lay.method}) unpacks to {list(w.shape)}, its tensors say "
                           f"{list(self.tensors[name].shape)}", self.path)
        return w

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> DenseView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dense_source(ckpt: Any, dtype: str | None = None) -> Any:
    """`ckpt` with its packed Linears dequantized on read (a DenseView), or `ckpt` itself when nothing is
    packed (or it already is a view). Every layer is checked here: BadInput before any work."""
    if isinstance(ckpt, DenseView):
        return ckpt
    view = DenseView(ckpt, dtype)
    return view if view.packed else ckpt


def dense_note(src: Any) -> str | None:
    """The one line saying what `src` dequantizes (None for a dense checkpoint)."""
    return src.note if isinstance(src, DenseView) else None


# -- helpers -------------------------------------------------------------------------------------------------

def _detect(ckpt: Any, packed: dict[str, base.Layout], qc: dict) -> list[base.QuantizedLayer]:
    from qconvert.formats.packed import find_quantized_layers

    found = {q.name: q for q in find_quantized_layers(ckpt.tensors, qc or None, ckpt.read_raw)}
    for prefix, lay in packed.items():
        q = found.get(prefix)
        if q is None or q.shape is None or not all(q.shape):
            raise BadInput(f"cannot dequantize {prefix} ({lay.method}): its tensors do not say its shape",
                           ckpt.path)
    return [found[p] for p in packed]


def _check(ckpt: Any, prefix: str, lay: base.Layout, qc: dict) -> None:
    check = getattr(lay, "check", None)  # optional: the layouts whose tensors can disagree before unpacking
    if check is None:
        return
    try:
        check(prefix, ckpt.tensors, qc)
    except ValueError as e:
        raise BadInput(f"cannot dequantize {prefix} ({lay.method}): {e}", ckpt.path) from None


def _dense_dtype(ckpt: Any, packed: dict[str, base.Layout]) -> str:
    """The float dtype of the checkpoint's unquantized tensors (embeddings, norms: what the dense model was
    saved in), else config.json's torch_dtype / dtype, else bf16."""
    seen: Counter[str] = Counter()
    for name, info in ckpt.tensors.items():
        head = name.rpartition(".")[0]
        if head not in packed and info.dtype in FLOAT_NAMES:
            seen[info.dtype] += info.nbytes
    if seen:
        return seen.most_common(1)[0][0]
    declared = str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "")
    by_torch = {v: k for k, v in FLOAT_NAMES.items()}
    return by_torch.get(declared, DEFAULT_DTYPE)


def _kind(q: base.QuantizedLayer, tensors: Any, qc: dict) -> str:
    """How one layer is stored, for the note: "fp8-block tensor{s} (weight_scale_inv 128x128)"."""
    if q.method in ("fp8", "int8"):
        scale = "weight_scale_inv" if f"{q.name}.weight_scale_inv" in tensors else "weight_scale"
        block = block_of(q.name, tensors, qc)
        gran = "block" if block else q.granularity or "tensor"
        where = f"{scale} {block[0]}\u00d7{block[1]}" if block else scale
        return f"{q.method}-{gran} tensor{{s}} ({where})"
    group = "per channel" if q.group_size == -1 else f"group {q.group_size}"
    bits = f"{q.bits}-bit " if q.bits else ""
    fmt = str(qc.get("checkpoint_format", qc.get("format", ""))) if q.method == "gptq" else ""
    name = "gptq_v2" if fmt.lower() == "gptq_v2" else q.method
    return f"{name} {bits}tensor{{s}} ({group})"
