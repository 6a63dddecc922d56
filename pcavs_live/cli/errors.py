"""User-facing errors: one actionable line on stderr instead of a traceback.

A user can cause many failures (a missing photo, a busy camera, a wrong key in a config file). Those
deserve a sentence that names the thing to fix, while genuine bugs still deserve a full traceback.
Modules raise `pcavs_live.common.errors.UserError` or a subclass; the entry point wraps its `main` in
`run_with_user_errors`, which draws the line between the two.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from pcavs_live.common.errors import EXIT_USER_ERROR, UserError

__all__ = ["EXIT_USER_ERROR", "EXIT_INTERRUPTED", "UserError", "format_user_error", "run_with_user_errors"]

EXIT_INTERRUPTED = 130  # the shell convention for "terminated by SIGINT" (128 + 2)


def one_line(text: str) -> str:
    """Collapse a message to a single line: foreign exception types (OSError, library errors) sometimes
    carry multi-line text, and the contract with the user is one line per error."""
    return " ".join(str(text).split())


def format_user_error(exc: BaseException) -> list[str]:
    """The lines printed for a handled error: `error: ...` and, when there is one, `hint: ...`."""
    message = one_line(str(exc)) or type(exc).__name__
    lines = [f"error: {message}"]
    hint = getattr(exc, "hint", None)
    if hint:
        lines.append(f"hint: {one_line(hint)}")
    return lines


def run_with_user_errors(main: Callable[[], int], debug: bool, stderr: TextIO | None = None) -> int:
    """Run `main` and turn user-caused failures into a short message and a non-zero exit code.

    Every `UserError` (each module's own error types subclass it) becomes its one line; with `debug`
    the error is re-raised so the traceback shows.
    Ctrl-C is a normal way to stop a live session, so it exits quietly with 130 rather than a traceback.
    Anything else propagates untouched: an unexpected exception is a bug and its traceback is needed.
    """
    stream = stderr if stderr is not None else sys.stderr
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=stream)
        return EXIT_INTERRUPTED
    except UserError as exc:
        if debug:
            raise
        for line in format_user_error(exc):
            print(line, file=stream)
        code = getattr(exc, "exit_code", EXIT_USER_ERROR)
        return code if isinstance(code, int) and code != 0 else EXIT_USER_ERROR
