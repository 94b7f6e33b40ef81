"""qconvert: quantize and convert LLM checkpoints to GGUF and packed safetensors."""

__version__ = "0.1.0"
