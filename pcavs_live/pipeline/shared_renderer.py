"""One renderer per device: every session's ready frame goes through one batched network pass.

Why one owner: the networks are loaded once and the device runs one thing at a time anyway, so N
sessions each calling the generator with batch 1 would queue on the device and pay N launches of every
layer. Here each session's scheduler calls its `SessionHandle.render` (the `Renderer` protocol of
pcavs_live/pipeline/scheduler.py), which only puts the request in that session's one-slot mailbox and waits; the
renderer thread takes everything pending across sessions, renders it with one call of `render_rows`
(`pcavs.engine.render_sessions`: one audio-encoder and one generator pass, each row with its own
identity map, identity style part and noise), and wakes each session with its rows.

Guarantees the studio relies on:
* newest wins — a session holds at most one pending request; a newer one replaces it (the replaced
  caller gets the newer request's frames, counted in `superseded`), so no session builds a backlog;
* bounded waiting — a batch is what is pending when the thread wakes, held open only until every
  recently active session has asked and never longer than one batch (`_gather`), so a slow or stuck
  session delays the others by at most one batch;
* closing a handle drops its pending request and wakes its caller with `RendererClosed`;
* batching has a price, the time a request waits for the batch in flight: measured per request
  (`wait_ms`) and exposed by `stats()` and `SessionHandle.stats()`.

With a two-phase render (`submit_rows`, by default `pcavs.engine.submit_sessions` beside
`render_sessions`) the thread queues the batch on the device and does the batch's bookkeeping that
needs no frames (each request's wait, the counters) while the device renders, then waits for the
frames; what each session receives, and when, is unchanged.
"""
from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from pcavs.engine import SessionRequest, StageTimes, render_sessions, submit_sessions
from pcavs_live.common.workers import Worker

log = logging.getLogger(__name__)

# A session that asked within this many seconds (plus two batch durations: a session waits out the batch
# in progress and its own before it can ask again) is expected to ask again soon (SharedRenderer._gather).
ACTIVE_S = 0.5

RenderRows = Callable[[Sequence[SessionRequest]], Sequence[np.ndarray]]


class PendingRows(Protocol):
    def result(self) -> Sequence[np.ndarray]: ...


SubmitRows = Callable[[Sequence[SessionRequest]], PendingRows]


class RendererClosed(RuntimeError):
    """The session's handle (or the whole renderer) was closed while a render was pending."""


@dataclass
class _Pending:
    handle: "SessionHandle"
    rows: list[SessionRequest]
    enqueued_at: float
    done: threading.Event = field(default_factory=threading.Event)
    frames: np.ndarray | None = None
    error: BaseException | None = None
    wait_ms: float | None = None
    batch_ms: float | None = None
    batch_rows: int = 0
    replaced_by: "_Pending | None" = None

    def result(self) -> "_Pending":
        """The request that actually carries this caller's frames (itself, or the one that replaced it)."""
        p = self
        while p.replaced_by is not None:
            p = p.replaced_by
        return p


class _Recent:
    """A bounded window of recent samples with median / p95."""

    def __init__(self, n: int = 200) -> None:
        self._v: deque[float] = deque(maxlen=n)

    def add(self, x: float) -> None:
        self._v.append(x)

    def summary(self, prefix: str) -> dict[str, float | None]:
        v = sorted(self._v)
        if not v:
            return {f"{prefix}_median": None, f"{prefix}_p95": None}
        return {f"{prefix}_median": round(statistics.median(v), 2),
                f"{prefix}_p95": round(v[min(len(v) - 1, int(0.95 * len(v)))], 2)}


