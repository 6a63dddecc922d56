"""The output seam: every destination of rendered frames (virtual camera, WebRTC viewers, mp4 file) is a
`FrameSink`, and `FanOutSink` lets the scheduler drive several of them as one.

Why a fan-out with failure isolation: outputs fail for reasons that have nothing to do with each other
(a disk fills up, a virtual camera is unloaded mid-session). Losing the recording should not take the
live stream down with it, so a sink that raises while writing is logged once, closed and dropped, and
the others keep going. Opening is different: a sink that cannot even open is a configuration problem
the user must hear about before the session starts, so `open` failures propagate.

Sinks can also come and go while the session runs (`add`/`remove`: the studio's "share to room" turned
on and off): the scheduler's thread iterates the list in `write`, so the list is copy-on-write — a
change builds a new list under a small lock and swaps it in, and `write` iterates whatever list it
read, taking no lock. No lock is ever held across a write, and the other sinks see every slot once.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from pcavs_live.common.errors import UserError

log = logging.getLogger(__name__)


@runtime_checkable
class FrameSink(Protocol):
    """Receives the output stream frame by frame, from the scheduler's thread.

    `open` is called once before the first frame; `write` once per 40 ms slot with the RGB uint8
    (H, W, 3) frame and the float32 mono audio of exactly that slot (sample_rate / fps samples), so a
    sink that plays them together keeps the lips in sync; `close` once at the end (also after errors).
    """

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None: ...

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None: ...

    def close(self) -> None: ...


class SinkError(UserError):
    """Every output of a `FanOutSink` has failed: there is nothing left to stream to."""


class FanOutSink:
    """Writes each frame to several sinks; a sink that raises in `write` is closed and dropped.

    When the last remaining sink fails, `write` raises `SinkError`: carrying on would render frames
    nobody can see. `failures` lists (sink, exception) for status displays. `add`/`remove` change the
    sinks of a running fan-out from another thread (see the module docstring).
    """

    def __init__(self, sinks: Sequence[FrameSink]) -> None:
        if not sinks:
            raise ValueError("FanOutSink needs at least one sink")
        self._sinks: list[FrameSink] = list(sinks)
        self._active: list[FrameSink] = []     # replaced, never mutated in place (write iterates it unlocked)
        self.failures: list[tuple[FrameSink, BaseException]] = []
        self._lock = threading.Lock()          # serialises changes of the lists, never held across a write
        self._params: tuple[int, int, int, int] | None = None   # open's arguments, for sinks added later
        self._closed = False
        self._writing = False                  # the scheduler's thread is inside write
        self._writes = 0                       # writes finished (remove waits for the one in flight)

    @property
    def active(self) -> list[FrameSink]:
        return list(self._active)

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        with self._lock:  # an `add` meanwhile waits, then opens its sink with these arguments
            opened: list[FrameSink] = []
            try:
                for sink in self._sinks:
                    sink.open(width, height, fps, sample_rate)
                    opened.append(sink)
            except BaseException:
                for sink in opened:  # leave nothing half-open behind the error the user will see
                    _close_quietly(sink)
                raise
            self._active = opened
            self._params = (width, height, fps, sample_rate)
            self.failures = []

    def add(self, sink: FrameSink) -> bool:
        """Add a sink (any thread). Before `open` it is opened with the others; after, it is opened here
        (so it must open quickly: `stream.whip.RoomShare` returns at once) and gets every slot from the
        next write on. False (and the sink closed) when the fan-out is already closed."""
        with self._lock:
            params, closed = self._params, self._closed
            if params is None and not closed:
                self._sinks = [*self._sinks, sink]
                return True
        if closed:
            _close_quietly(sink)
            return False
        sink.open(*params)
        with self._lock:
            if not self._closed:
                self._sinks = [*self._sinks, sink]
                self._active = [*self._active, sink]
                return True
        _close_quietly(sink)
        return False

    def remove(self, sink: FrameSink, timeout: float = 1.0) -> bool:
        """Take a sink out (any thread) without closing it (the caller does, e.g. a WHIP DELETE that may
        take seconds). When this returns, no write to it is in flight (a write that had already read
        the old list is waited for, at most `timeout`). False when it was not there."""
        with self._lock:
            found = sink in self._sinks or sink in self._active
            self._sinks = [s for s in self._sinks if s is not sink]
            self._active = [s for s in self._active if s is not sink]
            writing, writes = self._writing, self._writes
        if found and writing:
            deadline = time.monotonic() + timeout
            while self._writes == writes and time.monotonic() < deadline:
                time.sleep(0.002)
        return found

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        self._writing = True     # before the list is read: a `remove` that sees False swapped it first
        active = self._active    # one list for this slot: a concurrent add/remove swaps in a new one
        try:
            if not active:
                raise SinkError(_all_failed_message(self.failures))
            for sink in active:
                try:
                    sink.write(frame, audio, frame_index)
                except Exception as exc:  # isolate: one broken output must not stop the others
                    log.error("output %s failed at frame %d and was stopped: %s",
                              type(sink).__name__, frame_index, _one_line(exc))
                    log.debug("output %s failure", type(sink).__name__, exc_info=True)  # -v / --debug
                    with self._lock:
                        self._active = [s for s in self._active if s is not sink]
                        self._sinks = [s for s in self._sinks if s is not sink]
                    self.failures.append((sink, exc))
                    _close_quietly(sink)
        finally:
            self._writing = False
            self._writes += 1
        if not self._active:
            raise SinkError(_all_failed_message(self.failures))

    def close(self) -> None:
        with self._lock:
            active, self._active, self._closed = self._active, [], True
        for sink in active:
            _close_quietly(sink)


def _close_quietly(sink: FrameSink) -> None:
    try:
        sink.close()
    except Exception as exc:
        log.warning("closing output %s failed: %s", type(sink).__name__, _one_line(exc))
        log.debug("closing output %s", type(sink).__name__, exc_info=True)


def _one_line(exc: BaseException) -> str:
    """A failing output is reported in one line (its traceback only at debug level: -v or --debug);
    library errors sometimes carry multi-line text."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _all_failed_message(failures: Sequence[tuple[FrameSink, BaseException]]) -> str:
    if not failures:
        return "no output is open (FanOutSink.open was not called)"
    sink, exc = failures[-1]
    return f"every output has failed; the last was {type(sink).__name__}: {' '.join(str(exc).split())}"
