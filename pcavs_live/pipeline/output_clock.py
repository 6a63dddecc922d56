"""When each live output slot goes out: a steady 25 fps that follows the audio input's own clock.

Slot k is due `latency` after its frame became renderable (its whole mel window had been captured):
a frame rendered for slot k then goes out with exactly its own 40 ms of audio, and slots whose frame
is not ready repeat the previous one, at the same steady rate. Releasing each slot exactly at its due
instant would copy the input's delivery jitter (a microphone's callbacks come in clumps) into the
output, and a viewer's pipeline loses frames that arrive in bursts. So the release times form a clock
of their own: each step is one period, nudged by a small fraction of the gap to the due instant and
never by more than `max_step` of a period. The output therefore runs at exactly the rate of the input
(a file paced by the monotonic clock: 25.000 fps; a microphone: its sound card's 25 fps), absorbs
jitter, and after an input stall catches up at most `max_step` faster than real time, never in a burst.
"""
from __future__ import annotations

from pcavs.constants import FPS


class OutputClock:
    """Release instants (time.monotonic()) for consecutive slots."""

    def __init__(self, fps: int = FPS, gain: float = 0.05, max_step: float = 0.05) -> None:
        self.period = 1.0 / fps
        self.gain = gain
        self.max_step = max_step * self.period
        self._last: float | None = None

    def next_release(self, due: float) -> float:
        """When the next slot should go out, given the instant it is due."""
        if self._last is None:
            return due
        nominal = self._last + self.period
        return nominal + min(self.max_step, max(-self.max_step, self.gain * (due - nominal)))

    def released(self, scheduled: float, now: float) -> None:
        """Record that the slot scheduled for `scheduled` went out at `now`. A release late by more than
        half a period (the input stalled, or the process did) restarts the clock from `now`, so the
        backlog is worked off by the bounded catch-up rather than all at once; smaller lateness is
        wake-up jitter and does not move the clock."""
        self._last = now if now - scheduled > self.period / 2 else scheduled
