"""A FrameSink that hands every frame to another sink a fixed time after it was released.

Why: the virtual microphone plays each slot's audio a constant pre-roll + device latency after the
frame's release (stream/vmic.py). A virtual camera sends at once, so without this the lips would lead
the voice by that constant. Delaying the camera by the same amount makes both carry the same instant.

The delay is read at each write (a callable), because it is only known once the microphone's device is
open. Frames wait in a bounded queue served by one thread the sink owns (started by `open`, joined by
`close`); a full queue loses its oldest frame (`dropped`). An error in the wrapped sink is raised from
the next `write`, so the fan-out's failure isolation still sees it.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

from pcavs_live.common.workers import Worker

log = logging.getLogger(__name__)


class DelayedSink:
    """Forwards write(frame, audio, k) to `sink` `delay_s()` seconds after the call, from its own thread."""

    def __init__(self, sink, delay_s: Callable[[], float], max_queue: int = 50) -> None:
        self.sink, self._delay_s, self._max_queue = sink, delay_s, max_queue
        self._queue: collections.deque[tuple[float, np.ndarray, np.ndarray, int]] = collections.deque()
        self._cond = threading.Condition()
        self._worker: Worker | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self.dropped = 0     # frames lost because the queue was full (the wrapped sink is stuck)
        self.sent = 0
        self.late: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        # ^ (due, seconds late) of recent frames handed over more than `late_s` after they were due
        self.late_s = 0.005
        self.stop_timeout_s = 10.0   # close() waits this long for a write in progress

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.sink.open(width, height, fps, sample_rate)
        self._stopping, self._error = False, None
        self._worker = Worker(self._serve, f"delay-{type(self.sink).__name__}")
        self._worker.start()

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if self._worker is None:
            raise RuntimeError("DelayedSink.write called before open()")
        due = time.monotonic() + max(0.0, float(self._delay_s()))
        with self._cond:
            if self._error is not None:
                raise self._error
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((due, frame, audio, frame_index))
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0][0] > time.monotonic()):
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                due, frame, audio, k = self._queue.popleft()
            lateness = time.monotonic() - due
            if lateness > self.late_s:  # this thread woke late (a busy machine): a measurable lag
                self.late.append((due, lateness))
            try:
                self.sink.write(frame, audio, k)
                self.sent += 1
            except BaseException as exc:  # reported to the writer; this thread is done
                with self._cond:
                    self._error = exc
                return

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            with self._cond:
                self._stopping = True
                self._queue.clear()  # the session is ending: frames not yet due are not shown
                self._cond.notify()
            # A wrapped sink stuck in write() is named, not waited on forever, and not closed under the
            # write (as the pose worker's camera).
            if not worker.join(self.stop_timeout_s):
                return
        self.sink.close()
