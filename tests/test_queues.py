"""DropOldestQueue: bounded, drops and counts the oldest, get times out, close wakes readers and
writers and still lets readers drain; one producer thread against one reader loses nothing but what
it counts."""
from __future__ import annotations

import threading
import time

import pytest

from pcavs_live.common.queues import DropOldestQueue


def test_full_queue_drops_the_oldest_and_counts_each_drop() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    for i in range(10):
        assert q.put(i)
        assert len(q) <= 3                                   # never more than its capacity
    assert q.dropped == 7 and len(q) == 3
    assert [q.get(0) for _ in range(3)] == [7, 8, 9]
    assert q.get_nowait() is None and q.dropped == 7         # reading is not dropping


def test_get_times_out_with_none_and_wakes_for_a_put_from_another_thread() -> None:
    q: DropOldestQueue[str] = DropOldestQueue(2)
    t0 = time.monotonic()
    assert q.get(0.1) is None
    assert time.monotonic() - t0 >= 0.09
    threading.Timer(0.05, q.put, args=("late",)).start()
    assert q.get(5.0) == "late"


def test_close_wakes_a_blocked_reader_and_leaves_the_queue_drainable() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(4)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(q.get(None)))   # waits without a deadline
    reader.start()
    time.sleep(0.05)
    q.close()
    reader.join(2)
    assert not reader.is_alive() and got == [None]

    q2: DropOldestQueue[int] = DropOldestQueue(4)
    q2.put(1)
    q2.put(2)
    q2.close()
    q2.close()                                               # idempotent
    assert q2.closed and not q2.put(3) and q2.dropped == 0   # refused, not queued, not a drop
    assert [q2.get(5.0), q2.get(5.0)] == [1, 2]
    t0 = time.monotonic()
    assert q2.get(5.0) is None and time.monotonic() - t0 < 1.0   # closed and empty: at once


def test_put_wait_blocks_for_room_instead_of_dropping_and_close_releases_it() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(1)
    assert q.put_wait(0)
    assert not q.put_wait(1, timeout=0.05)                   # still full: gives up, nothing dropped
    results: list[bool] = []
    writer = threading.Thread(target=lambda: results.append(q.put_wait(2)))
    writer.start()
    time.sleep(0.05)
    assert writer.is_alive() and q.get(0) == 0               # reading makes room
    writer.join(2)
    assert results == [True] and q.get(0) == 2 and q.dropped == 0

    q.put(3)
    blocked = threading.Thread(target=lambda: results.append(q.put_wait(4)))
    blocked.start()
    time.sleep(0.05)
    q.close()
    blocked.join(2)
    assert not blocked.is_alive() and results[-1] is False and q.get(0) == 3 and q.get(0) is None


def test_a_producer_thread_against_a_slow_reader_loses_only_what_it_counts() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(5)
    n = 5000

    def produce() -> None:
        for i in range(n):
            q.put(i)
        q.close()

    producer = threading.Thread(target=produce)
    producer.start()
    received = []
    while (item := q.get(5.0)) is not None:
        received.append(item)
        if len(received) % 100 == 0:
            time.sleep(0.001)                                # a reader that falls behind now and then
    producer.join(5)
    assert received == sorted(received) and received[-1] == n - 1   # in order, newest kept
    assert len(received) + q.dropped == n                    # every item either read or counted


def test_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DropOldestQueue(0)
