"""Write an HF checkpoint directory atomically: sharded safetensors + index, config, tokenizer files.

Everything goes into a temp directory next to the target (same filesystem) and is renamed into place only when
the last byte is written; an error or Ctrl-C leaves the target untouched and removes the temp directory.
Shards are flushed as they fill, so at most one shard of tensors is held in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from qconvert.errors import BadInput, IOFailure

DEFAULT_SHARD_BYTES = 2 * 1024**3


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '123' → bytes (decimal units, as transformers' max_shard_size)."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = int(float(num) * units[t[len(num) :]])
    except (KeyError, ValueError):
        raise BadInput(f"bad size {text!r} (examples: 2GB, 500MB)") from None
    if value <= 0:
        raise BadInput(f"bad size {text!r}: must be positive")
    return value


class CheckpointWriter:
    """``with CheckpointWriter(out) as w: w.add(name, tensor); w.write_json(...)`` — committed on clean
    exit."""

    def __init__(
        self, target: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False
    ):
        self.target = Path(target)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        if self.target.exists() and not (self.target.is_dir() and not any(self.target.iterdir())):
            if not overwrite:
                raise BadInput("output exists; choose another path or pass --overwrite", self.target)
            if not self.target.is_dir():
                raise BadInput("output exists and is not a directory", self.target)
        self.tmp: Path | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        parent = self.target.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=parent))
        except OSError as e:
            raise IOFailure(f"cannot create the output directory: {e.strerror or e}", parent) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- content ---------------------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        # own contiguous copy: tensors mmapped from one source file share storage, which save_file refuses
        t = tensor.detach().contiguous().clone()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size

    def write_json(self, filename: str, obj: object) -> None:
        self._io(
            lambda: (self._path(filename)).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"),
            filename,
        )

    def copy_file(self, src: str | Path, filename: str | None = None) -> None:
        src = Path(src)
        self._io(lambda: shutil.copyfile(src, self._path(filename or src.name)), src)

    # -- internals ------------------------------------------------------------------------------------------
    def _path(self, filename: str) -> Path:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        return self.tmp / filename

    def _io(self, fn, where: object) -> None:
        try:
            fn()
        except OSError as e:
            raise IOFailure(f"write failed: {e.strerror or e}", where) from None

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards) + 1
        path = self._path(f"shard-{index:05d}.safetensors")
        self._io(lambda: save_file(self._pending, str(path), metadata={"format": "pt"}), path)
        self._shards.append(list(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def _shard_names(self) -> list[str]:
        n = len(self._shards)
        return (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )

    def commit(self) -> None:
        if self.tmp is None:
            return
        self._flush()
        names = self._shard_names()
        for i, final in enumerate(names, start=1):
            src = self._path(f"shard-{i:05d}.safetensors")
            self._io(lambda s=src, f=final: os.replace(s, self._path(f)), src)
        if len(names) > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        self._fix_modes()
        self._swap_in()
        self.tmp = None

    def _fix_modes(self) -> None:
        # mkdtemp makes the directory 0700 (and some writers make files 0600): give the usual umask modes
        umask = os.umask(0)
        os.umask(umask)
        assert self.tmp is not None
        os.chmod(self.tmp, 0o777 & ~umask)
        for f in self.tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)

    def _swap_in(self) -> None:
        assert self.tmp is not None
        old = None
        try:
            if self.target.exists():  # --overwrite (checked in __init__): park the old output until the swap
                old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.tmp.parent))
                os.replace(self.target, old / "d")
            os.replace(self.tmp, self.target)
        except OSError as e:
            if old is not None and not self.target.exists():
                os.replace(old / "d", self.target)  # put the previous output back
            raise IOFailure(
                f"cannot move the finished output into place: {e.strerror or e}", self.target
            ) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
