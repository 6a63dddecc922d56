"""The one exception type for everything a user can cause.

A user can cause many failures (a missing photo, a busy camera, a wrong key in a config file, a GPU
that is not there). Each deserves one sentence that names the thing to fix, while genuine bugs still
deserve a traceback. Every module raises `UserError` or a subclass of it (so callers can still catch
the narrow kind), and the entry point turns exactly these into one `error:` line. This module sits at
the bottom of the import graph so that every layer can use it.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A failure the user can fix. `message` is one line naming the file/device/key at fault; `hint`
    (optional) is one line saying what to do about it."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(self, message: str = "", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message
