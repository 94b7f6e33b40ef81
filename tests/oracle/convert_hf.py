"""llama.cpp's own converter as a test oracle: the vendored convert_hf_to_gguf.py of the llama-cpp-python
0.3.36 sdist (tests/fixtures.py: llamacpp_source), run with this venv's python and the sdist's gguf-py first
on the path, as the script puts it there itself.

    convert_hf_to_gguf(source, model_dir, out, pre_tokenizer, outtype="bf16") -> out

One liberty: the converter names the pre-tokenizer by hashing how the tokenizer splits a probe text, and
knows only real models' tokenizers; the synthetic checkpoints carry a small tokenizer trained for the
tests. ``pre_tokenizer`` is the name its hash would give the real tokenizer it imitates (qwen2, smollm):
get_vocab_base_pre returns it, and nothing else of the vocabulary export changes.

Run as a script it is that driver: ``python convert_hf.py SOURCE PRE [convert_hf_to_gguf.py args...]``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path


def convert_hf_to_gguf(source: Path, model_dir: Path, out: Path, pre_tokenizer: str,
                       outtype: str = "bf16", args: tuple[str, ...] = ()) -> Path:
    """Run the vendored converter on model_dir (more of its options in ``args``); raises with its stderr
    tail if it fails."""
    cmd = [sys.executable, __file__, str(source), pre_tokenizer, str(model_dir), "--outtype", outtype,
           "--outfile", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py {model_dir} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return out


def _main(argv: list[str]) -> None:
    source, pre = Path(argv[0]), argv[1]
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    import conversion.base as base  # the vendored package, found through the path above

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    script = source / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    _main(sys.argv[1:])
