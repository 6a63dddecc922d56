"""`Worker`, the one owned-thread type: started once, stopped with a bounded wait, an error handed to its
owner, a stuck thread named in one log line and left alone instead of joined forever."""
from __future__ import annotations

import logging
import threading

import pytest

from pcavs_live.common.workers import Worker


def test_stop_asks_the_target_to_return_and_joins_it():
    seen = []
    worker = None

    def loop() -> None:
        while not worker.stopping.wait(0.01):
            seen.append(1)

    worker = Worker(loop, "ticker")
    assert not worker.started and not worker.alive
    worker.start()
    assert worker.started
    assert worker.stop(5.0) is True
    assert not worker.alive and worker.error is None
    assert worker.stop() is True          # idempotent
    worker.check()                        # nothing to raise


def test_start_twice_is_a_bug():
    worker = Worker(lambda: None, "once")
    worker.start()
    with pytest.raises(RuntimeError, match="'once' started twice"):
        worker.start()
    worker.stop()


def test_wake_is_called_on_stop_so_a_blocked_target_notices():
    cond = threading.Condition()
    worker = None

    def wait_on_condition() -> None:
        with cond:
            while not worker.stopping.is_set():
                cond.wait()             # no timeout: only the wake can end this

    def wake() -> None:
        with cond:
            cond.notify_all()

    worker = Worker(wait_on_condition, "waiter", wake=wake)
    worker.start()
    assert worker.stop(5.0) is True


def test_an_error_in_the_thread_reaches_the_owner():
    woken = threading.Event()
    worker = Worker(lambda: 1 / 0, "divider", wake=woken.set)
    worker.start()
    assert woken.wait(5.0)                # the owner waiting on results is woken
    assert worker.join(5.0)
    assert isinstance(worker.error, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        worker.check()


def test_a_stuck_thread_is_named_once_and_not_waited_for(caplog):
    release = threading.Event()
    worker = Worker(lambda: release.wait(30), "stuck-camera")   # ignores `stopping`
    worker.start()
    with caplog.at_level(logging.ERROR, logger="pcavs_live.common.workers"):
        assert worker.stop(0.2) is False
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["thread stuck-camera did not stop within 0.2 s; left running"]
    assert worker.alive
    release.set()
    assert worker.join(5.0) and not worker.alive


def test_stop_from_the_workers_own_thread_only_asks():
    done = threading.Event()
    worker = None

    def stop_myself() -> None:
        assert worker.stop(5.0) is True   # would deadlock if it joined itself
        assert worker.stopping.is_set()
        done.set()

    worker = Worker(stop_myself, "self-stopper")
    worker.start()
    assert done.wait(5.0) and worker.join(5.0) and worker.error is None


def test_a_given_stop_flag_is_the_one_set():
    flag = threading.Event()
    worker = Worker(lambda: flag.wait(5), "flagged", stopping=flag)
    worker.start()
    assert worker.stop(5.0) and flag.is_set()


def test_no_hand_written_thread_lifecycles_are_left():
    """Every thread in the program's packages is a Worker (tests and benchmarks may still make their own)."""
    from tests.conftest import REPO_ROOT
    offenders = [str(p.relative_to(REPO_ROOT)) for root in ("capture", "pcavs", "pcavs_live", "stream")
                 for p in (REPO_ROOT / root).rglob("*.py")
                 if "threading.Thread(" in p.read_text() and p.name != "workers.py"]
    assert offenders == []


def test_a_delayed_sink_stuck_in_write_is_left_open_and_named(caplog):
    """DelayedSink on a Worker: closing while the wrapped sink hangs in write() returns after the bounded
    wait, names the thread, and does not close the sink under the write."""
    from stream.delay import DelayedSink

    release, entered = threading.Event(), threading.Event()

    class Hanging:
        closed = False

        def open(self, *a):
            pass

        def write(self, frame, audio, k):
            entered.set()
            release.wait(30)

        def close(self):
            self.closed = True

    inner = Hanging()
    sink = DelayedSink(inner, lambda: 0.0)
    sink.open(4, 4, 25, 16000)
    sink.write(None, None, 0)
    assert entered.wait(5.0)
    sink.stop_timeout_s = 0.2
    try:
        with caplog.at_level(logging.ERROR, logger="pcavs_live.common.workers"):
            sink.close()
    finally:
        release.set()
    assert "thread delay-Hanging did not stop within 0.2 s; left running" in caplog.text
    assert not inner.closed
