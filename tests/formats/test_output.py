"""formats/output.py: every output is written under `.{name}.tmp-{pid}` next to its target and renamed into
place only when complete; any failure removes it, leaves the target as it was, and an OSError becomes the one
IOFailure line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qconvert.errors import EXIT_FAILURE, BadInput, IOFailure
from qconvert.formats import output
from qconvert.formats.output import atomic_dir, atomic_file


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_file_is_renamed_into_place(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    with atomic_file(target, "test file") as tmp:
        assert tmp == tmp_path / f".t.bin.tmp-{os.getpid()}"
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_file_error_leaves_the_target_as_it_was(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_file(target, "test file") as tmp:
        tmp.write_bytes(b"partial")
        raise error
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_file_os_error_is_one_io_failure_line(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    with pytest.raises(IOFailure) as info, atomic_file(target, "test file") as tmp:
        tmp.write_bytes(b"partial")
        raise _disk_full()
    assert str(info.value) == (f"{target}: cannot write test file: No space left on device "
                               "(partial output removed)")
    assert info.value.exit_code == EXIT_FAILURE
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_removes_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    def refuse(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(output.os, "replace", refuse)
    with pytest.raises(IOFailure, match="cannot write test file: Invalid cross-device link"):
        with atomic_file(tmp_path / "t.bin", "test file") as tmp:
            tmp.write_bytes(b"done")
    assert list(tmp_path.iterdir()) == []


def test_dir_replaces_an_old_output_only_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(BadInput, match="output exists; choose another path or pass --overwrite"):
        atomic_dir(target, False, "checkpoint")
    with atomic_dir(target, True, "checkpoint") as tmp:
        assert tmp == tmp_path / f".out.tmp-{os.getpid()}"
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()
    assert [p.name for p in target.iterdir()] == ["new.txt"] and list(tmp_path.iterdir()) == [target]


def test_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(BadInput, match="output exists and is not a directory"):
        atomic_dir(tmp_path / "out", True, "checkpoint")


def test_failed_swap_puts_the_old_output_back(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def second_fails(src, dst):
        if Path(src).name.startswith(".out.tmp-"):  # the new output: after the old one was parked
            raise _disk_full()
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", second_fails)
    with pytest.raises(IOFailure) as info, atomic_dir(target, True, "checkpoint") as tmp:
        (tmp / "new.txt").write_text("new")
    assert str(info.value) == (f"{target}: cannot write checkpoint: No space left on device "
                               "(partial output removed)")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and list(tmp_path.iterdir()) == [target]


def test_dir_error_removes_the_temp_dir(tmp_path: Path) -> None:
    with pytest.raises(IOFailure, match="cannot write checkpoint: No space left on device"):
        with atomic_dir(tmp_path / "out", False, "checkpoint") as tmp:
            (tmp / "part").write_text("x")
            raise _disk_full()
    assert list(tmp_path.iterdir()) == []
