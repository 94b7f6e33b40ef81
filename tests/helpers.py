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


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """`qconvert ARGS` in-process, as users run it: (exit code, stdout, stderr)."""
    from qconvert import cli

    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
