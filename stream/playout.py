"""The virtual microphone's delay line: audio pushed slot by slot when frames are released, pulled by an
output device at its own clock, with a constant offset between the two.

The offset between a push and the moment its first sample is played is the queue level at that push.
It starts at a small fixed pre-roll (silence queued ahead of the first slot, absorbing the jitter of
frame release) and every disturbance returns it there instead of letting it drift:

* underrun (frames released late): silence is played, and the next push is preceded by the same
  pre-roll again;
* the queue stays longer than the pre-roll (frames released late in a burst after a stall, a device
  that stalled or runs slower than the audio source): once the level just before every push of a
  whole window has exceeded the pre-roll by more than `tolerance`, the excess (the window's low point
  minus the pre-roll) is dropped, oldest first; a queue that reaches `capacity` is cut back to the
  starting offset at once.

The window is twice the longest gap between pushes in the last `memory_s` seconds (within
[min_window_s, max_window_s]). Why adaptive: when rendering keeps up, slots come every 40 ms and a
hiccup's excess is dropped within a fraction of a second; when rendering is slower than real time,
the scheduler releases the slots it could not render in bursts (the last frame repeated, each slot
with its own audio), the level legitimately climbs within a burst and drains back to the pre-roll
before the next, and a window longer than the gap between bursts sees that drained point and keeps
the voice whole.

Dropped audio and played silence are counted, never silent.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np


class PlayoutBuffer:
    """Bounded FIFO of float32 samples between one pusher and one puller (a device callback).

    Thread-safe; `pull` takes one short lock and never waits. Sizes are in device samples, times in
    seconds of `time.monotonic()` (or the `now` passed to `push`).
    """

    def __init__(self, capacity: int, preroll: int, tolerance: int, min_window_s: float = 0.2,
                 max_window_s: float = 3.0, memory_s: float = 10.0) -> None:
        if not 0 <= preroll < capacity or tolerance < 0 or not 0 < min_window_s <= max_window_s:
            raise ValueError(f"PlayoutBuffer: need 0 <= preroll < capacity (got {preroll}, {capacity}) "
                             "and 0 < min_window_s <= max_window_s")
        self.capacity, self.preroll, self.tolerance = capacity, preroll, tolerance
        self.min_window_s, self.max_window_s, self.memory_s = min_window_s, max_window_s, memory_s
        self._ring = np.zeros(capacity, np.float32)
        self._write = 0            # absolute index one past the newest queued sample
        self._read = 0             # absolute index of the next sample to play
        self._priming = True       # the next push is preceded by the pre-roll
        self._last_push: float | None = None
        self._gaps: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)  # (t, gap)
        self._levels: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)  # (t, level)
        self._last_short = 0.0     # last push whose level was within pre-roll + tolerance
        self._lock = threading.Lock()
        self.underruns = 0         # pulls that ran out of audio (silence was played)
        self.silence_samples = 0   # samples of silence those underruns played
        self.dropped_samples = 0   # queued audio thrown away (see the module doc)
        self.pushed_samples = 0
        self.pulled_samples = 0    # everything the device took, silence included (it shows the device runs)
        self.events: collections.deque[tuple[float, str, int]] = collections.deque(maxlen=256)
        # ^ (time.monotonic(), "underrun" | "dropped", samples) of the most recent disturbances

    @property
    def level(self) -> int:
        """Samples queued (pre-roll included)."""
        with self._lock:
            return self._write - self._read

    @property
    def window_s(self) -> float:
        """The current settling window (see the module doc)."""
        longest = max((gap for _, gap in self._gaps), default=0.0)
        return min(self.max_window_s, max(self.min_window_s, 2.0 * longest))

    def push(self, samples: np.ndarray, now: float | None = None) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        now = time.monotonic() if now is None else now
        with self._lock:
            self.pushed_samples += len(x)
            self._note_gap(now)
            if self._priming:
                self._put(np.zeros(self.preroll, np.float32))
                self._priming = False
            self._settle(now, self._write - self._read)
            room = self.capacity - self.preroll
            if len(x) > room:
                self._drop(now, len(x) - room)
                x = x[len(x) - room:]
            self._put(x)
            if self._write - self._read > self.capacity:  # the device stopped pulling: keep the newest,
                keep = self.preroll + len(x)               # back at the starting offset
                self._drop(now, (self._write - self._read) - keep)
                self._read = self._write - keep

    def _drop(self, now: float, samples: int) -> None:
        self.dropped_samples += samples
        self.events.append((now, "dropped", samples))

    def _note_gap(self, now: float) -> None:
        if self._last_push is None:
            self._last_short = now
        else:
            self._gaps.append((now, now - self._last_push))
        self._last_push = now
        while self._gaps and self._gaps[0][0] < now - self.memory_s:
            self._gaps.popleft()

    def _settle(self, now: float, level: int) -> None:
        window = self.window_s
        self._levels.append((now, level))
        while self._levels and self._levels[0][0] < now - window:
            self._levels.popleft()
        if level <= self.preroll + self.tolerance:
            self._last_short = now
        elif now - self._last_short >= window:  # too long for a whole window: drop the excess
            excess = min(lv for _, lv in self._levels) - self.preroll
            self._read += excess
            self._drop(now, excess)
            self._last_short = now
            self._levels.clear()

    def _put(self, x: np.ndarray) -> None:
        if len(x):
            self._ring[(self._write + np.arange(len(x))) % self.capacity] = x
            self._write += len(x)

    def pull(self, n: int) -> np.ndarray:
        """The next n samples; whatever is missing is silence (and re-primes the pre-roll)."""
        out = np.zeros(n, np.float32)
        with self._lock:
            self.pulled_samples += n
            if self._priming:
                return out
            have = min(n, self._write - self._read)
            if have > 0:
                out[:have] = self._ring[(self._read + np.arange(have)) % self.capacity]
                self._read += have
            if have < n:
                self.underruns += 1
                self.silence_samples += n - have
                self._priming = True
                self.events.append((time.monotonic(), "underrun", n - have))
        return out
