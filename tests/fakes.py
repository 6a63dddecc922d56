"""Test stand-ins shared by the test files: one of each, instead of a copy per file.

* `RecordingSink` — a FrameSink that records every slot (frame, audio, index, when), optionally failing
  at one slot.
* `ListAudioSource` — a finite AudioSource over an array on its own thread (a Worker), optionally paced
  in real time and skipping blocks as a source that dropped audio does; `ChunkSource` — the same audio
  with every block ready at once (a file read offline), no thread.
* `ListFrameSource` — pose frames from a list (with their own capture times, or stamped when read);
  `RepeatFrameSource` — one frame again and again until closed (a still camera view).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from capture.audio_sources import AudioChunk
from pcavs_live.common.workers import Worker


class RecordingSink:
    """FrameSink recording what it is given. `fail_at`: the slot whose write raises (a camera unplugged)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []
        self.indices: list[int] = []
        self.times: list[float] = []          # time.monotonic() of each write
        self.opened: tuple | None = None      # (width, height, fps, sample_rate) once opened
        self.closed = False
        self.fail_at = fail_at

    def open(self, width, height, fps, sample_rate):
        self.opened = (width, height, fps, sample_rate)

    def write(self, frame, audio, frame_index):
        if frame_index == self.fail_at:
            raise RuntimeError("camera unplugged")
        self.times.append(time.monotonic())
        self.frames.append(frame)
        self.audio.append(audio)
        self.indices.append(frame_index)

    @property
    def got(self) -> list[tuple[int, float]]:
        """(slot, when written) pairs."""
        return list(zip(self.indices, self.times))

    def close(self):
        self.closed = True


class ListAudioSource:
    """A finite audio source delivering fixed blocks from its own thread, optionally paced in real time,
    optionally skipping blocks (their samples never arrive, so the next chunk's start jumps)."""

    sample_rate = 16000

    def __init__(self, audio: np.ndarray, block: int = 320, realtime: bool = False,
                 skip_blocks: tuple[int, ...] = ()) -> None:
        self._audio, self._block, self._realtime, self._skip = audio, block, realtime, set(skip_blocks)
        self._q: queue.Queue[AudioChunk] = queue.Queue(maxsize=8)
        self._done = threading.Event()
        self._worker = Worker(self._run, "list-audio")

    def start(self) -> None:
        self._worker.start()

    def _run(self) -> None:
        stop = self._worker.stopping
        t0 = time.monotonic()
        for i, s in enumerate(range(0, len(self._audio), self._block)):
            if stop.is_set():
                break
            if self._realtime:
                time.sleep(max(0.0, t0 + (s + self._block) / 16000 - time.monotonic()))
            if i in self._skip:
                continue
            chunk = AudioChunk(self._audio[s:s + self._block], s, time.monotonic())
            while not stop.is_set():
                try:
                    self._q.put(chunk, timeout=0.05)
                    break
                except queue.Full:
                    pass
        self._done.set()

    def read(self, timeout: float) -> AudioChunk | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def finished(self) -> bool:
        return self._done.is_set() and self._q.empty()

    def stop(self) -> None:
        self._worker.stop(5.0)


class ChunkSource:
    """A finite AudioSource that has every block ready at once (as a file read offline), optionally
    skipping some blocks the way a source that dropped audio does."""

    def __init__(self, audio: np.ndarray, block: int = 320, skip_blocks: tuple[int, ...] = ()) -> None:
        self._chunks = [AudioChunk(audio[s:s + block], s, 0.0) for i, s in enumerate(range(0, len(audio), block))
                        if i not in skip_blocks]
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def read(self, timeout: float) -> AudioChunk | None:
        return self._chunks.pop(0) if self._chunks else None

    @property
    def finished(self) -> bool:
        return not self._chunks

    def stop(self) -> None:
        self.stopped = True


class ListFrameSource:
    """Pose frames from a list. `times`: each frame's capture time (else the time it is read);
    `realtime` selects the pose worker's drop-stale reader; `on_read(n)` runs before read n."""

    def __init__(self, frames: Sequence[np.ndarray], times: Sequence[float] | None = None, realtime: bool = False,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.frames = list(frames)
        self.times = None if times is None else list(times)
        self.realtime = realtime
        self.closed = False
        self.reads = 0
        self.on_read = on_read

    def read(self):
        if self.on_read is not None:
            self.on_read(self.reads)
        self.reads += 1
        if not self.frames:
            return None
        return self.frames.pop(0), (time.monotonic() if self.times is None else self.times.pop(0))

    def close(self):
        self.closed = True


class RepeatFrameSource:
    """A live source showing one frame every `interval` seconds until closed (a still camera view)."""

    realtime = True

    def __init__(self, frame, interval=0.0):
        self.frame, self.interval, self.closed = frame, interval, False

    def read(self):
        if self.closed:
            return None
        time.sleep(self.interval)
        return self.frame, time.monotonic()

    def close(self):
        self.closed = True
