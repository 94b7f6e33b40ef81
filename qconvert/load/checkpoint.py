"""Checkpoints in: a local HF directory, a single .safetensors file or a hub id -> one lazy `Checkpoint`.

Headers are parsed and validated up front (cheap); tensor data is read only by `read`/`read_numpy`, one
tensor at a time, from a private memory map.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import BadInput, IOFailure
from qconvert.load import hub
from qconvert.load.dtypes import DTYPES
from qconvert.load.safetensors import MappedFile, SafetensorsHeader, TensorInfo, read_header

TOKENIZER_FILES = hub.TOKENIZER_FILES
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")  # AutoGPTQ / AutoAWQ side files
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorTable:
    """The container side of a checkpoint (`name in ckpt`, iteration, len, info) over ``self.tensors``;
    Checkpoint and the packed formats' DenseView share it."""

    name: str
    tensors: dict[str, TensorInfo]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor named {name!r}") from None


class Checkpoint(TensorTable):
    """Lazy view of a safetensors checkpoint: `config` (config.json), `tensors` (name -> TensorInfo, from the
    validated headers), `metadata`, `tokenizer_files`, `quantization_config`; `read` / `read_raw` /
    `read_numpy` map one tensor at a time. A context manager (closes the mapped files)."""

    def __init__(self, path: Path, name: str, config: dict[str, Any], headers: list[SafetensorsHeader],
                 tokenizer_files: dict[str, Path],
                 quantization_config: tuple[dict[str, Any] | None, str | None] = (None, None)):
        self.path = path
        self.name = name
        self.config = config
        self.files = [h.path for h in headers]
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for h in headers:
            self.metadata.update(h.metadata)
            for t in h.tensors:
                if t.name in self.tensors:
                    other = self.tensors[t.name].file.name
                    raise BadInput(f"tensor {t.name!r} is stored twice (also in {other})", t.file)
                self.tensors[t.name] = t
        self.tokenizer_files = tokenizer_files
        # config.json's quantization_config, else an AutoGPTQ/AutoAWQ side file; None if not quantized
        self.quantization_config, self.quantization_config_file = quantization_config
        self._maps: dict[Path, MappedFile] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self)} tensors, {len(self.files)} file(s))"

    def _map(self, t: TensorInfo) -> MappedFile:
        mf = self._maps.get(t.file)
        if mf is None:
            mf = self._maps[t.file] = MappedFile(t.file)
        return mf

    def read(self, name: str):
        """torch.Tensor in the stored dtype, a zero-copy view of the mapped bytes of this tensor only."""
        t = self.info(name)
        return self._map(t).torch(t)

    def read_raw(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of the stored bits (BF16 as uint16, F8 as uint8; no torch import)."""
        t = self.info(name)
        return self._map(t).numpy(t)

    def read_numpy(self, name: str) -> np.ndarray:
        """float32 copy for float dtypes (bf16 -> f32 is exact); the raw integer/bool array otherwise."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if not dt.is_float:
            return self.read_raw(name)
        if t.dtype == "BF16":
            # one pass, widening as it shifts (astype then << makes two 4-byte arrays)
            raw = self.read_raw(name)
            bits = np.empty(raw.shape, np.uint32)
            np.left_shift(raw, 16, out=bits, dtype=np.uint32)
            return bits.view(np.float32)
        if t.dtype in ("F16", "F32", "F64"):
            return self.read_raw(name).astype(np.float32)
        if dt.torch_name is None:  # F4 / F6: no element type to widen to; hand back the packed bytes
            return self.read_raw(name)
        return self.read(name).float().numpy()

    def close(self) -> None:
        for mf in self._maps.values():
            mf.close()
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_json(path: Path) -> Any:
    """Parsed JSON, or BadInput/IOFailure naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput("is not valid UTF-8 text", path) from None
    except OSError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", path) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadInput(f"is not valid JSON ({str(e).splitlines()[0][:120]})", path) from None


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise BadInput("is not a JSON object", path)
    return config


def _quantization_config(directory: Path, config: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(quantization config, the file it came from)."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc, "config.json"
    for name in QUANT_CONFIG_FILES:
        path = directory / name
        if path.is_file():
            side = read_json(path)
            if isinstance(side, dict):
                return side, name
    return None, None


def _tokenizer_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def _shard_path(directory: Path, index: Path, shard: Any, tensor: Any) -> Path:
    if not isinstance(shard, str) or not isinstance(tensor, str):
        raise BadInput(f"weight_map entry {tensor!r}: {shard!r} is not a tensor name -> file name pair",
                       index)
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts:
        raise BadInput(f"weight_map points outside the checkpoint directory: {shard!r}", index)
    return directory / rel


def _read_index(index: Path) -> tuple[list[SafetensorsHeader], dict[str, Path]]:
    obj = read_json(index)
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInput("has no 'weight_map' object (tensor name -> shard file)", index)
    wanted = {name: _shard_path(index.parent, index, shard, name) for name, shard in weight_map.items()}
    headers: dict[Path, SafetensorsHeader] = {}
    for name, shard in wanted.items():
        if shard not in headers:
            if not shard.is_file():
                raise BadInput(f"weight_map points to a missing shard {shard.name!r} (for {name!r})", index)
            headers[shard] = read_header(shard)
    return list(headers.values()), wanted


def _check_index(index: Path, headers: list[SafetensorsHeader], wanted: dict[str, Path]) -> None:
    present = {h.path: {t.name for t in h.tensors} for h in headers}
    for name, shard in wanted.items():
        if name not in present[shard]:
            raise BadInput(f"weight_map says {name!r} is in {shard.name!r} but that shard has no such tensor",
                           index)


def _pick_index(directory: Path) -> Path | None:
    main = directory / "model.safetensors.index.json"
    if main.is_file():
        return main
    others = sorted(directory.glob("*.safetensors.index.json"))
    return others[0] if others else None


def _pick_weights(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    model_like = [p for p in files if p.name.startswith("model")]
    return model_like or files


def _no_weights(directory: Path) -> BadInput:
    entries = list(directory.iterdir())
    if not entries:
        return BadInput("directory is empty", directory)
    names = [p.name for p in entries]
    if any(n.endswith(_PICKLE_SUFFIXES) for n in names):
        return BadInput("has only PyTorch pickle weights (.bin/.pt); qconvert reads .safetensors "
                        "(re-save the model with safe_serialization=True)", directory)
    if any(n.endswith(".gguf") for n in names):
        return BadInput("has .gguf files but no .safetensors weights (pass the .gguf file itself)", directory)
    return BadInput("no .safetensors weights found in this directory", directory)


def _open_dir(directory: Path, name: str, index: Path | None = None) -> Checkpoint:
    try:
        index = index or _pick_index(directory)
        if index is not None:
            headers, wanted = _read_index(index)
            _check_index(index, headers, wanted)
        else:
            files = _pick_weights(directory)
            if not files:
                raise _no_weights(directory)
            headers = [read_header(f) for f in files]
        config = _read_config(directory)
        return Checkpoint(directory, name, config, headers, _tokenizer_files(directory),
                          _quantization_config(directory, config))
    except PermissionError as e:
        raise IOFailure(f"cannot read: {e.strerror or e}", e.filename or directory) from None


def _open_file(path: Path) -> Checkpoint:
    if path.name.endswith(".safetensors.index.json"):
        return _open_dir(path.parent, path.parent.name, index=path)
    if path.suffix.lower() == ".gguf":
        raise BadInput("is a GGUF file; this command needs a Hugging Face checkpoint (safetensors)", path)
    header = read_header(path)
    directory = path.parent
    config = _read_config(directory)
    return Checkpoint(directory, directory.name or path.stem, config, [header], _tokenizer_files(directory),
                      _quantization_config(directory, config))


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Open a local HF directory, a single .safetensors file (or an index.json) or a hub id ('org/name')."""
    text = str(source)
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except OSError as e:
        raise IOFailure(f"cannot access: {e.strerror or e}", path) from None
    if exists:
        path = path.absolute()
        return _open_dir(path, path.name) if path.is_dir() else _open_file(path)
    if isinstance(source, str) and hub.looks_like_hub_id(text):
        folder = hub.snapshot(text)
        return _open_dir(folder, text.rsplit("/", 1)[-1])
    raise BadInput("no such file or directory (and not a Hugging Face hub id of the form org/name)", path)
