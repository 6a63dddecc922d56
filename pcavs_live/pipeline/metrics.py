"""Live pipeline metrics: what a person watching the stream wants to know, as one snapshot dict.

Written by the scheduler's loop, read by the terminal status line and the web page's /stats poll from
other threads, so every access goes through one lock and the history is bounded.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FrameRecord:
    frame_index: int
    generated: bool              # False: the slot repeats the previous frame (no new one was ready)
    emitted_at: float            # time.monotonic()
    latency_ms: float | None     # the slot's audio captured → slot handed to the sinks (voice to output)
    generator_ms: float | None
    audio_ms: float | None
    late: bool = False           # a new frame, but rendered for an earlier slot (it missed its own)


class LiveMetrics:
    """Rolling statistics over the last `window` emitted frames plus running totals."""

    def __init__(self, window: int = 100) -> None:
        self._lock = threading.Lock()
        self._recent: deque[FrameRecord] = deque(maxlen=window)
        self._emitted = 0
        self._generated = 0
        self._repeated = 0  # slots that showed an earlier frame again (no new one was ready)
        self._late = 0
        self._discarded = 0
        self._input_silence_ms = 0.0
        self._latency_budget_ms: float | None = None
        self._started = time.monotonic()
        self._pose: dict[str, object] = {}
        self._watched: dict[str, Callable[[], object]] = {}

    def record(self, rec: FrameRecord) -> None:
        with self._lock:
            self._recent.append(rec)
            self._emitted += 1
            if rec.generated:
                self._generated += 1
                self._late += rec.late
            else:
                self._repeated += 1

    def set_pose_status(self, **status: object) -> None:
        with self._lock:
            self._pose = dict(status)

    def set_latency_budget(self, ms: float) -> None:
        """The live loop's fixed output latency after the slot's frame became renderable."""
        with self._lock:
            self._latency_budget_ms = ms

    def set_loop_totals(self, discarded: int, input_silence_ms: float) -> None:
        """Running totals of the live loop: rendered frames never shown (a newer one was ready for the
        same output slot) and input audio the source lost, replaced by silence."""
        with self._lock:
            self._discarded = discarded
            self._input_silence_ms = input_silence_ms

    def watch(self, key: str, read: Callable[[], object]) -> None:
        """Put `read()` into every snapshot as `key` (a counter kept by its owner, e.g. the engine's
        `frames_nonfinite`)."""
        with self._lock:
            self._watched[key] = read

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            watched = dict(self._watched)
            recent = list(self._recent)
            snap: dict[str, object] = {
                "frames_out": self._emitted,
                "frames_generated": self._generated,
                "frames_repeated": self._repeated,
                "frames_late": self._late,
                "frames_discarded": self._discarded,
                "input_silence_ms": round(self._input_silence_ms, 1),
                "latency_budget_ms": None if self._latency_budget_ms is None else round(self._latency_budget_ms, 1),
                "uptime_s": round(time.monotonic() - self._started, 1),
                **self._pose,
            }
        snap.update({key: read() for key, read in watched.items()})
        gen = [r for r in recent if r.generated]
        lat = [r.latency_ms for r in recent if r.latency_ms is not None]
        gms = [r.generator_ms for r in gen if r.generator_ms is not None]
        snap["latency_ms_median"] = round(statistics.median(lat), 1) if lat else None
        snap["latency_ms_max"] = round(max(lat), 1) if lat else None
        snap["generator_ms_median"] = round(statistics.median(gms), 1) if gms else None
        if len(gen) >= 2 and gen[-1].emitted_at > gen[0].emitted_at:
            snap["generated_fps"] = round((len(gen) - 1) / (gen[-1].emitted_at - gen[0].emitted_at), 2)
        else:
            snap["generated_fps"] = None
        if len(recent) >= 2 and recent[-1].emitted_at > recent[0].emitted_at:
            snap["output_fps"] = round((len(recent) - 1) / (recent[-1].emitted_at - recent[0].emitted_at), 2)
        else:
            snap["output_fps"] = None
        return snap


def format_status_line(snap: dict[str, object]) -> str:
    """Compact one-line status for the terminal."""
    def f(key: str, unit: str = "") -> str:
        v = snap.get(key)
        return "-" if v is None else f"{v}{unit}"
    return (f"out {snap['frames_out']} | gen {snap['frames_generated']} | repeated {snap['frames_repeated']} | "
            f"latency {f('latency_ms_median', ' ms')} (max {f('latency_ms_max', ' ms')}) | "
            f"G {f('generator_ms_median', ' ms')} | gen fps {f('generated_fps')} | out fps {f('output_fps')}")
