"""Write an HF checkpoint directory atomically: sharded safetensors + index, config, tokenizer files.

Everything goes into a temp directory next to the target (same filesystem) and is renamed into place only when
the last byte is written; an error or Ctrl-C leaves the target untouched and removes the temp directory.

Tensors are streamed: ``add`` writes a tensor's raw bytes straight to the open shard's data file and keeps
only its dtype, shape and offsets, so at most one tensor (the caller's) is in memory at a time. When a shard
closes, its safetensors file is assembled as header + data (an in-kernel copy where the OS has one).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from qconvert.errors import BadInput, IOFailure
from qconvert.formats.output import atomic_dir
from qconvert.load.dtypes import DTYPES

DEFAULT_SHARD_BYTES = 2 * 1024**3
COPY_CHUNK = 8 * 1024**2  # buffer of the user-space copy fallback

# torch dtype → safetensors dtype string (the names the safetensors library writes), from the one dtype table;
# the newer dtypes only where this torch has them. F4 is written from torch's packed float4_e2m1fn_x2 (two
# values per byte: the header counts values, not bytes), which the reader hands back as raw bytes.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, d.torch_name): d.name
    for d in DTYPES.values()
    if d.torch_name and hasattr(torch, d.torch_name)
}
if hasattr(torch, "float4_e2m1fn_x2"):
    SAFETENSORS_DTYPES[torch.float4_e2m1fn_x2] = "F4"


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


class SafetensorsStream:
    """One safetensors file written tensor by tensor: each tensor's raw bytes go to a data file as they come
    (only dtype, shape and offsets are kept); `finish` writes the file as header + data. The caller decides
    where the file goes and handles errors (OSError is raised as is)."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.header: dict[str, dict] = {}  # name → dtype, shape, data_offsets (in add order)
        self.offset = 0  # bytes written to the data file
        self._data = None

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append one tensor; returns its size in bytes."""
        if name in self.header:
            raise ValueError(f"tensor {name} written twice")
        t = _cpu_contiguous(tensor)
        entry = {"dtype": _dtype_code(name, t), "shape": _header_shape(name, t)}
        size = t.numel() * t.element_size()
        if self._data is None:
            self._data = open(self.data_path, "wb")
        _write_all(self._data, _raw_bytes(t))
        entry["data_offsets"] = [self.offset, self.offset + size]
        self.header[name] = entry
        self.offset += size
        return size

    def finish(self, metadata: dict[str, str] | None = None) -> None:
        """Write `path` (header with `metadata`, then the data) and remove the data file."""
        if self._data is None:
            self._data = open(self.data_path, "wb")
        self._data.close()
        with open(self.data_path, "rb") as src, open(self.path, "wb") as dst:
            dst.write(_header_bytes(self.header, metadata))
            dst.flush()  # _append writes through the descriptor
            _append(dst, src)
        os.remove(self.data_path)

    def abort(self) -> None:
        """Close and remove what was written (the data file and a half-written `path`)."""
        try:
            if self._data is not None:
                self._data.close()  # flushes: fails again on a full disk, which must not stop the cleanup
        except OSError:
            pass
        finally:
            self._data = None
            self.data_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)


class CheckpointWriter:
    """``with CheckpointWriter(out) as w: w.add(name, tensor); w.write_json(...)`` — committed on clean
    exit. The directory is built under a temp name and swapped in (formats/output.py: atomic_dir); the first
    OSError removes it and becomes the one IOFailure line."""

    def __init__(
        self, target: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False
    ):
        self.target = Path(target)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self._out = atomic_dir(self.target, overwrite, "checkpoint")  # refuses an existing output now
        self.tmp: Path | None = None
        self._names: set[str] = set()
        self._shards: list[list[str]] = []  # tensor names of the closed shards
        self._shard: SafetensorsStream | None = None  # the open shard
        self._failed: str | None = None  # set when a write failed: the output is gone
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self.tmp = self._out.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self.commit()
        except BaseException:
            self._discard()  # a failed commit must not leave the temp directory behind either
            raise

    # -- content ---------------------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._check_usable()
        size = tensor.numel() * tensor.element_size()
        shard = self._shard
        if shard is not None and shard.header and shard.offset + size > self.max_shard_bytes:
            self._close_shard()
        if self._shard is None:
            self._shard = SafetensorsStream(self._shard_path())
        shard = self._shard
        self._io(lambda: self._count(shard.add(name, tensor)))
        self._names.add(name)

    def write_json(self, filename: str, obj: object) -> None:
        self._io(lambda: (self._path(filename)).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))

    def copy_file(self, src: str | Path, filename: str | None = None) -> None:
        src = Path(src)
        self._io(lambda: shutil.copyfile(src, self._path(filename or src.name)))

    # -- internals ------------------------------------------------------------------------------------------
    def _path(self, filename: str) -> Path:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        return self.tmp / filename

    def _count(self, nbytes: int) -> None:
        self.total_bytes += nbytes

    def _check_usable(self) -> None:
        # after a failed write the output is gone (and a half-written tensor would leave a shard's data out of
        # step with its header): refuse to go on
        if self._failed is not None:
            raise IOFailure(f"write failed earlier: {self._failed}", self.target)

    def _io(self, fn) -> None:
        self._check_usable()
        try:
            fn()
        except OSError as e:
            self._failed = str(e.strerror or e)
            self._abort_shard()
            self.tmp = None
            raise self._out.fail(e) from e

    def _shard_path(self, index: int | None = None) -> Path:
        return self._path(f"shard-{index or len(self._shards) + 1:05d}.safetensors")

    def _close_shard(self) -> None:
        """Write the open shard's safetensors file (header, then the data file's bytes)."""
        shard = self._shard
        if shard is None:
            return
        self._io(shard.finish)
        self._shards.append(list(shard.header))
        self._shard = None

    def _abort_shard(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def _discard(self) -> None:
        try:
            self._abort_shard()
        finally:
            self._out.discard()
            self.tmp = None

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
        self._close_shard()
        names = self._shard_names()
        for i, final in enumerate(names, start=1):
            src = self._shard_path(i)
            self._io(lambda s=src, f=final: os.replace(s, self._path(f)))
        if len(names) > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        self._io(self._fix_modes)
        self._out.commit()
        self.tmp = None

    def _fix_modes(self) -> None:
        # whatever made them, the directory and its files get the usual umask modes
        umask = current_umask()
        assert self.tmp is not None
        os.chmod(self.tmp, 0o777 & ~umask)
        for f in self.tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)


# -- tensor bytes and the safetensors file layout -----------------------------------------------------------


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # conj/neg bits are lazy views: materialize them, as the bytes on disk must be the values
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def _dtype_code(name: str, t: torch.Tensor) -> str:
    code = SAFETENSORS_DTYPES.get(t.dtype)
    if code is None:
        raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
    return code


def _header_shape(name: str, t: torch.Tensor) -> list[int]:
    shape = list(t.shape)
    if SAFETENSORS_DTYPES[t.dtype] == "F4":  # torch packs two values per element; safetensors counts values
        if not shape:
            raise ValueError(f"tensor {name}: a 0-d float4_e2m1fn_x2 tensor cannot be stored in safetensors")
        shape[-1] *= 2
    return shape


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a uint8 view: numpy has no bf16/fp8, and bool is one byte)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(f, buf: memoryview) -> None:
    # a buffered file writes a large buffer straight through, without copying it
    if len(buf):
        f.write(buf)


def _header_bytes(header: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte little-endian length + JSON, padded with spaces to a multiple of 8 as the safetensors library
    does (the spec allows trailing whitespace)."""
    meta = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:  # readers refuse a header whose metadata values are not strings
        raise ValueError(f"safetensors metadata values must be strings: {', '.join(bad)}")
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"), ensure_ascii=False)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _append(dst, src) -> None:
    """Append all of ``src`` (read from its current position) to ``dst``: in the kernel where it can (no
    user-space buffer; a reflink on btrfs/xfs), else through a fixed-size buffer."""
    if hasattr(os, "copy_file_range"):
        try:
            while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
                pass
            return
        except OSError as e:  # other filesystem, old kernel, or a file system that does not support it
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    # positions were moved by the kernel copy, if any: carry on from there through raw descriptors
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    while n := os.readv(src.fileno(), [buf]):
        done = 0
        while done < n:
            done += os.write(dst.fileno(), view[done:n])
