"""The output seam: every destination of rendered frames (virtual camera, WebRTC viewers, mp4 file) is a
`FrameSink`, and `FanOutSink` lets the scheduler drive several of them as one.

Why a fan-out with failure isolation: outputs fail for reasons that have nothing to do with each other
(a disk fills up, a virtual camera is unloaded mid-session). Losing the recording should not take the
live stream down with it, so a sink that raises while writing is logged once, closed and dropped, and
the others keep going. Opening is different: a sink that cannot even open is a configuration problem
the user must hear about before the session starts, so `open` failures propagate.
"""
from __future__ import annotations

import logging
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
    nobody can see. `failures` lists (sink, exception) for status displays.
    """

    def __init__(self, sinks: Sequence[FrameSink]) -> None:
        if not sinks:
            raise ValueError("FanOutSink needs at least one sink")
        self._sinks: list[FrameSink] = list(sinks)
        self._active: list[FrameSink] = []
        self.failures: list[tuple[FrameSink, BaseException]] = []

    @property
    def active(self) -> list[FrameSink]:
        return list(self._active)

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
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
        self.failures = []

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if not self._active:
            raise SinkError(_all_failed_message(self.failures))
        for sink in list(self._active):
            try:
                sink.write(frame, audio, frame_index)
            except Exception as exc:  # isolate: one broken output must not stop the others
                log.error("output %s failed at frame %d and was stopped: %s",
                          type(sink).__name__, frame_index, _one_line(exc))
                log.debug("output %s failure", type(sink).__name__, exc_info=True)  # -v / --debug
                self._active.remove(sink)
                self.failures.append((sink, exc))
                _close_quietly(sink)
        if not self._active:
            raise SinkError(_all_failed_message(self.failures))

    def close(self) -> None:
        active, self._active = self._active, []
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
