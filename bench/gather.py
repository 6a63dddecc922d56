"""The shared renderer's batch gathering: bookkeeping per batch against the number of sessions.

`SharedRenderer._gather` holds a batch open until every recently active session has asked. It used to
rebuild the set of active sessions and compare it with the pending ones on every wake-up (each
session's request wakes it): N wake-ups × N sessions per batch. Now the sessions to wait for are listed
once per batch and each drops out as it asks. This times both bookkeeping schemes for one batch of N
sessions asking one after another (Python only, no waiting; the renderer's lock is held throughout,
so this is time every session's request waits behind).

    python bench/gather.py [--sessions 8 64 256] [--runs 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import print_table  # noqa: E402


class Handle:
    def __init__(self, t: float) -> None:
        self.last_submit = t


def rebuild_each_wake(handles: set, now: float, recent_s: float) -> None:
    """The former scheme: on each of the N wake-ups, rebuild the active set and compare."""
    pending: dict = {}
    for h in handles:
        pending[h] = True
        active = {x for x in handles if x.last_submit is not None and now - x.last_submit < recent_s}
        if active <= pending.keys():
            break


def list_once(handles: set, now: float, recent_s: float) -> None:
    """The current scheme: list the awaited sessions once, each discards itself as it asks."""
    awaited = {x for x in handles if x.last_submit is not None and now - x.last_submit < recent_s}
    for h in handles:
        awaited.discard(h)
        if not awaited:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for n in args.sessions:
        now = time.monotonic()
        handles = {Handle(now) for _ in range(n)}
        out = {"sessions": n}
        for name, fn in (("rebuild_each_wake_ms", rebuild_each_wake), ("list_once_ms", list_once)):
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                fn(handles, now, 0.5)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = round(statistics.median(times), 3)
        rows.append(out)
    print_table("gather bookkeeping per batch (median)", rows, ["sessions", "rebuild_each_wake_ms", "list_once_ms"])


if __name__ == "__main__":
    main()
