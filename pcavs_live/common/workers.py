"""`Worker`: the one way this project runs a thread of its own.

Every thread has an owner that starts it and stops it. Hand-written lifecycles drifted apart (three
names for the stop flag, joins without a timeout, exceptions kept or lost depending on the class); this
type does the parts that must not differ:

* `start` once; a second start is a bug (`RuntimeError`).
* `stop(timeout)` sets `stopping`, calls the owner's `wake` (so a thread blocked on a condition or a
  queue notices), and joins for at most `timeout` seconds. A thread still running after that is
  reported by name in one log line and left alone (it is a daemon, so it cannot hold the process
  open); `stop` never waits forever. Called from the worker's own thread, it only asks.
* An exception that ends the target is kept in `error` (and `wake` is called, so an owner waiting on
  the worker's results notices); `check()` re-raises it in the owner's thread.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 10.0


class Worker:
    """One owned thread running `target()` until it returns. `target` polls `stopping` (or waits on it,
    or is woken by `wake`) to return early."""

    def __init__(self, target: Callable[[], None], name: str, wake: Callable[[], None] | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.name = name
        self._target = target
        self._wake = wake
        self.stopping = stopping if stopping is not None else threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def on_own_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"worker {self.name!r} started twice")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # noqa: BLE001 - handed to the owner through `error` / `check()`
            self.error = exc
            log.debug("worker %s ended with %r", self.name, exc, exc_info=True)
            if self._wake is not None:
                try:
                    self._wake()
                except Exception:  # noqa: BLE001 - the error above is the one that matters
                    log.debug("waking the owner of %s failed", self.name, exc_info=True)

    def request_stop(self) -> None:
        """Ask the thread to return (sets `stopping`, calls `wake`); does not wait."""
        self.stopping.set()
        if self._wake is not None:
            self._wake()

    def join(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Wait at most `timeout` s for the thread to end (without asking it to). True once it has ended
        (or never started); False, with one log line naming it, if it is still running."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.error("thread %s did not stop within %.1f s; left running", self.name, timeout)
            return False
        return True

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Ask, then wait at most `timeout` s. Idempotent; True once the thread has ended."""
        self.request_stop()
        return self.join(timeout)

    def check(self) -> None:
        """Re-raise, in the caller's thread, the exception that ended the target (if any)."""
        if self.error is not None:
            raise self.error
