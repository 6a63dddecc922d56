"""Pose frame sources (webcam, video file) and the worker that turns frames into pose codes.

The generator runs at the audio clock; head pose comes from a separate, slower path (landmarks +
alignment + the pose encoder). `PoseWorker` runs that path on its own thread(s) and publishes only its
latest result, so the render loop never waits for a face detector: `latest()` is a plain read.

Timing: every frame carries `captured_at` on the `time.monotonic()` clock. Live sources stamp the read
time; a video file stamps `start + media time` (in real-time mode it also sleeps until then), so the
time-based smoothing filter sees the video's own frame spacing even when decoding as fast as possible.
"""
from __future__ import annotations

import glob
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from common.errors import UserError
from pcavs.alignment import AlignedFace
from pcavs.constants import FPS, POSE_DIM

log = logging.getLogger(__name__)

_FALLBACK_DT = 1.0 / FPS  # used when two frames carry the same timestamp


class CameraError(UserError):
    """A webcam could not be opened or stopped delivering frames (one-line message)."""


class VideoSourceError(UserError):
    """A pose video could not be opened or decoded (one-line message naming the file)."""


class FrameSource(Protocol):
    realtime: bool  # True: frames arrive at their own pace and stale ones may be dropped

    def read(self) -> tuple[np.ndarray, float] | None:
        """(RGB uint8 HxWx3, captured_at) or None at the end of a finite source."""
        ...

    def close(self) -> None: ...


class Aligner(Protocol):
    def align(self, rgb: np.ndarray) -> AlignedFace | None: ...


# --------------------------------------------------------------------------- sources
def _video_devices() -> list[str]:
    """Camera device nodes, named in the error when a camera cannot be opened."""
    return sorted(glob.glob("/dev/video*"))


