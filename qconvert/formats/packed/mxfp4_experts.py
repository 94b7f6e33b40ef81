"""gpt-oss's MXFP4 experts (openai/gpt-oss-*: ``<experts>.gate_up_proj_blocks`` / ``_scales``,
``quantization_config.quant_method: mxfp4``) as the dense fused parameters transformers dequantizes them to,
for the commands that rewrite an HF checkpoint (quantize): its output is then an ordinary checkpoint of
those values, loadable without the MXFP4 quantizer, instead of blocks under another method's config.

    src = mxfp4_experts_source(open_checkpoint(path))   # the checkpoint itself when it has none
    src.note    # "dequantized 48 MXFP4 expert tensors to bf16"

``<p>_blocks`` uint8 [E, out, in/32, 16] and ``<p>_scales`` uint8 [E, out, in/32] become ``<p>`` bf16
[E, in, out] (transformers' x@W orientation: GptOssExperts.gate_up_proj / down_proj), each value
E2M1 x 2^(e-127) as transformers' _convert_moe_packed_tensors computes it: exact in bf16 (two significant
bits). `convert --to gguf` does not read through this view: it copies the blocks (arch/tensors.py).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import BadInput
from qconvert.load.checkpoint import TensorTable
from qconvert.load.safetensors import TensorInfo

if TYPE_CHECKING:
    import torch

_BLOCKS, _SCALES = "_blocks", "_scales"


def _is_mxfp4(ckpt: Any) -> bool:
    qc = ckpt.quantization_config or ckpt.config.get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == "mxfp4"


def mxfp4_experts_source(ckpt: Any) -> Any:
    """`ckpt` with its MXFP4 expert blocks dequantized on read, or `ckpt` itself when it has none."""
    if not _is_mxfp4(ckpt) or not any(n.endswith((_BLOCKS, _SCALES)) for n in ckpt.tensors):
        return ckpt
    return MXFP4ExpertsView(ckpt)


def _check(ckpt: Any, base: str) -> tuple[TensorInfo, TensorInfo]:
    """The blocks and scales of one parameter, refused in one line when one is missing or they disagree."""
    for part in (_BLOCKS, _SCALES):
        if f"{base}{part}" not in ckpt.tensors:
            raise BadInput(f"{base}{part} is missing (MXFP4 experts need both {_BLOCKS} and {_SCALES})",
                           ckpt.path)
    b, s = ckpt.tensors[f"{base}{_BLOCKS}"], ckpt.tensors[f"{base}{_SCALES}"]
    if b.dtype != "U8" or s.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16 or b.shape[:3] != s.shape:
        raise BadInput(f"MXFP4 experts {b.name} {b.dtype} {list(b.shape)} / {s.name} {s.dtype} "
                       f"{list(s.shape)}: expected U8 blocks [E, out, in/32, 16] and U8 scales of their "
                       "first three dimensions",
                       ckpt.path)
    return b, s


class MXFP4ExpertsView(TensorTable):
    """The Checkpoint interface over a gpt-oss MXFP4 checkpoint, each blocks/scales pair one bf16 tensor."""

    def __init__(self, ckpt: Any):
        self.source = ckpt
        self.path, self.name = ckpt.path, ckpt.name
        self.files = getattr(ckpt, "files", [])
        self.metadata = getattr(ckpt, "metadata", {})
        self.tokenizer_files = ckpt.tokenizer_files
        self.config = copy.deepcopy(ckpt.config)
        self.config.pop("quantization_config", None)
        self.quantization_config: dict[str, Any] | None = None
        self.quantization_config_file: str | None = None
        self.made: dict[str, tuple[str, str]] = {}  # dense name -> (blocks, scales)
        self.tensors = self._table()
        self.note = f"dequantized {len(self.made)} MXFP4 expert tensors to bf16"

    def _table(self) -> dict[str, TensorInfo]:
        table: dict[str, TensorInfo] = {}
        for name, info in self.source.tensors.items():
            if not name.endswith((_BLOCKS, _SCALES)):
                table[name] = info
                continue
            base = name.removesuffix(_BLOCKS).removesuffix(_SCALES)
            if base in table:
                continue
            b, s = _check(self.source, base)
            e, rows, groups, _ = b.shape
            shape = (e, groups * 32, rows)
            # offset -1: no bytes of its own in any file (read() makes them)
            table[base] = replace(b, name=base, dtype="BF16", shape=shape, nbytes=2 * e * rows * groups * 32,
                                  offset=-1)
            self.made[base] = (b.name, s.name)
        return table

    def __repr__(self) -> str:
        return f"MXFP4ExpertsView({self.name!r}, {len(self.made)} expert tensors dequantized to bf16)"

    def read_numpy(self, name: str) -> np.ndarray:
        """float32 (exact), [E, in, out] for a dequantized expert tensor."""
        if name not in self.made:
            return self.source.read_numpy(name)
        from gguf import GGMLQuantizationType

        from qconvert.kernels.ggml.fp4_blocks import from_hf_mxfp4
        from qconvert.kernels.registry import dequantize

        bname, sname = self.made[name]
        blocks, scales = self.source.read_numpy(bname), self.source.read_numpy(sname)
        q = from_hf_mxfp4(np.asarray(blocks), np.asarray(scales))
        e, rows, groups, _ = q.shape
        w = dequantize(q.reshape(-1, 17), GGMLQuantizationType.MXFP4).reshape(e, rows, groups * 32)
        return np.ascontiguousarray(w.transpose(0, 2, 1))

    def read(self, name: str) -> torch.Tensor:
        import torch

        if name not in self.made:
            return self.source.read(name)
        return torch.from_numpy(self.read_numpy(name)).to(torch.bfloat16)  # exact

    def read_raw(self, name: str) -> np.ndarray:
        import torch

        if name not in self.made:
            return self.source.read_raw(name)
        return self.read(name).view(torch.int16).numpy().view(np.uint16)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> MXFP4ExpertsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
