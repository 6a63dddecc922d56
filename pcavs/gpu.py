"""CUDA plumbing of the render path: streams, pinned transfers, stage timing.

Every helper is the plain CPU equivalent (or a no-op) off CUDA, so the engine has one code path.

Why these exist:
* The render loop and the pose worker are two threads on one GPU. On one stream every blocking copy of
  one waits for the other's queued kernels, and a `torch.cuda.synchronize()` waits for the whole device.
  So rendering runs on its own high-priority stream, a worker thread enters a `WorkerStream` (its own
  lowest-priority stream), and a result is waited for with an event on the stream that produced it.
* Host↔device copies go through pinned (page-locked) buffers with `non_blocking=True`: they are DMA
  transfers queued on the stream, not staged synchronous copies. torch's caching host allocator reuses
  the pinned blocks and keeps each alive until the copy that reads it is done.
* Stage times on CUDA come from events on the stream (the GPU's time between two points), read after
  the one wait the render already does; host clocks would measure only the launch.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

# CUDA stream priorities: lower numbers run first; 0 is the lowest and the default streams' own.
# torch clamps a value outside the device's range to the nearest valid one.
RENDER_PRIORITY = -1
WORKER_PRIORITY = 0
T = TypeVar("T")


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def render_stream(device: str | torch.device) -> "torch.cuda.Stream | None":
    """A high-priority stream for the render path (None off CUDA)."""
    if not is_cuda(device):
        return None
    return torch.cuda.Stream(device=torch.device(device), priority=RENDER_PRIORITY)


@contextlib.contextmanager
def stream_scope(stream: "torch.cuda.Stream | None", after_caller: bool = True) -> Iterator[None]:
    """Run the block's CUDA work on `stream`. `after_caller`: first order it after whatever the calling
    thread had already queued on its own current stream (when the block reads the caller's CUDA
    tensors; no host wait). Without it the block waits for nothing it does not ask for itself
    (`wait_events`): the render path, whose inputs come from the host, must not queue behind work on the
    caller's stream (the default stream, where anything else may run)."""
    if stream is None:
        yield
        return
    if after_caller:
        stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield


def record_event() -> "torch.cuda.Event":
    """An event recorded on the current CUDA stream: the point another stream waits for (`wait_events`)."""
    event = torch.cuda.Event()
    event.record()
    return event


def wait_events(stream: "torch.cuda.Stream | None", events: Sequence["torch.cuda.Event"]) -> None:
    """Make `stream` wait (on the device, not the host) for each event; no-op off CUDA."""
    if stream is None:
        return
    for event in events:
        stream.wait_event(event)


@contextlib.contextmanager
def restore_current_stream(device: str | torch.device) -> Iterator[None]:
    """Whatever happens in the block, the calling thread's current stream is the one it had before.
    `torch.cuda.graph` switches to its capture stream on entry and switches back only after
    `capture_end` succeeded: a capture that fails there would leave the thread on the capture stream,
    and everything after it (the eager fallback) would run there. CUDA only."""
    saved = torch.cuda.current_stream(torch.device(device))
    try:
        yield
    finally:
        if torch.cuda.current_stream(torch.device(device)) != saved:
            torch.cuda.set_stream(saved)


class WorkerStream:
    """A stream of its own, at the lowest priority, for a worker thread (the pose worker): its CUDA work
    neither waits for the render stream's queue nor delays it. The worker thread enters `scope()` around
    its units of work (or once around its loop); `wrap(fn)` makes a callable that does so. Off CUDA
    both are no-ops."""

    def __init__(self, device: str | torch.device) -> None:
        self.stream = (torch.cuda.Stream(device=torch.device(device), priority=WORKER_PRIORITY)
                       if is_cuda(device) else None)

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        if self.stream is None:
            return fn

        def on_stream(*args: object, **kwargs: object) -> T:
            with self.scope():
                return fn(*args, **kwargs)
        return on_stream


def _host_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    arr = np.ascontiguousarray(array)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def upload(array: np.ndarray | torch.Tensor, device: str | torch.device,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data → a device tensor, through a pinned buffer and a non-blocking copy on the current
    stream (CPU: the tensor itself). A tensor already on `device` is only cast."""
    t = _host_tensor(array)
    device = torch.device(device)
    if t.device.type != "cpu" or not is_cuda(device):
        t = t.to(device)
    else:
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        t = pinned.to(device, non_blocking=True)
    return t if dtype is None else t.to(dtype)


def download_async(tensors: Sequence[torch.Tensor]) -> tuple[list[np.ndarray], "torch.cuda.Event | None"]:
    """Device tensors → numpy arrays, queued: on CUDA non-blocking copies into fresh pinned buffers on
    the current stream and the event after them (the arrays are valid once it has completed); off
    CUDA copies made now and no event. The arrays own their memory: nothing is reused under the
    caller's feet (the tensors may be a graph's static outputs, overwritten by its next replay)."""
    if not tensors:
        return [], None
    if tensors[0].device.type != "cuda":
        return [np.array(t.detach().numpy(), copy=True, order="C") for t in tensors], None
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    done = torch.cuda.Event()
    done.record()
    return [h.numpy() for h in hosts], done


def download(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Device tensors → numpy arrays, with one wait on an event of the current stream (never the whole
    device). The arrays own their (pinned) memory: nothing is reused under the caller's feet."""
    hosts, done = download_async(tensors)
    if done is not None:
        done.synchronize()
    return hosts


class StageClock:
    """Time per named stage: `split(name)` charges the time since the previous split (or the start) to
    `name`. CUDA: events recorded on the current stream, read by `totals_ms()` after the caller's own wait
    (the last event is waited for, which costs nothing more once the caller has synchronised). CPU:
    perf_counter."""

    def __init__(self, device: str | torch.device) -> None:
        self._cuda = is_cuda(device)
        self._marks: list[tuple[str, object]] = [("", self._now())]

    def _now(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def split(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def totals_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._cuda and len(self._marks) > 1:
            self._marks[-1][1].synchronize()  # type: ignore[union-attr]
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            ms = a.elapsed_time(b) if self._cuda else (b - a) * 1e3  # type: ignore[union-attr,operator]
            out[name] = out.get(name, 0.0) + float(ms)
        return out
