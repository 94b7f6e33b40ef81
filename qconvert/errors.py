"""User-facing errors: each becomes one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime / I/O failure
EXIT_USAGE = 2  # bad input or usage


class QConvertError(Exception):
    """An error the user can act on. `str(e)` is the whole message (one line)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class BadInput(QConvertError):
    """The input (file, option, model) is wrong: exit 2."""

    exit_code = EXIT_USAGE


class IOFailure(QConvertError):
    """Reading or writing failed (permissions, disk full, device error): exit 1."""

    exit_code = EXIT_FAILURE
