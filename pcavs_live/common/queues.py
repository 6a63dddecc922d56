"""The one bounded hand-over between threads: when full, it drops its *oldest* item and counts it.

Live media must not build latency. When the reader falls behind (a stalled consumer, nobody watching),
the item worth losing is the oldest one, since the newest is what the reader wants next. Both live
hand-overs in the app have a producer that must never block (PortAudio's callback thread in
`capture/audio_sources.py`, the render loop writing to `stream/webrtc/`) and a reader that may be
slow, so both use this queue; every drop is counted in `dropped`, so stats and tests can bound the
loss instead of it going unseen.

A producer that *may* wait (a file decoded faster than real time) uses `put_wait` and loses nothing.
`close` ends the hand-over: later puts are refused, every waiting reader and writer wakes up, and
readers drain what is left before `get` answers None.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """A FIFO of at most `capacity` items, safe to use from any number of threads.

    `put` never blocks: when full it discards the oldest item and adds one to `dropped`. `get` waits
    up to `timeout` for the oldest item and answers None on timeout or once the queue is closed and
    empty, so items must not be None themselves.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"DropOldestQueue needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Add `item`, dropping (and counting) the oldest if full; never blocks. False once closed: the
        item is refused, not queued (the reader is gone, so this is not counted as a drop)."""
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def put_wait(self, item: T, timeout: float | None = None) -> bool:
        """Add `item`, waiting for room instead of dropping. False if the queue was closed (or
        `timeout` passed) before there was room; the item is then not queued."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, waiting at most `timeout` seconds (None: until one comes or the queue
        closes). None on timeout, or at once when the queue is closed and empty."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item = self._items.popleft()
            self._cond.notify_all()         # a writer in put_wait may now have room
            return item

    def get_nowait(self) -> T | None:
        """The oldest item, or None when empty."""
        return self.get(0.0)

    def close(self) -> None:
        """Refuse further puts and wake every waiting reader and writer. Queued items stay readable.
        Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
