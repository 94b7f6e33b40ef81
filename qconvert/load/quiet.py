"""transformers speaks on stderr (warnings, progress bars) and raises multi-line errors; qconvert's rule is
one line of its own. Every call into transformers that may talk goes through `quiet_transformers()`, and
every error it raises is reported with `one_line(e)` (the full text stays under --debug)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level, its progress bars off and Python warnings muted while inside."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bar is the only one on stderr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type's name)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__
