"""llama.cpp's own LoRA converter as a test oracle: the llama-cpp-python 0.3.36 sdist's
convert_lora_to_gguf.py (tests/fixtures.py: llamacpp_lora_converter), run with this venv's python and the
sdist's conversion/ and gguf-py/ first on the path (llamacpp_source), as convert_hf.py runs its sibling.

    convert_lora_to_gguf(script, source, adapter_dir, base_dir, out, outtype="f32") -> out

Run as a script it is that driver: ``python convert_lora.py SCRIPT SOURCE [convert_lora_to_gguf.py args...]``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path


def convert_lora_to_gguf(script: Path, source: Path, adapter_dir: Path, base_dir: Path, out: Path,
                         outtype: str = "f32") -> Path:
    """Run the vendored LoRA converter; raises with its stderr tail if it fails."""
    cmd = [sys.executable, __file__, str(script), str(source), "--base", str(base_dir), "--outtype", outtype,
           "--outfile", str(out), str(adapter_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_lora_to_gguf.py {adapter_dir} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return out


def _main(argv: list[str]) -> None:
    script, source = Path(argv[0]), Path(argv[1])
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    sys.argv = [str(script), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    _main(sys.argv[1:])
