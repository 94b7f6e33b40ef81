"""The one progress renderer of every long step: a rich bar on stderr, silent when stderr is not a terminal
(CI logs and pipes get the result lines only) or when --json asks for a clean stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Bar:
    """One task of a live bar (or nothing at all): ``update`` the current one, ``start`` another."""

    def __init__(self, progress: Any = None, fields: tuple[str, ...] = ()):
        self._progress = progress
        self._fields = fields
        self._task = self.start("", None) if progress is not None else None

    def start(self, label: str, total: int | None) -> Callable[[int], None]:
        """A new task; the returned function advances it by n steps (eval's chunks)."""
        if self._progress is None:
            return lambda n: None
        task = self._progress.add_task(label, total=total, **{f: "" for f in self._fields})
        self._task = task
        return lambda n: self._progress.advance(task, n)

    def update(self, done: int | None = None, total: int | None = None, text: str | None = None,
               **fields: str) -> None:
        if self._progress is None:
            return
        changes: dict[str, Any] = {"completed": done, "total": total, "description": text, **fields}
        self._progress.update(self._task, **{k: v for k, v in changes.items() if v is not None})


@contextmanager
def progress_bar(*, fields: tuple[str, ...] = (), eta: bool = False, enabled: bool = True) -> Iterator[Bar]:
    """Description, bar, done/total, the named extra ``fields``, elapsed time (and ETA)."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not enabled or not console.is_terminal:
        yield Bar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(f"{{task.fields[{f}]}}") for f in fields), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        yield Bar(progress, fields)


@contextmanager
def layer_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int, str], None]]:
    """The (done, total, text) callback the pipelines report decoder layers through."""
    with progress_bar(enabled=enabled) as bar:
        bar.update(text=label)
        yield lambda done, total, text: bar.update(done, total, f"{label} {text}")


def print_note(note: str | None) -> None:
    """One `note: ...` line on stderr (what a quantized source was dequantized from), outside any bar."""
    if note:
        import sys

        print(f"note: {note}", file=sys.stderr)