class WebcamSource:
    """OpenCV camera. `read()` blocks for at most about one frame interval."""

    realtime = True

    def __init__(self, index: int | str = 0, width: int = 640, height: int = 480, fps: int = 30,
                 max_failed_reads: int = 30) -> None:
        self.index = index
        self._max_failed = max_failed_reads
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            devices = _video_devices()
            found = ", ".join(devices) if devices else "no /dev/video* devices exist"
            raise CameraError(f"cannot open camera {index!r} (available: {found}); check --webcam-index "
                              f"and that no other program holds the camera")
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        cap.set(cv2.CAP_PROP_FPS, fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # best effort: fewer stale frames queued in the driver
        self._cap: cv2.VideoCapture | None = cap

    def read(self) -> tuple[np.ndarray, float] | None:
        if self._cap is None:
            return None
        for _ in range(self._max_failed):
            ok, bgr = self._cap.read()
            if ok and bgr is not None:
                return np.ascontiguousarray(bgr[:, :, ::-1]), time.monotonic()
            time.sleep(0.01)
        raise CameraError(f"camera {self.index!r} stopped delivering frames (unplugged or in use?)")

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class VideoFileSource:
    """Decodes a video file with PyAV. `loop=True` restarts at the end (plain loop, continuous
    timestamps); otherwise `read()` returns None after the last frame."""

    def __init__(self, path: str | Path, realtime: bool = True, loop: bool = False) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.loop = loop
        if not self.path.is_file():
            raise VideoSourceError(f"pose video not found: {self.path}")
        self._container = None
        self._frames = None
        self._clock_origin: float | None = None  # monotonic time of media time 0
        self._offset = 0.0      # media time added by completed loops
        self._last_t = 0.0      # media time of the last frame returned (without the offset)
        self._pass_count = 0    # frames returned in the current pass
        self._open()

    def _open(self) -> None:
        import av

        try:
            self._container = av.open(str(self.path))
            if not self._container.streams.video:
                raise VideoSourceError(f"{self.path} has no video stream")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            self._interval = 1.0 / float(rate) if rate else _FALLBACK_DT
            self._frames = self._container.decode(stream)
        except av.FFmpegError as exc:
            self.close()
            raise VideoSourceError(f"cannot open pose video {self.path}: {exc}") from None
        self._first_t: float | None = None
        self._pass_count = 0

    def read(self) -> tuple[np.ndarray, float] | None:
        import av

        while self._frames is not None:
            try:
                frame = next(self._frames)
            except StopIteration:
                if not self.loop or self._pass_count == 0:
                    self.close()
                    return None
                self._offset += self._last_t + self._interval
                self.close()
                self._open()
                continue
            except av.FFmpegError as exc:
                raise VideoSourceError(f"cannot decode pose video {self.path}: {exc}") from None
            t = frame.time if frame.time is not None else self._pass_count * self._interval
            if self._first_t is None:
                self._first_t = t
            self._last_t = t - self._first_t
            self._pass_count += 1
            media_t = self._offset + self._last_t
            now = time.monotonic()
            if self._clock_origin is None:
                self._clock_origin = now - media_t
            captured_at = self._clock_origin + media_t
            if self.realtime and captured_at > now:
                time.sleep(captured_at - now)
            return frame.to_ndarray(format="rgb24"), captured_at
        return None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None
        self._frames = None


# --------------------------------------------------------------------------- smoothing
class PoseFilter(Protocol):
    def update(self, code: np.ndarray, t: float) -> np.ndarray: ...
    def reset(self) -> None: ...


def _dt(t: float, t_prev: float | None) -> float:
    if t_prev is None or not t > t_prev:
        return _FALLBACK_DT
    return t - t_prev


class EmaFilter:
    """Exponential moving average with a time constant in seconds: alpha = 1 − exp(−dt/τ).

    Being time-based, it smooths the same in wall-clock terms whether the worker runs at 5 or 50 Hz,
    and it is scale-free (pose codes have no known units). Lag ≈ τ; a step reaches 95 % in ≈ 3τ.
    """

    def __init__(self, time_constant: float = 0.1) -> None:
        if time_constant < 0:
            raise ValueError("time_constant must be >= 0")
        self.time_constant = time_constant
        self.reset()

    def reset(self) -> None:
        self._y: np.ndarray | None = None
        self._t: float | None = None

    def update(self, code: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(code, dtype=np.float64)
        if self._y is None or self.time_constant == 0:
            self._y = x.copy()
        else:
            alpha = 1.0 - math.exp(-_dt(t, self._t) / self.time_constant)
            self._y = self._y + alpha * (x - self._y)
        self._t = t
        return self._y.astype(np.float32)


def make_pose_filter(smoothing: PoseFilter | float | None) -> PoseFilter | None:
    """Config value → filter. A float s in [0, 1) is `pose.smoothing` of configs/default.toml: the
    memory of y = s·y_prev + (1−s)·x per 25 fps frame. It becomes a time-based EMA with the same
    response at 25 Hz (τ = −0.04 s / ln s), so a slower worker does not smooth over a longer span.
    0 or None = off; a filter object is used as is."""
    if smoothing is None or hasattr(smoothing, "update"):
        return smoothing  # type: ignore[return-value]
    s = float(smoothing)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"pose smoothing must be in [0, 1), got {s}")
    return None if s == 0.0 else EmaFilter(-_FALLBACK_DT / math.log(s))


# --------------------------------------------------------------------------- worker
@dataclass(frozen=True)
class PoseSample:
    code: np.ndarray          # (12,) float32; while face_found is False: the last good code (held)
    captured_at: float        # capture time of the newest frame processed (monotonic clock)
    face_found: bool          # whether that newest frame had a face
    frames_without_face: int  # consecutive processed frames without a face (0 when face_found)


class PoseWorker:
    """Frames → alignment → `encode` → smoothing → `latest()`, off the render loop.

    Real-time sources (`source.realtime`) get a reader thread that keeps only the newest frame in a
    one-slot mailbox (each replaced frame counts in `frames_dropped`); the processing thread always
    takes the newest, so a slow detector lowers the pose rate instead of adding latency. Non-real-time sources (a video file
    decoded as fast as possible) are read in order by the processing thread itself, every frame used.
    A frame without a face keeps the last code; nothing is published before the first face (the engine
    then uses the photo's own pose). Exceptions from any thread are kept and re-raised in the owner's
    thread by `check()`. `smoothing`: a PoseFilter, a float (see `make_pose_filter`) or None.
    """

    def __init__(self, source: FrameSource, aligner: Aligner,
                 encode: Callable[[np.ndarray], np.ndarray], smoothing: PoseFilter | float | None) -> None:
        self.source, self.aligner, self.encode = source, aligner, encode
        self.smoothing = make_pose_filter(smoothing)
        self._drop_stale = source.realtime
        self._last_code: np.ndarray | None = None
        self._latest: PoseSample | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._slot: tuple[np.ndarray, float] | None = None   # newest unprocessed frame (mailbox)
        self._source_ended = False
        self._finished = False
        self._error: BaseException | None = None
        self._face_visible: bool | None = None   # None: no frame processed yet
        self._without_face = 0
        self.frames_processed = 0
        self.frames_dropped = 0
        self._threads: list[threading.Thread] = []
        self._stopped = False

    # ----------------------------------------------------------------- owner API
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("PoseWorker already started")
        if self._drop_stale:
            self._threads.append(threading.Thread(target=self._read_loop, name="pose-reader", daemon=True))
        self._threads.append(threading.Thread(target=self._process_loop, name="pose-worker", daemon=True))
        for th in self._threads:
            th.start()

    def latest(self) -> PoseSample | None:
        """Newest published sample (a plain attribute read: never blocks); None before the first face."""
        return self._latest

    @property
    def finished(self) -> bool:
        """True once a finite source ended and its last frame was processed (the pose stays held)."""
        return self._finished

    @property
    def alive(self) -> bool:
        return any(th.is_alive() for th in self._threads)

    def check(self) -> None:
        """Re-raise, in the caller's thread, an exception that stopped the worker."""
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the threads, then close the source. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        stuck = []
        for th in self._threads:
            th.join(timeout)
            if th.is_alive():
                stuck.append(th.name)
        if stuck:  # a camera driver blocked in read(); closing under it would be unsafe
            log.error("pose worker threads did not stop within %.1f s: %s", timeout, ", ".join(stuck))
            return
        self.source.close()

    def __enter__(self) -> "PoseWorker":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- threads
    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                item = self.source.read()
                with self._cond:
                    if item is None:
                        self._source_ended = True
                    else:
                        if self._slot is not None:
                            self.frames_dropped += 1
                        self._slot = item
                    self._cond.notify_all()
                if item is None:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the owner via check()
            with self._cond:
                self._error = self._error or exc
                self._cond.notify_all()

    def _next_frame(self) -> tuple[np.ndarray, float] | None:
        if not self._drop_stale:
            return self.source.read()
        with self._cond:
            while (self._slot is None and not self._source_ended and self._error is None
                   and not self._stop.is_set()):
                self._cond.wait(0.2)
            item, self._slot = self._slot, None
            return item

    def _process_loop(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._next_frame()
                if item is None:
                    if not self._stop.is_set() and self._error is None:
                        self._finished = True
                        log.info("pose source ended; holding the last pose")
                    return
                self._process(*item)
        except BaseException as exc:  # noqa: BLE001 - handed to the owner via check()
            self._error = self._error or exc
            self._stop.set()

    def _process(self, frame: np.ndarray, captured_at: float) -> None:
        aligned = self.aligner.align(frame)
        self.frames_processed += 1
        if aligned is None:
            self._without_face += 1
            if self._face_visible is not False:
                log.warning("face lost; holding last pose" if self._face_visible
                            else "no face in the pose source yet; using the default pose")
            self._face_visible = False
        else:
            raw = _as_code(self.encode(aligned.image))
            code = raw if self.smoothing is None else self.smoothing.update(raw, captured_at)
            self._last_code = _as_code(code)
            if self._face_visible is False:
                log.info("face found; pose tracking resumed")
            self._face_visible = True
            self._without_face = 0
        if self._last_code is None:
            return
        self._latest = PoseSample(self._last_code, captured_at, aligned is not None, self._without_face)


def _as_code(code) -> np.ndarray:
    arr = np.array(code, dtype=np.float32).reshape(-1)  # a private copy: the caller may reuse its buffer
    if arr.shape != (POSE_DIM,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"pose encoder must return {POSE_DIM} finite values, got shape {np.shape(code)}")
    arr.flags.writeable = False  # samples are shared with the render thread
    return arr
