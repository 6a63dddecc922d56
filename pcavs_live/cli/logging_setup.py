"""Logging for the command-line tools: one compact line per record on stderr.

A live session logs a status line every few seconds; a short format keeps that readable in a terminal,
and the millisecond timestamp is what you need to reason about latency from a log.
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

# Libraries that are chatty at INFO/DEBUG (ICE candidates, numba compilation, image plugins...). They are
# held at WARNING unless the user asks for -vv, so that -v shows our own debug output, not theirs.
NOISY_LOGGERS = ("aioice", "aiortc", "aiohttp.access", "numba", "PIL", "matplotlib", "urllib3", "asyncio")


def verbosity_to_level(verbosity: int) -> int:
    """-1 (quiet) → WARNING, 0 → INFO, 1 or more → DEBUG."""
    if verbosity < 0:
        return logging.WARNING
    if verbosity == 0:
        return logging.INFO
    return logging.DEBUG


def setup_logging(verbosity: int, stream: TextIO | None = None) -> None:
    """Configure the root logger for a CLI run. Safe to call again: handlers are replaced, not stacked
    (tests and a re-invoked `main` would otherwise print every line twice)."""
    level = verbosity_to_level(verbosity)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    third_party = logging.DEBUG if verbosity >= 2 else max(level, logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(third_party)
