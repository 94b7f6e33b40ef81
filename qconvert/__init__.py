"""qconvert: quantize and convert LLM checkpoints to GGUF and packed safetensors."""

from .formats.gguf import compat  # noqa: F401  (adds the ggml types PyPI gguf-py lacks before anything uses them)

__version__ = "0.1.0"
