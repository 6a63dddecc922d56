"""Replay a finite audio source forever, on one continuous timeline.

The bundled sample is a few seconds long; streamed to a live viewer it would end before anyone has
opened the page. Looping it keeps the demo alive until Ctrl-C, and the continuous `start_sample` keeps
the scheduler's timeline (and the WebRTC timestamps) monotonic across the seam.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from capture.audio_sources import AudioChunk, AudioSource
from pcavs.constants import SAMPLE_RATE


class LoopedAudioSource:
    """Wraps a factory of finite sources; when one is exhausted the next starts where it ended."""

    sample_rate = SAMPLE_RATE

    def __init__(self, make_source: Callable[[], AudioSource]) -> None:
        self._make = make_source
        self._current: AudioSource | None = None
        self._offset = 0          # timeline position of the current source's sample 0
        self._next_start = 0      # one past the last sample delivered
        self.loops = 0

    def start(self) -> None:
        self._current = self._make()
        self._current.start()

    def read(self, timeout: float) -> AudioChunk | None:
        if self._current is None:
            return None
        chunk = self._current.read(timeout)
        if chunk is None:
            if self._current.finished:
                self._current.stop()
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
