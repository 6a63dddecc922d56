"""The shared renderer: every pending request across sessions in one render call, newest wins, a closed
session's request dropped, nobody waits for a stuck session, and the batch wait is measured. The last
test counts real generator calls on stand-in weights."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pcavs_live.pipeline.shared_renderer import RendererClosed, SharedRenderer
from tests.studio_support import PaintRenderer


class Av:
    def __init__(self, value: int) -> None:
        self.colour = np.array([value] * 3, np.uint8)


MEL = np.zeros((1, 1, 80, 20), np.float32)


def test_k_ready_sessions_are_rendered_by_one_call():
    paint = PaintRenderer(0)
    r = SharedRenderer(paint)
    handles = [r.handle(Av(10 * i)) for i in range(5)]
    pending = [h.submit(MEL) for h in handles]          # all ready before the thread takes them
    r.start()
    try:
        frames = [h.wait(p) for h, p in zip(handles, pending)]
    finally:
        r.stop()
    assert paint.calls == [5]
    for i, f in enumerate(frames):
        assert f.shape == (1, 224, 224, 3) and int(f[0, 0, 0, 0]) == 10 * i   # each its own row
    stats = r.stats()
    assert stats["batches"] == 1 and stats["rows_rendered"] == 5 and stats["batch_wait_ms_median"] is not None
    assert handles[0].stats()["batch_wait_ms_median"] is not None


def test_newest_request_wins_and_the_replaced_caller_gets_its_frames():
    paint = PaintRenderer(0)
    r = SharedRenderer(paint)
    h = r.handle(Av(7))
    old, new = h.submit(MEL), h.submit(MEL + 1)
    r.start()
    try:
        assert h.wait(old).shape == h.wait(new).shape == (1, 224, 224, 3)
    finally:
        r.stop()
    assert paint.calls == [1] and r.superseded == 1


def test_a_closed_sessions_pending_request_is_dropped():
    paint = PaintRenderer(0)
    r = SharedRenderer(paint)
    a, b = r.handle(Av(1)), r.handle(Av(2))
    pa, pb = a.submit(MEL), b.submit(MEL)
    a.close()
    r.start()
    try:
        with pytest.raises(RendererClosed):
            a.wait(pa)
        assert int(b.wait(pb)[0, 0, 0, 0]) == 2
        with pytest.raises(RendererClosed):
            a.submit(MEL)
    finally:
        r.stop()
    assert paint.calls == [1] and r.dropped_on_close == 1


def test_a_request_waits_at_most_for_the_batch_in_flight():
    """Batch 1 is held inside the renderer; a request arriving meanwhile goes in batch 2, whatever
    the session that never asks does (the renderer never waits for it)."""
    release, inside = threading.Event(), threading.Event()
    calls = []

    def slow(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            inside.set()
            release.wait(5)
        return [np.zeros((224, 224, 3), np.uint8) for _ in rows]

    r = SharedRenderer(slow).start()
    stuck = r.handle(Av(0))          # attached, never renders: must not hold anyone up
    a, b = r.handle(Av(1)), r.handle(Av(2))
    try:
        pa = a.submit(MEL)
        assert inside.wait(5)
        pb = b.submit(MEL)
        release.set()
        a.wait(pa), b.wait(pb)
    finally:
        r.stop()
    assert calls == [1, 1] and stuck.frames_rendered == 0


def test_active_sessions_asking_one_by_one_share_one_batch():
    """Sessions that were active ask one after another while a batch gathers: one render call for all
    of them. The sessions waited for are listed once per batch and drop out as they ask (no pass over
    every session on each wake-up)."""
    calls = []

    def slow(rows):
        calls.append(len(rows))
        time.sleep(0.2)      # the batch duration bounds the gather wait: room for the staggered asks
        return [np.zeros((224, 224, 3), np.uint8) for _ in rows]

    r = SharedRenderer(slow, gather_max_s=5.0).start()
    handles = [r.handle(Av(i)) for i in range(20)]
    try:
        first = [h.submit(MEL) for h in handles]
        for h, p in zip(handles, first):
            h.wait(p)
        second = []
        for h in handles:
            second.append(h.submit(MEL))
            time.sleep(0.001)
        for h, p in zip(handles, second):
            h.wait(p)
    finally:
        r.stop()
    assert sum(calls) == 40 and calls[-1] == 20 and not r._awaited


def test_a_failing_batch_reaches_its_callers_and_the_renderer_goes_on():
    state = {"fail": True}

    def flaky(rows):
        if state.pop("fail", False):
            raise RuntimeError("device lost")
        return [np.zeros((224, 224, 3), np.uint8) for _ in rows]

    r = SharedRenderer(flaky).start()
    h = r.handle(Av(0))
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            h.render(MEL[0:1])
        assert h.render(MEL).shape == (1, 224, 224, 3)
    finally:
        r.stop()


def test_real_generator_renders_k_sessions_in_one_pass():
    """Stand-in weights: three sessions' frames, one generator forward of batch 3."""
    import torch

    from pcavs.checkpoints import load_networks
    from pcavs.engine import Avatar, EngineOptions, render_sessions
    from pcavs.runtime import RenderRuntime
    from tests.conftest import parity_weights_dir

    nets = load_networks(parity_weights_dir(0), device="cpu")
    avatar = Avatar(RenderRuntime(nets), torch.zeros(3, 224, 224), EngineOptions(noise_seed=0))
    batches = []
    forward_cached = nets.generator.forward_cached   # the app's generator pass (cached identity style)

    def counting(identity_style, rest, start, noise=None):
        batches.append(rest.shape[0])
        return forward_cached(identity_style, rest, start, noise)

    nets.generator.forward_cached = counting
    r = SharedRenderer(render_sessions)
    handles = [r.handle(avatar) for _ in range(3)]
    rng = np.random.default_rng(0)
    pending = [h.submit(rng.uniform(0, 1, (1, 1, 80, 20)).astype(np.float32)) for h in handles]
    r.start()
    try:
        frames = [h.wait(p) for h, p in zip(handles, pending)]
    finally:
        r.stop()
    assert batches == [3]
    assert all(f.shape == (1, 224, 224, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1])     # each row its own mel window


