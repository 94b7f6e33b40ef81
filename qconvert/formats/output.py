"""Outputs: the checks a single-file output (GGUF, imatrix, stats) makes before any work, so that a bad path
fails in a second, not after a long pass; and the one way every output is written.

An output is built next to its target under a temp name, ``.{name}.tmp-{pid}`` (same filesystem, so the
final rename is atomic; hidden; one per process), and renamed into place only when complete. Any failure
removes it and leaves the target as it was; an OSError becomes one IOFailure line,
"cannot write {what}: {strerror} (partial output removed)".

    with atomic_file(target, "GGUF file") as tmp: ...           # write tmp
    with atomic_dir(target, overwrite, "checkpoint") as tmp: ... # fill the directory tmp

Writers whose output outlives one ``with`` block (a file filled chunk by chunk over several calls) hold the
AtomicFile / AtomicDir and call ``commit()``, ``discard()`` or ``fail(e)`` themselves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qconvert.errors import BadInput, IOFailure


def check_output_path(target: Path) -> None:
    """Fail before any work if the output file cannot be created there."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput("output directory does not exist", parent)
    if target.is_dir():
        raise BadInput("output path is a directory", target)


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """``.{name}.{kind}-{pid}`` next to `target`."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def io_failure(e: OSError, what: str, target: Path) -> IOFailure:
    """The one message of a failed write (the caller has removed the partial output)."""
    return IOFailure(f"cannot write {what}: {e.strerror or e} (partial output removed)", target)


class _Atomic:
    """An output made under a temp name: committed when its block ends normally, removed when it raises
    (an OSError becomes the one io-failure message). Subclasses say how to commit and discard."""

    target: Path
    what: str

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif isinstance(exc, OSError):
            raise self.fail(exc) from exc
        else:
            self.discard()

    def commit(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def fail(self, e: OSError) -> IOFailure:
        """Remove the partial output and return the error to raise for `e`."""
        self.discard()
        return io_failure(e, self.what, self.target)


class AtomicFile(_Atomic):
    """One output file written under its temp name (see the module docstring)."""

    def __init__(self, target: str | Path, what: str):
        self.target = Path(target)
        self.what = what
        self.tmp = temp_path(self.target)

    def __enter__(self) -> Path:
        return self.tmp

    def commit(self) -> None:
        """Rename the finished temp file onto the target."""
        try:
            os.replace(self.tmp, self.target)
        except OSError as e:
            raise self.fail(e) from e

    def discard(self) -> None:
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass  # nothing more can be done; the error being raised is the one to report


class AtomicDir(_Atomic):
    """One output directory filled under its temp name and swapped into place (see the module docstring).

    A target that exists and is not an empty directory is refused unless `overwrite`; with it, the old
    output is parked under ``.{name}.old-{pid}`` during the swap, put back if the swap fails, and removed
    once the new one is in place."""

    def __init__(self, target: str | Path, overwrite: bool, what: str):
        self.target = Path(target)
        self.what = what
        if self.target.exists() and not (self.target.is_dir() and not any(self.target.iterdir())):
            if not overwrite:
                raise BadInput("output exists; choose another path or pass --overwrite", self.target)
            if not self.target.is_dir():
                raise BadInput("output exists and is not a directory", self.target)
        self.tmp = temp_path(self.target.resolve())

    def __enter__(self) -> Path:
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():  # left by a killed run whose pid was ours
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise self.fail(e) from e
        return self.tmp

    def commit(self) -> None:
        """Swap the finished temp directory in for the target."""
        old = temp_path(self.tmp.parent / self.target.name, "old")
        parked = False
        try:
            if self.target.exists():  # --overwrite (checked in __init__): park the old output until the swap
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.target, old)
                parked = True
            os.replace(self.tmp, self.target)
        except OSError as e:
            if parked and not self.target.exists():
                os.replace(old, self.target)  # put the previous output back
            raise self.fail(e) from e
        if parked:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def atomic_file(target: str | Path, what: str) -> AtomicFile:
    """``with atomic_file(target, what) as tmp:`` — write tmp; renamed onto target when the block ends
    normally, removed when it raises."""
    return AtomicFile(target, what)


def atomic_dir(target: str | Path, overwrite: bool, what: str) -> AtomicDir:
    """``with atomic_dir(target, overwrite, what) as tmp:`` — fill the directory tmp; swapped in for target
    when the block ends normally, removed when it raises."""
    return AtomicDir(target, overwrite, what)
