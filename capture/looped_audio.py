"""Replay a finite audio source forever, on one continuous timeline and one unbroken clock.

The bundled sample is a few seconds long; streamed to a live viewer it would end before anyone has
opened the page. Looping it keeps the demo alive until Ctrl-C, and the continuous `start_sample` keeps
the scheduler's timeline (and the WebRTC timestamps) monotonic across the seam.

The clock matters as much as the samples: a real-time source paces itself from an origin, and if each
pass took its origin from the moment it was started, every seam would lose the time between the end
of one pass and the start of the next (the live output then runs slower than 25 fps). So each pass
is created with the origin at which its first sample is due: the first pass's origin plus the
samples delivered so far, on one absolute schedule.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from capture.audio_sources import AudioChunk, AudioSource
from pcavs.constants import SAMPLE_RATE


class LoopedAudioSource:
    """Wraps a factory of finite sources; when one is exhausted the next starts where it ended.

    `make_source(start_at)` builds one pass; `start_at` is the time.monotonic() instant at which that
    pass's first sample is due (a real-time `FileAudioSource` takes it as its pacing origin, a source
    without a clock of its own may ignore it). Not thread-safe: one reader thread.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, make_source: Callable[[float], AudioSource]) -> None:
        self._make = make_source
        self._current: AudioSource | None = None
        self._origin: float | None = None  # when timeline sample 0 was due
        self._offset = 0          # timeline position of the current source's sample 0
        self._next_start = 0      # one past the last sample delivered
        self.loops = 0

    def start(self) -> None:
        if self._current is not None:
            return
        if self._origin is None:
            self._origin = time.monotonic()
        self._current = self._make(self._origin + self._offset / SAMPLE_RATE)
        self._current.start()

    def read(self, timeout: float) -> AudioChunk | None:
        if self._current is None:
            return None
        chunk = self._current.read(timeout)
        if chunk is None:
            if self._current.finished:
                self._current.stop()
                self._current = None
                self._offset = self._next_start
                self.loops += 1
                self.start()
            return None
        chunk = replace(chunk, start_sample=chunk.start_sample + self._offset)
        self._next_start = chunk.start_sample + len(chunk.samples)
        return chunk

    @property
    def finished(self) -> bool:
        return False  # by design: only stop() ends it

    def stop(self) -> None:
        if self._current is not None:
            self._current.stop()
            self._current = None
