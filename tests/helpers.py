"""Small helpers the test modules share (imported as ``tests.helpers``, as ``tests.oracle`` is)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in a checkpoint directory (shards in name order)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out
