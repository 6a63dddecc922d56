"""The hand-over from the sink's thread to the server's event loop.

The render loop must never wait on a viewer, so the sink puts each frame (and each slot's audio) into
a small `DropOldestQueue` (pcavs_live/common/queues.py) that drops the oldest item when nobody reads (counted in
`dropped`). The reader here is a coroutine on the server's loop rather than a thread, so this adapter
adds only the wake-up: a put schedules one `call_soon_threadsafe` to set an asyncio.Event, coalesced
so a burst of puts costs one wake-up. Storage, dropping and counting are the queue's.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiortc.mediastreams import MediaStreamError

from pcavs_live.common.queues import DropOldestQueue


class LatestBuffer:
    """Bounded hand-over: `put` from any thread, `get` and `close` on the loop. When full, the oldest
    item is dropped (counted in `dropped`); after `close`, `get` raises MediaStreamError (the end of
    a track) and puts are ignored."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxlen: int) -> None:
        self._loop = loop
        self._queue: DropOldestQueue[Any] = DropOldestQueue(maxlen)
        self._event = asyncio.Event()       # only touched on the loop
        self._lock = threading.Lock()       # guards _wake_pending
        self._wake_pending = False

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def put(self, item: Any) -> None:
        if not self._queue.put(item):       # closed: the track has ended, nobody will read it
            return
        with self._lock:
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:            # loop already closed: the server is gone, nobody reads
                pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._event.set()

    def close(self) -> None:
        """Loop thread only: wake the reader so it sees the end."""
        self._queue.close()
        self._event.set()

    async def get(self) -> Any:
        while True:
            if self._queue.closed:
                raise MediaStreamError
            item = self._queue.get_nowait()
            if item is not None:
                return item
            # A put after this point schedules _wake, which runs on this loop only after we await.
            self._event.clear()
            await self._event.wait()