class SessionHandle:
    """One session's door to the shared renderer; implements the scheduler's `Renderer` protocol.
    `avatar` is the session's own identity (an `Avatar` sharing the renderer's networks)."""

    def __init__(self, owner: "SharedRenderer", avatar: object, name: str) -> None:
        self._owner, self.avatar, self.name = owner, avatar, name
        self.closed = False
        self.frames_rendered = 0
        self.last_submit: float | None = None
        self._wait = _Recent()

    def submit(self, mel_windows: np.ndarray, pose_codes: np.ndarray | None = None) -> _Pending:
        """Queue a request without waiting (render() = submit + wait)."""
        mels = np.asarray(mel_windows, dtype=np.float32)
        poses = None if pose_codes is None else np.asarray(pose_codes, dtype=np.float32).reshape(len(mels), -1)
        rows = [SessionRequest(self.avatar, mels[i], None if poses is None else poses[i]) for i in range(len(mels))]
        return self._owner._submit(self, rows)

    def wait(self, pending: _Pending, times: StageTimes | None = None) -> np.ndarray:
        while True:
            p = pending.result()
            if p.done.wait(0.5):
                if pending.result() is p:     # not replaced while we waited
                    break
                continue
            if self.closed:
                raise RendererClosed(f"session {self.name} closed while rendering")
        if p.error is not None:
            raise p.error
        assert p.frames is not None
        frames = p.frames
        want = len(pending.rows)
        if len(frames) != want:               # a replaced request of another length: repeat the newest
            frames = np.repeat(frames[-1:], want, axis=0)
        if times is not None and p.batch_ms is not None:
            # The whole batch's time, charged to this session's rows pro rata (stats stay comparable).
            share = p.batch_ms * want / max(1, p.batch_rows)
            times.generator_ms += share
        return frames

    def render(self, mel_windows: np.ndarray, pose_codes: np.ndarray | None = None,
               times: StageTimes | None = None) -> np.ndarray:
        return self.wait(self.submit(mel_windows, pose_codes), times)

    def _record(self, wait_ms: float, rows: int) -> None:
        self._wait.add(wait_ms)
        self.frames_rendered += rows

    def stats(self) -> dict[str, object]:
        """This session's batch wait: time from asking to its batch starting (what batching adds)."""
        return {**self._wait.summary("batch_wait_ms"), "frames_rendered": self.frames_rendered}

    def close(self) -> None:
        """Drop this session's pending request (its caller gets RendererClosed). Idempotent."""
        self._owner._close_handle(self)


