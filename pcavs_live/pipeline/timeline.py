"""The audio timeline that clocks the live and offline loops: raw samples and mel rows on one absolute index.

Which frame each slot shows (spec §4): the model was trained to pair video frame i with the mel window of
the 5-frame clip centred on it, rows [4(i−2), 4(i−2)+20), i.e. audio [40i−150, 40i+120) ms. By default
slot t (shown during [40t, 40t+40) ms) shows the model's frame i = t: its window starts at row 4(t−2),
rows before 0 are zeros (the mel of silence), and the frame can be made once audio up to 40t+120 ms
exists — 120 ms of look-ahead. Upstream's `inference.py` never generates frames 0 and 1 and numbers its
output from 0, so it shows frame i = t+2 in slot t (window rows [4t, 4t+20), 200 ms of look-ahead, lips
80 ms early); `upstream_frame_numbering=True` reproduces that for side-by-side comparisons.

Keeping both raw audio and mel rows here, with absolute indices and a bounded history, lets the loop ask
"which slots are ready?", "what is slot t's mel window?" and "which 40 ms of audio go out with slot t?"
without any growing buffer.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from pcavs.constants import HOP, MEL_ROWS_PER_FRAME, N_MELS, SAMPLE_RATE, SAMPLES_PER_FRAME, WINDOW_ROWS
from pcavs.mel import StreamingMel, samples_needed_for_frame

__all__ = ["AudioTimeline", "CLIP_CENTRE", "model_frame_index", "window_index"]

# The audio window is the 5-frame clip centred on its frame: it starts this many frames earlier (upstream's
# num_frames_per_clip // 2).
CLIP_CENTRE = WINDOW_ROWS // MEL_ROWS_PER_FRAME // 2


def model_frame_index(slot: int, upstream_frame_numbering: bool = False) -> int:
    """The model's video frame i shown in output slot `slot`: the slot itself, or slot + 2 with upstream's
    output numbering. Frame i pairs with pose-video frame i (ping-ponged) and window `window_index`."""
    return slot + CLIP_CENTRE if upstream_frame_numbering else slot


def window_index(slot: int, upstream_frame_numbering: bool = False) -> int:
    """Index k of the mel window rows [4k, 4k+20) that slot `slot` is rendered from (k is upstream's
    output frame number; negative for the first two slots by default, whose leading rows are silence)."""
    return model_frame_index(slot, upstream_frame_numbering) - CLIP_CENTRE


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

    def __init__(self, mel: StreamingMel, history_seconds: float = 10.0,
                 upstream_frame_numbering: bool = False) -> None:
        self._mel = mel
        self.upstream_frame_numbering = upstream_frame_numbering
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
        needed_rows = self._window_start(frames - 1) + WINDOW_ROWS if frames else 0
        if needed_rows > self._rows.end:
            self._rows.extend(np.zeros((needed_rows - self._rows.end, N_MELS), dtype=np.float32))
        self._final_frames = frames

    def _window_start(self, slot: int) -> int:
        return MEL_ROWS_PER_FRAME * window_index(slot, self.upstream_frame_numbering)

    @property
    def frames_ready(self) -> int:
        """Number of output slots whose whole mel window is available (slots 0..n-1)."""
        first_end = self._window_start(0) + WINDOW_ROWS  # rows slot 0 needs; each later slot needs 4 more
        avail = (self._rows.end - first_end) // MEL_ROWS_PER_FRAME + 1 if self._rows.end >= first_end else 0
        if self._final_frames is not None:
            return min(avail, self._final_frames)
        return avail

    @property
    def total_frames(self) -> int | None:
        """Frame count of a finished source, else None."""
        return self._final_frames

    def mel_window(self, k: int) -> np.ndarray:
        """(1,80,20) window for slot k: rows [4(k−2), 4(k−2)+20) by default, [4k, 4k+20) with upstream
        numbering, transposed (spec §4); rows before 0 are zeros."""
        start = self._window_start(k)
        return self._rows.get(start, start + WINDOW_ROWS).T[None].copy()

    def slot_audio(self, k: int) -> np.ndarray:
        """The 640 raw samples shown with frame k (zeros past the end of the source)."""
        start = SAMPLES_PER_FRAME * k
        return self._audio.get(start, start + SAMPLES_PER_FRAME)

    def samples_needed(self, k: int) -> int:
        """Samples from the start of the source before slot k can be rendered: 40k+120 ms by default
        (40k+200 ms with upstream numbering)."""
        return samples_needed_for_frame(window_index(k, self.upstream_frame_numbering))

    def ready_at(self, k: int) -> float | None:
        """time.monotonic() at which the audio completing slot k's window was captured, if known."""
        needed = min(self.samples_needed(k), self._audio.end)
        for end, t in self._arrivals:
            if end >= needed:
                return t
        return None
