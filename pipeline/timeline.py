"""The audio timeline that clocks the live loop: raw samples and mel rows on one absolute index.

Output frame k is shown during [40k, 40k+40) ms of the audio and needs mel rows [4k, 4k+20), i.e.
audio up to 40k+200 ms (spec §4). Keeping both raw audio and mel rows here, with absolute indices and a
bounded history, lets the scheduler ask "which frames are ready?", "what is frame k's mel window?" and
"which 40 ms of audio go out with frame k?" without any growing buffer.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from pcavs.constants import FPS, HOP, MEL_ROWS_PER_FRAME, N_MELS, SAMPLE_RATE, SAMPLES_PER_FRAME, WINDOW_ROWS
from pcavs.mel import StreamingMel, samples_needed_for_frame

__all__ = ["AudioTimeline"]


class _Ring:
    """A bounded 2-D array indexed by absolute row number; rows older than `capacity` are forgotten."""

    def __init__(self, capacity: int, width: int | None) -> None:
        shape = (capacity,) if width is None else (capacity, width)
        self._buf = np.zeros(shape, dtype=np.float32)
        self._cap = capacity
        self.end = 0  # absolute index one past the newest row

    def extend(self, rows: np.ndarray) -> None:
        total = len(rows)
        kept = rows[-self._cap:]  # rows older than the capacity would be overwritten at once anyway
        idx = (self.end + total - len(kept) + np.arange(len(kept))) % self._cap
        self._buf[idx] = kept
        self.end += total

    def get(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop); rows outside what is held (negative, forgotten or not yet written) are 0."""
        out_shape = (stop - start,) + self._buf.shape[1:]
        out = np.zeros(out_shape, dtype=np.float32)
        lo, hi = max(start, self.end - self._cap, 0), min(stop, self.end)
        if hi > lo:
            out[lo - start:hi - start] = self._buf[np.arange(lo, hi) % self._cap]
        return out


class AudioTimeline:
    """Raw audio + mel rows of one source. Not thread-safe: owned by the scheduler's loop."""

    def __init__(self, mel: StreamingMel, history_seconds: float = 10.0) -> None:
        self._mel = mel
        self._audio = _Ring(int(history_seconds * SAMPLE_RATE), None)
        self._rows = _Ring(int(history_seconds * SAMPLE_RATE / HOP), N_MELS)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4096)  # (samples so far, captured_at)
        self._final_frames: int | None = None

    @property
    def samples(self) -> int:
        return self._audio.end

    @property
    def finished(self) -> bool:
        return self._final_frames is not None

    def append(self, samples: np.ndarray, captured_at: float) -> None:
        if self.finished:
            raise RuntimeError("AudioTimeline.append after finish()")
        self._audio.extend(np.asarray(samples, dtype=np.float32))
        self._rows.extend(self._mel.push(samples))
        self._arrivals.append((self._audio.end, captured_at))

    def finish(self) -> None:
        """End of a finite source: flush the mel tail and pad with silence rows so that every 40 ms slot
        that holds audio gets a frame (25 fps × duration frames, where upstream stops 4 frames short)."""
        if self.finished:
            return
        self._rows.extend(self._mel.finish())
        frames = math.ceil(self._audio.end / SAMPLES_PER_FRAME)
        needed_rows = (frames - 1) * MEL_ROWS_PER_FRAME + WINDOW_ROWS if frames else 0
        if needed_rows > self._rows.end:
            self._rows.extend(np.zeros((needed_rows - self._rows.end, N_MELS), dtype=np.float32))
        self._final_frames = frames

    @property
    def frames_ready(self) -> int:
        """Number of output frames whose whole mel window is available (frames 0..n-1)."""
        avail = (self._rows.end - WINDOW_ROWS) // MEL_ROWS_PER_FRAME + 1 if self._rows.end >= WINDOW_ROWS else 0
        if self._final_frames is not None:
            return min(max(avail, 0), self._final_frames)
        return max(avail, 0)

    @property
    def total_frames(self) -> int | None:
        """Frame count of a finished source, else None."""
        return self._final_frames

    def mel_window(self, k: int) -> np.ndarray:
        """(1,80,20) window for frame k: rows [4k, 4k+20) transposed (spec §4)."""
        start = MEL_ROWS_PER_FRAME * k
        return self._rows.get(start, start + WINDOW_ROWS).T[None].copy()

    def slot_audio(self, k: int) -> np.ndarray:
        """The 640 raw samples shown with frame k (zeros past the end of the source)."""
        start = SAMPLES_PER_FRAME * k
        return self._audio.get(start, start + SAMPLES_PER_FRAME)

    def ready_at(self, k: int) -> float | None:
        """time.monotonic() at which the audio completing frame k's window was captured, if known."""
        needed = min(samples_needed_for_frame(k), self._audio.end)
        for end, t in self._arrivals:
            if end >= needed:
                return t
        return None