class SharedRenderer:
    """Owns the render thread. `render_rows` renders any mix of sessions' rows in one pass; the default
    is `pcavs.engine.render_sessions` (all avatars must share one `PcavsNetworks`). `submit_rows`: the
    same render in two phases (queue, then `.result()`); with the default `render_rows` it is
    `pcavs.engine.submit_sessions`."""

    def __init__(self, render_rows: RenderRows = render_sessions, name: str = "shared-renderer",
                 on_batch: Callable[[int], None] | None = None, gather_max_s: float = 0.04,
                 submit_rows: SubmitRows | None = None) -> None:
        self._render_rows = render_rows
        if submit_rows is None and render_rows is render_sessions:
            submit_rows = submit_sessions
        self._submit_rows = submit_rows
        self.gather_max_s = gather_max_s
        self._last_batch_s = 0.0
        self._name = name
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: dict[SessionHandle, _Pending] = {}
        self._handles: set[SessionHandle] = set()
        self._awaited: set[SessionHandle] = set()  # active sessions a gathering batch still waits for
        self._worker: Worker | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self.batches = 0
        self.rows = 0
        self.superseded = 0
        self.dropped_on_close = 0
        self._batch_sizes = _Recent()
        self._batch_ms = _Recent()
        self._wait = _Recent(1000)

    # ---------------------------------------------------------------- owner API
    def start(self) -> "SharedRenderer":
        if self._worker is None:
            self._worker = Worker(self._loop, self._name)
            self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; pending callers get RendererClosed. Idempotent."""
        with self._cond:
            self._stopping = True
            for p in self._pending.values():
                p.error = RendererClosed("renderer stopped")
                p.done.set()
            self._pending.clear()
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)      # a stuck render is named in the log, not waited on forever
            self._worker = None

    def handle(self, avatar: object, name: str | None = None) -> SessionHandle:
        h = SessionHandle(self, avatar, name or f"session-{next(self._ids)}")
        with self._cond:
            if self._stopping:
                raise RendererClosed("renderer stopped")
            self._handles.add(h)
        return h

    @property
    def sessions(self) -> int:
        with self._cond:
            return len(self._handles)

    def stats(self) -> dict[str, object]:
        with self._cond:
            out: dict[str, object] = {"batches": self.batches, "rows_rendered": self.rows,
                                      "superseded": self.superseded, "dropped_on_close": self.dropped_on_close,
                                      "sessions_attached": len(self._handles)}
            out.update(self._batch_sizes.summary("batch_rows"))
            out.update(self._batch_ms.summary("batch_ms"))
            out.update(self._wait.summary("batch_wait_ms"))
        return out

    # ---------------------------------------------------------------- sessions' side
    def _submit(self, handle: SessionHandle, rows: list[SessionRequest]) -> _Pending:
        p = _Pending(handle, rows, time.monotonic())
        with self._cond:
            if handle.closed or self._stopping:
                raise RendererClosed(f"session {handle.name} is closed")
            handle.last_submit = p.enqueued_at
            old = self._pending.get(handle)
            if old is not None:               # newest wins: the older caller gets these frames
                old.replaced_by = p
                self.superseded += 1
            self._pending[handle] = p
            self._awaited.discard(handle)
            self._cond.notify_all()
        return p

    def _close_handle(self, handle: SessionHandle) -> None:
        with self._cond:
            handle.closed = True
            self._handles.discard(handle)
            self._awaited.discard(handle)
            p = self._pending.pop(handle, None)
            if p is not None:
                self.dropped_on_close += 1
                p.error = RendererClosed(f"session {handle.name} closed")
                p.done.set()
            self._cond.notify_all()

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._stopping:
                    self._gather()
                if self._stopping:
                    return
                batch = list(self._pending.values())
                self._pending.clear()
            if batch:
                self._render(batch)

    def _gather(self) -> None:
        """Hold the batch open briefly for active sessions that have not asked yet (lock held).

        Without this, sessions settle into taking turns: each request arrives while another session's
        batch runs, so every batch has one row and N sessions cost N passes. Waiting until every
        session that asked recently has a request pending, but never longer than one batch
        (`gather_max_s`, and the last batch's duration), lets them share one pass. "Recently" is
        `ACTIVE_S` plus two batch durations, so slow batches (a CPU) do not make every session look idle.
        A session that stops asking is no longer waited for after that; the wait is in `batch_wait_ms`.
        The sessions to wait for are listed once per batch and each drops out as it asks (`_submit`), so
        a wake-up costs O(1), not a pass over every session (O(N²) per batch with N sessions).
        """
        if not self._pending:
            return
        now = time.monotonic()
        deadline = now + min(self.gather_max_s, self._last_batch_s)
        recent_s = ACTIVE_S + 2 * self._last_batch_s
        self._awaited = {h for h in self._handles if h not in self._pending
                         and h.last_submit is not None and now - h.last_submit < recent_s}
        try:
            while not self._stopping and self._awaited:
                now = time.monotonic()
                if now >= deadline:
                    return
                self._cond.wait(deadline - now)
        finally:
            self._awaited = set()

    def _render(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        rows = [r for p in batch for r in p.rows]
        queued = None
        try:
            if self._submit_rows is not None:
                queued = self._submit_rows(rows)      # on the device; the host goes on below
            else:
                frames = np.asarray(self._render_rows(rows))
            error = None
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of this batch
            log.error("shared renderer batch of %d rows failed: %s", len(rows), exc, exc_info=True)
            frames, error = None, exc
        with self._cond:  # the bookkeeping that needs no frames (while a queued batch renders)
            self.batches += 1
            self.rows += len(rows)
            self._batch_sizes.add(len(rows))
            for p in batch:
                p.wait_ms = (started - p.enqueued_at) * 1e3
                self._wait.add(p.wait_ms)
                p.handle._record(p.wait_ms, len(p.rows))
        if queued is not None:
            try:
                frames = np.asarray(queued.result())
            except BaseException as exc:  # noqa: BLE001
                log.error("shared renderer batch of %d rows failed: %s", len(rows), exc, exc_info=True)
                frames, error = None, exc
        ended = time.monotonic()
        batch_ms = (ended - started) * 1e3
        with self._cond:
            self._last_batch_s = batch_ms / 1e3
            self._batch_ms.add(batch_ms)
            i = 0
            for p in batch:
                n = len(p.rows)
                p.batch_ms, p.batch_rows = batch_ms, len(rows)
                if error is not None:
                    p.error = error
                else:
                    p.frames = frames[i:i + n]
                i += n
                p.done.set()
        if self._on_batch is not None:
            self._on_batch(len(rows))