def test_a_two_phase_render_keeps_each_sessions_frames_and_books_the_batch_while_it_renders():
    """`submit_rows` queues the batch; the renderer books each request's wait before it asks for the
    frames (the device is rendering meanwhile), and every caller still gets its own rows, once."""
    paint = PaintRenderer(0)
    log: list[tuple[str, int]] = []
    r = SharedRenderer(paint, submit_rows=lambda rows: submit(rows))

    class Queued:
        def __init__(self, rows) -> None:
            self.rows = rows

        def result(self):
            log.append(("result", r.stats()["batches"]))
            return paint(self.rows)

    def submit(rows):
        log.append(("submit", r.stats()["batches"]))
        return Queued(rows)

    handles = [r.handle(Av(20 + i)) for i in range(3)]
    pending = [h.submit(MEL) for h in handles]
    r.start()
    try:
        frames = [h.wait(p) for h, p in zip(handles, pending)]
        again = handles[1].render(MEL)
    finally:
        r.stop()
    assert paint.calls == [3, 1]
    assert log == [("submit", 0), ("result", 1), ("submit", 1), ("result", 2)]  # booked before waiting
    for i, f in enumerate(frames):
        assert int(f[0, 0, 0, 0]) == 20 + i
    assert int(again[0, 0, 0, 0]) == 21
    assert handles[0].stats()["frames_rendered"] == 1 and r.stats()["rows_rendered"] == 4


def test_the_default_renderer_renders_in_two_phases():
    from pcavs.engine import render_sessions, submit_sessions
    assert SharedRenderer(render_sessions)._submit_rows is submit_sessions
    assert SharedRenderer(PaintRenderer(0))._submit_rows is None
