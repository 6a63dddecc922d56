"""Pose frame sources (webcam, video file), the live worker that turns frames into pose codes, and the
offline pose sequence of a whole video.

Live, the generator runs at the audio clock; head pose comes from a separate, slower path (landmarks +
alignment + the pose encoder). `PoseWorker` runs that path on its own thread(s) and publishes only its
latest result, so the render loop never waits for a face detector: `latest()` is a plain read.

Offline (a file rendered to a file), every output frame gets its own pose-video frame, as in upstream's
loader: `encode_pose_video` finds the landmarks of every frame, aligns them all with the clip's mean
transform (`ClipAligner`) and encodes them in batches into a `PoseSequence`; the model's frame i then
uses pose frame `ping_pong_index(i, n)`.

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
from typing import Callable, Protocol, Sequence

import cv2
import numpy as np

from pcavs_live.common.errors import UserError
from pcavs_live.common.workers import Worker
from pcavs.alignment import AlignedFace, ClipAligner, LandmarkDetector, largest_face
from pcavs.alignment.errors import LandmarksBusy
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


def ping_pong_index(i: int, n: int) -> int:
    """Pose-video frame used for the model's frame i when the video has n frames: upstream's loader plays
    the video back and forth with each end shown twice, 0, 1, …, n−1, n−1, …, 1, 0, 0, 1, … (spec §5;
    `calc_loop_idx` in upstream's util.py)."""
    if n < 1:
        raise ValueError("a pose video needs at least one frame")
    lap, pos = divmod(i, n)
    return pos if lap % 2 == 0 else n - 1 - pos


class VideoFileSource:
    """Decodes a video file with PyAV. `ping_pong=True` plays it back and forth forever in upstream's order
    (`ping_pong_index`) on one continuous clock, so the head never jumps at the loop point; otherwise
    `read()` returns None after the last frame.

    A codec only decodes forwards, so a backward pass goes in chunks of at most `reverse_chunk_bytes` of
    frames: seek to the keyframe before a chunk, decode forward to its end, hand it out in reverse. Memory
    stays bounded at one chunk, at the price of decoding from that keyframe again.
    """

    def __init__(self, path: str | Path, realtime: bool = True, ping_pong: bool = False,
                 reverse_chunk_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.realtime = realtime
        self.ping_pong = ping_pong
        self._chunk_bytes = reverse_chunk_bytes
        if not self.path.is_file():
            raise VideoSourceError(f"pose video not found: {self.path}")
        self._container = None
        self._clock_origin: float | None = None  # monotonic time of media time 0
        self._media_t = 0.0                      # media time of the last frame returned, across passes
        self._last_index: int | None = None      # index of the last frame returned
        self._times: list[float] = []            # media time of each frame (first pass)
        self._pts: list[int | None] = []         # pts of each frame (first pass), for seeking back
        self._open()
        self._play = self._frames()

    def _open(self) -> None:
        import av

        self.close()
        try:
            self._container = av.open(str(self.path))
            if not self._container.streams.video:
                raise VideoSourceError(f"{self.path} has no video stream")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            self._interval = 1.0 / float(rate) if rate else _FALLBACK_DT
        except av.FFmpegError as exc:
            self.close()
            raise VideoSourceError(f"cannot open pose video {self.path}: {exc}") from None

    def _decode(self):
        return self._container.decode(self._container.streams.video[0])

    def _frames(self):
        """(index, rgb) in playing order."""
        for i, frame in enumerate(self._decode()):
            t = frame.time if frame.time is not None else i * self._interval
            self._times.append(t)
            self._pts.append(frame.pts)
            yield i, frame.to_ndarray(format="rgb24")
        n = len(self._times)
        if not self.ping_pong or n == 0:
            return
        while True:
            hi = n - 1
            while hi >= 0:
                lo = max(0, hi - self._chunk_frames() + 1)
                chunk = self._decode_range(lo, hi)
                for i in range(hi, lo - 1, -1):
                    yield i, chunk[i - lo]
                hi = lo - 1
            self._open()
            for i, frame in enumerate(self._decode()):
                if i >= n:
                    break
                yield i, frame.to_ndarray(format="rgb24")

    def _chunk_frames(self) -> int:
        stream = self._container.streams.video[0]
        frame_bytes = max(1, stream.codec_context.width * stream.codec_context.height * 3)
        return max(1, self._chunk_bytes // frame_bytes)

    def _decode_range(self, lo: int, hi: int) -> list[np.ndarray]:
        """Frames lo..hi, decoded from the keyframe before `lo` (found by seeking to its pts), or from the
        start of the file when the frames carry no usable timestamps or the seek landed too late."""
        if lo > 0 and None not in self._pts and len(set(self._pts)) == len(self._pts):
            by_pts = {p: i for i, p in enumerate(self._pts)}
            self._container.seek(self._pts[lo], stream=self._container.streams.video[0], backward=True)
            chunk = _collect(lo, hi, ((by_pts.get(f.pts), f) for f in self._decode()))
            if chunk is not None:
                return chunk
        self._open()
        chunk = _collect(lo, hi, enumerate(self._decode()))
        if chunk is None:
            raise VideoSourceError(f"pose video {self.path} has fewer frames on a second pass")
        return chunk

    def read(self) -> tuple[np.ndarray, float] | None:
        import av

        if self._container is None:
            return None
        try:
            item = next(self._play, None)
        except av.FFmpegError as exc:
            raise VideoSourceError(f"cannot decode pose video {self.path}: {exc}") from None
        if item is None:
            self.close()
            return None
        index, rgb = item
        if self._last_index is not None:
            step = abs(self._times[index] - self._times[self._last_index])
            self._media_t += step if step > 0 else self._interval  # an end shown twice lasts one frame
        self._last_index = index
        now = time.monotonic()
        if self._clock_origin is None:
            self._clock_origin = now - self._media_t
        captured_at = self._clock_origin + self._media_t
        if self.realtime and captured_at > now:
            time.sleep(captured_at - now)
        return rgb, captured_at

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None


def _collect(lo: int, hi: int, indexed) -> list[np.ndarray] | None:
    """Frames lo..hi as RGB from (index, av frame) pairs in decoding order; None if one is missing (index
    None: a frame the first pass did not see)."""
    out: list[np.ndarray] = []
    for i, frame in indexed:
        if i is None or i < lo:
            continue
        if i != lo + len(out):
            return None
        out.append(frame.to_ndarray(format="rgb24"))
        if i >= hi:
            break
    return out if len(out) == hi - lo + 1 else None


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
    A frame whose landmarks the shared landmark batcher could not compute in time (`LandmarksBusy`)
    is skipped and counted in `frames_busy`; the last pose holds.
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
        self.frames_busy = 0
        self._workers: list[Worker] = []
        self._stopped = False

    # ----------------------------------------------------------------- owner API
    def start(self) -> None:
        if self._workers:
            raise RuntimeError("PoseWorker already started")
        if self._drop_stale:
            self._workers.append(Worker(self._read_loop, "pose-reader", self._wake, self._stop))
        self._workers.append(Worker(self._process_loop, "pose-worker", self._wake, self._stop))
        for worker in self._workers:
            worker.start()

    def latest(self) -> PoseSample | None:
        """Newest published sample (a plain attribute read: never blocks); None before the first face."""
        return self._latest

    @property
    def finished(self) -> bool:
        """True once a finite source ended and its last frame was processed (the pose stays held)."""
        return self._finished

    @property
    def alive(self) -> bool:
        return any(worker.alive for worker in self._workers)

    def check(self) -> None:
        """Re-raise, in the caller's thread, an exception that stopped the worker."""
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join the threads, then close the source. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for worker in self._workers:
            worker.request_stop()
        # Each stuck thread is logged by name; a camera driver blocked in read() must not be closed under.
        stopped = [worker.join(timeout) for worker in self._workers]
        if all(stopped):
            self.source.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

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
        try:
            aligned = self.aligner.align(frame)
        except LandmarksBusy:
            self.frames_busy += 1
            return
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


# --------------------------------------------------------------------------- offline: one code per frame
@dataclass(frozen=True)
class PoseSequence:
    """The pose code of every frame of a pose video, for offline rendering. The model's frame i uses
    frame `ping_pong_index(i, n)`, so the result does not depend on timing: the same on every run."""

    codes: np.ndarray               # (n, POSE_DIM) float32; a frame without a face holds a neighbour's code
    face_found: np.ndarray          # (n,) bool, per frame
    frames_without_face: np.ndarray  # (n,) int: consecutive faceless frames up to and including this one

    def __len__(self) -> int:
        return len(self.codes)

    def index(self, frame: int) -> int:
        """The pose-video frame used for the model's frame `frame`."""
        return ping_pong_index(frame, len(self.codes))

    def codes_for(self, frames: Sequence[int]) -> np.ndarray:
        """(len(frames), POSE_DIM) codes for the model's frames `frames`."""
        return self.codes[[self.index(i) for i in frames]]


def encode_pose_video(path: str | Path, detector: LandmarkDetector,
                      encode: Callable[[np.ndarray], np.ndarray], batch_size: int = 16,
                      frames_needed: int | None = None) -> PoseSequence:
    """Two passes over the file, bounded memory: the landmarks of every frame (upstream's align_68 needs
    the whole clip's mean before the first crop), then the crops of the frames that are used, encoded
    `batch_size` at a time by `encode` ((B,224,224,3) uint8 RGB crops → (B, POSE_DIM) codes).

    `frames_needed`: how many of the model's frames will be rendered (None: all); later video frames are
    aligned for the mean but not encoded. A frame without a face holds the code of the nearest earlier
    frame with one (the first such frame for the frames before it); a video without any face is a
    `FaceNotFoundError` naming it. Unlike live, no smoothing: frame t is exactly pose frame t.
    """
    landmarks: list[np.ndarray | None] = []
    several_faces = False
    source = VideoFileSource(path, realtime=False)
    try:
        while (item := source.read()) is not None:
            faces = detector.detect(item[0])
            if len(faces) > 1 and not several_faces:
                log.warning("pose video %s: %d faces in frame %d; following the largest", path, len(faces),
                            len(landmarks))
                several_faces = True
            landmarks.append(largest_face(faces) if faces else None)
    finally:
        source.close()
    if not landmarks:
        raise VideoSourceError(f"pose video {path} has no frames")
    aligner = ClipAligner(landmarks, name=f"pose video {path}")
    n = len(landmarks)
    found = np.array([lm is not None for lm in landmarks])
    first_face = int(np.argmax(found))
    used = n if frames_needed is None else min(n, max(frames_needed, first_face + 1))

    codes = np.zeros((n, POSE_DIM), np.float32)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        out = np.asarray(encode(np.stack([crop for _, crop in pending])), dtype=np.float32)
        if out.shape != (len(pending), POSE_DIM) or not np.all(np.isfinite(out)):
            raise ValueError(f"pose encoder must return ({len(pending)}, {POSE_DIM}) finite values, "
                             f"got shape {out.shape}")
        codes[[i for i, _ in pending]] = out
        pending.clear()

    source = VideoFileSource(path, realtime=False)
    try:
        for i in range(used):
            item = source.read()
            if item is None:
                raise VideoSourceError(f"pose video {path} has fewer frames on a second pass")
            face = aligner.align(i, item[0])
            if face is not None:
                pending.append((i, face.image))
                if len(pending) == batch_size:
                    flush()
        flush()
    finally:
        source.close()

    run = np.zeros(n, np.int64)
    for i in range(n):
        if found[i]:
            continue
        run[i] = run[i - 1] + 1 if i else 1
        if i < used:
            codes[i] = codes[i - 1] if i > first_face else codes[first_face]
    missing = int((~found).sum())
    if missing:
        log.warning("pose video %s: no face in %d of %d frames; they hold a neighbouring frame's pose",
                    path, missing, n)
    log.info("pose video %s: %d frames aligned to the clip's mean, %d encoded", path, n, used)
    for arr in (codes, found, run):
        arr.flags.writeable = False
    return PoseSequence(codes, found, run)
