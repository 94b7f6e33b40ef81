"""Load stage: checkpoints in (safetensors directories, files, hub ids) and GGUF headers, validated and lazy.

    from qconvert.load import open_checkpoint, Checkpoint, TensorInfo, open_gguf, GGUFFile

See `Checkpoint` (load/checkpoint.py) for the checkpoint contract and `qconvert.load.summary` for the
`qconvert inspect` data.
"""

from qconvert.load.checkpoint import Checkpoint, open_checkpoint
from qconvert.load.gguf_file import GGUFFile, GGUFTensor, open_gguf
from qconvert.load.safetensors import TensorInfo

__all__ = ["Checkpoint", "GGUFFile", "GGUFTensor", "TensorInfo", "open_checkpoint", "open_gguf"]
