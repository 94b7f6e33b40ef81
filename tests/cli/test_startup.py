"""The CLI shell must start fast: no subcommand may import torch (or transformers) at module level."""

import subprocess
import sys


def test_cli_import_does_not_load_heavy_modules():
    heavy = "('torch', 'transformers', 'numba')"
    code = f"import sys, qconvert.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_is_registered():
    from qconvert.cli import app

    names = {c.name for c in app.registered_commands}
    assert {"inspect", "convert", "quantize", "calibrate", "imatrix", "eval"} <= names
