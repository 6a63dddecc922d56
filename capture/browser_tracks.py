"""A browser's microphone and camera, arriving as aiortc remote tracks, as the app's own sources.

`BrowserAudioSource` is an `AudioSource` (capture/audio_sources.py): a coroutine on the WebRTC
server's event loop receives the decoded frames of the remote audio track (aiortc decodes Opus to
48 kHz s16), resamples them to 16 kHz mono float32 with `av.AudioResampler`, and hands them over
in a bounded `DropOldestQueue`. The reader is the session's scheduler thread; when it falls behind,
the oldest chunk is dropped (counted in `dropped_chunks`) and the next chunk's `start_sample` shows
the gap, so the timeline fills it with silence instead of building latency. The track ending (the
browser closed its side) makes the source `finished`.

`BrowserVideoSource` is a real-time `FrameSource` (capture/pose_sources.py) for the `PoseWorker`:
the coroutine keeps only the newest video frame (each replaced one counted in `frames_dropped`); the
conversion to RGB happens in the pose worker's thread, off the event loop.

Both are started and stopped from any thread; the coroutine is scheduled on, and cancelled through,
the loop that owns the track.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from capture.audio_files import finite_audio, warn_nonfinite
from capture.audio_sources import AudioChunk
from pcavs_live.common.queues import DropOldestQueue
from pcavs.constants import SAMPLE_RATE

log = logging.getLogger(__name__)

__all__ = ["BrowserAudioSource", "BrowserVideoSource"]


class _TrackReader:
    """Runs `_consume` on the track's loop from `start()` until the track ends or `stop()`."""

    def __init__(self, track: MediaStreamTrack, loop: asyncio.AbstractEventLoop) -> None:
        self.track, self._loop = track, loop
        self._future: concurrent.futures.Future | None = None
        self._ended = threading.Event()
        self.reading_since: float | None = None   # monotonic time the reader started (None: not yet)

    def _start_reader(self) -> None:
        if self._future is None:
            self.reading_since = time.monotonic()
            self._future = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    frame = await self.track.recv()
                except MediaStreamError:
                    return
                self._on_frame(frame)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a broken track ends this source, loudly
            log.error("browser %s track reader failed: %s", self.track.kind, exc, exc_info=True)
        finally:
            self._ended.set()
            self._on_end()

    def _stop_reader(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            try:
                self._loop.call_soon_threadsafe(future.cancel)
            except RuntimeError:       # the loop is already closed: nothing runs any more
                pass
        self._ended.set()

    def _on_frame(self, frame) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _on_end(self) -> None:
        pass


class BrowserAudioSource(_TrackReader):
    """Remote audio track → `AudioChunk`s of 16 kHz mono float32 on the track's own sample timeline."""

    sample_rate = SAMPLE_RATE

    def __init__(self, track: MediaStreamTrack, loop: asyncio.AbstractEventLoop, max_queue_ms: int = 2000) -> None:
        super().__init__(track, loop)
        # aiortc delivers 20 ms frames; the queue holds `max_queue_ms` of them before dropping the oldest.
        self._queue: DropOldestQueue = DropOldestQueue(max(2, max_queue_ms // 20))
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._next_sample = 0
        self.frames_received = 0
        self.nonfinite_samples = 0                 # (Opus decodes to s16, so 0 unless a decoder misbehaves)
        self.last_frame_at: float | None = None   # monotonic time of the newest frame (liveness)

    @property
    def dropped_chunks(self) -> int:
        return self._queue.dropped

    def _on_frame(self, frame: av.AudioFrame) -> None:
        self.frames_received += 1
        now = time.monotonic()
        self.last_frame_at = now
        for out in self._resampler.resample(frame):
            samples = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if not len(samples):
                continue
            samples, bad = finite_audio(samples)
            if bad:
                if not self.nonfinite_samples:
                    warn_nonfinite(bad, "browser audio")
                self.nonfinite_samples += bad
            self._queue.put(AudioChunk(np.clip(samples, -1.0, 1.0), self._next_sample, now))
            self._next_sample += len(samples)

    def _on_end(self) -> None:
        self._queue.close()              # readers drain what is left, then `finished`

    # AudioSource
    def start(self) -> None:
        self._start_reader()

    def read(self, timeout: float):
        return self._queue.get(timeout)

    @property
    def finished(self) -> bool:
        return self._queue.closed and len(self._queue) == 0

    def stop(self) -> None:
        self._stop_reader()
        self._queue.close()


class BrowserVideoSource(_TrackReader):
    """Remote video track → the newest frame only, for the pose worker's reader thread."""

    realtime = True

    def __init__(self, track: MediaStreamTrack, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(track, loop)
        self._cond = threading.Condition()
        self._slot: tuple[av.VideoFrame, float] | None = None
        self._closed = False
        self.frames_received = 0
        self.frames_dropped = 0

    def start(self) -> None:
        self._start_reader()

    def _on_frame(self, frame: av.VideoFrame) -> None:
        with self._cond:
            self.frames_received += 1
            if self._slot is not None:
                self.frames_dropped += 1
            self._slot = (frame, time.monotonic())
            self._cond.notify_all()

    def _on_end(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def read(self) -> tuple[np.ndarray, float] | None:
        """Wait for a frame newer than the last one read; None once the track ended or close()."""
        self._start_reader()
        with self._cond:
            while self._slot is None and not self._closed:
                self._cond.wait(0.2)
            if self._slot is None:
                return None
            (frame, captured_at), self._slot = self._slot, None
        return frame.to_ndarray(format="rgb24"), captured_at

    def close(self) -> None:
        self._stop_reader()
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()
