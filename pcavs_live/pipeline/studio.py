"""Studio sessions: what runs behind each browser of `stream.studio.StudioServer`.

A `StudioSession` is one session in the same structure as the CLI's run (pcavs_live/pipeline/builders.py): its
own identity (photo encoded once, sharing the one loaded `PcavsNetworks`), the browser's microphone as
its audio source (`BrowserAudioSource` → its own `AudioTimeline`), the browser's camera through its own
`PoseWorker` (or the photo's pose), `SessionOutput` as its sink, and the same `Scheduler`, on a thread
the session owns. Its renderer is a handle of the process's one `SharedRenderer`, so every session's
ready frame goes through one batched network pass.

`StudioSessions` is the server's factory: it encodes identities (`IdentityEncoder`: the bundled sample
with its landmark sidecar, or an uploaded photo through the landmark detector) and attaches sessions to
the shared renderer. `serve` wires the whole studio from a Config (`run_live.py serve`).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pcavs_live.common.errors import UserError
from pcavs_live.common.workers import Worker
from capture.browser_tracks import BrowserAudioSource, BrowserVideoSource
from capture.pose_rate import DEFAULT_RATE_HZ
from pcavs.alignment import LandmarkDetector, load_landmark_sidecar, read_rgb, sidecar_path
from pcavs.mel import StreamingGain, StreamingMel
from pcavs_live.pipeline.builders import POSE_DETECT_MAX_SIDE, encode_identity, make_scheduler, start_live_pose
from pcavs_live.pipeline.metrics import LiveMetrics
from pcavs_live.pipeline.scheduler import SchedulerOptions
from pcavs_live.pipeline.shared_renderer import RendererClosed, SharedRenderer
from pcavs_live.pipeline.timeline import AudioTimeline

log = logging.getLogger(__name__)

# (photo RGB or None for the sample, name) → (avatar, aligned 224² crop)
EncodeIdentity = Callable[[np.ndarray | None, str], tuple[object, np.ndarray]]


def release_device_memory(device: str | None) -> None:
    """Give a finished session's memory back: collect its cycles, and empty PyTorch's CUDA cache so
    that `nvidia-smi` (and the next session) see the memory free."""
    gc.collect()
    if device is not None and str(device).startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


class IdentityEncoder:
    """Photo → Avatar on the shared networks. The sample uses its landmark sidecar; uploads use the
    landmark detector (a photo without a face: `FaceNotFoundError`, one line for the page)."""

    def __init__(self, networks, options, sample_photo: Path,
                 detector: Callable[[], LandmarkDetector] | None) -> None:
        self.networks, self.options = networks, options
        self.sample_photo = Path(sample_photo)
        self.detector = detector
        self._lock = threading.Lock()    # one detector and one identity pass at a time

    def __call__(self, photo: np.ndarray | None, name: str):
        if self.networks is None:
            raise UserError("the studio is still loading its networks; try again in a few seconds")
        with self._lock:
            if photo is None:
                side = sidecar_path(self.sample_photo)
                landmarks = load_landmark_sidecar(side) if side.is_file() else None
                avatar, face = encode_identity(self.networks, self.options, read_rgb(self.sample_photo), name,
                                               landmarks, self.detector)
            else:
                avatar, face = encode_identity(self.networks, self.options, photo, name, None, self.detector)
            return avatar, face.image


class StudioSession:
    """One browser's session: built by `start`, torn down by `stop` (idempotent, from any thread)."""

    def __init__(self, avatar, placeholder: np.ndarray, renderer: SharedRenderer,
                 pose_detector: Callable[[], LandmarkDetector] | None, pose_smoothing: float | None,
                 device: str | None, pose_rate_hz: float = DEFAULT_RATE_HZ) -> None:
        self.avatar, self.placeholder = avatar, placeholder
        self._pose_rate_hz = pose_rate_hz
        self.metrics = LiveMetrics()
        self._renderer = renderer
        self._pose_detector, self._pose_smoothing = pose_detector, pose_smoothing
        self._device = device
        self.handle = None
        self._source: BrowserAudioSource | None = None
        self._video: BrowserVideoSource | None = None
        self._pose_worker = None
        self._worker: Worker | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._started_at: float | None = None
        self._lock = threading.Lock()
        self.end_reason: str | None = None

    def start(self, audio, video, loop: asyncio.AbstractEventLoop, sink, on_end: Callable[[str], None]) -> None:
        with self._lock:
            if self._stopped or self._worker is not None:
                raise RuntimeError("a studio session starts once")
            self._started_at = time.monotonic()
            self._source = BrowserAudioSource(audio, loop)
            timeline = AudioTimeline(StreamingMel(StreamingGain()))
            pose, checks = None, []
            if video is not None and self._pose_detector is not None:
                self._video = BrowserVideoSource(video, loop)
                self._pose_worker, pose = start_live_pose(self._video, self.avatar, self._pose_detector(),
                                                          self._pose_smoothing, self._pose_rate_hz, self.metrics)
                checks = [self._pose_worker.check]
            elif video is not None:
                log.info("no landmark detector for camera pose; using the photo's pose")
            self.handle = self._renderer.handle(self.avatar)
            scheduler = make_scheduler(self._source, timeline, self.handle, sink, self.placeholder, pose,
                                       self.metrics, SchedulerOptions(), health_checks=checks)
            self._worker = Worker(lambda: self._run(scheduler, on_end), "studio-session", stopping=self._stop)
            self._worker.start()

    def _run(self, scheduler, on_end: Callable[[str], None]) -> None:
        reason = "the browser's audio ended"
        try:
            summary = scheduler.run(self._stop)
            if summary.stopped_early:
                reason = "stopped"
        except RendererClosed:
            reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - the session ends; the server says why
            log.error("studio session failed: %s", exc, exc_info=True)
            reason = f"error: {' '.join(str(exc).split())}"
        self.end_reason = reason
        if not self._stop.is_set():
            on_end(reason)

    def idle_s(self) -> float:
        """Seconds since the browser's audio last arrived (since start when none has yet)."""
        source, started = self._source, self._started_at
        if source is None or started is None:
            return 0.0
        last = source.last_frame_at if source.last_frame_at is not None else started
        return time.monotonic() - last

    def stats(self) -> dict:
        snap = self.metrics.snapshot()
        if self.handle is not None:
            snap.update(self.handle.stats())
        if self._source is not None:
            snap["audio_chunks_dropped"] = self._source.dropped_chunks
        if self._pose_worker is not None:
            snap["pose_frames_processed"] = self._pose_worker.frames_processed
        return snap

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stop.set()
        if self.handle is not None:
            self.handle.close()          # a render waiting for its batch returns at once
        if self._worker is not None:
            self._worker.join(10)        # a stuck session thread is named in the log
        if self._pose_worker is not None:
            self._pose_worker.stop()
        if self._source is not None:
            self._source.stop()
        if self._video is not None:
            self._video.close()
        # Drop every reference to the session's tensors and buffers, then return the memory.
        self.avatar = self.handle = self._source = self._video = self._pose_worker = self._worker = None
        self.placeholder = None
        release_device_memory(self._device)


class StudioSessions:
    """The server's session factory: one `SharedRenderer` and one identity encoder for all sessions."""

    def __init__(self, encode: EncodeIdentity, renderer: SharedRenderer,
                 pose_detector: Callable[[], LandmarkDetector] | None = None,
                 pose_smoothing: float | None = 0.5, device: str | None = None, pose_rate_hz: float = DEFAULT_RATE_HZ) -> None:
        self.encode, self.renderer = encode, renderer
        self.pose_detector, self.pose_smoothing, self.device = pose_detector, pose_smoothing, device
        self.pose_rate_hz = pose_rate_hz

    def create(self, photo: np.ndarray | None, name: str) -> StudioSession:
        avatar, aligned = self.encode(photo, name)
        return StudioSession(avatar, aligned, self.renderer, self.pose_detector, self.pose_smoothing, self.device,
                             self.pose_rate_hz)

    def stats(self) -> dict:
        return self.renderer.stats()


@dataclass(frozen=True)
class ServeOptions:
    ice_host_addresses: tuple[str, ...] | None = None  # override (loopback tests)
    landmark_detector: object | None = None            # injected detector (tests); default face_alignment
    lost_timeout_s: float = 5.0


def serve(config, options: ServeOptions = ServeOptions(), stop: threading.Event | None = None,
          ready: Callable[[object], None] | None = None) -> int:
    """Load the networks once, start the shared renderer and the studio server, run until `stop`."""
    from pcavs.engine import render_sessions
    from pcavs_live.pipeline.builders import engine_options, load_engine
    from stream.studio import StudioServer
    from stream.webrtc import ice_servers

    stop = stop or threading.Event()
    s, m = config.server, config.model
    hosts = options.ice_host_addresses
    detector_lock = threading.Lock()
    shared: list = []

    def detector(max_side: int | None = None):
        if options.landmark_detector is not None:
            return options.landmark_detector
        with detector_lock:      # one face_alignment model for the process (loaded on first use)
            if not shared:
                from pcavs.alignment import FaceAlignmentDetector
                shared.append(FaceAlignmentDetector(device=opts.device))
            return _LockedDetector(shared[0].with_detect_max_side(max_side), detector_lock)

    opts = engine_options(m.device, m.dtype, m.noise, m.noise_seed, m.mouth_weight)
    renderer = SharedRenderer(render_sessions)
    factory = StudioSessions(IdentityEncoder(None, opts, Path(config.identity.photo), detector), renderer,
                             pose_detector=lambda: detector(POSE_DETECT_MAX_SIDE), pose_smoothing=config.pose.smoothing,
                             device=opts.device, pose_rate_hz=config.pose.rate_hz)
    server = StudioServer(factory, host=s.host, port=s.port, token=s.token, max_sessions=s.max_sessions,
                          ice_servers=ice_servers(s.stun_url, s.turn_url, s.turn_username, s.turn_credential),
                          ice_host_addresses=s.ice_host_addresses if hosts is None else hosts,
                          lost_timeout_s=options.lost_timeout_s)
    server.start()               # a port in use is reported before the networks load
    try:
        factory.encode.networks = load_engine(m.checkpoint_dir, opts)
        renderer.start()
        print(f"studio: open {server.url}  (up to {s.max_sessions} sessions)", file=sys.stderr, flush=True)
        if ready is not None:
            ready(server)
        stop.wait()
    finally:
        server.stop()
        renderer.stop()
    return 0


class _LockedDetector:
    """The process's one landmark model, used by several sessions' threads one call at a time."""

    def __init__(self, detector: LandmarkDetector, lock: threading.Lock) -> None:
        self._detector, self._lock = detector, lock

    def detect(self, rgb: np.ndarray):
        with self._lock:
            return self._detector.detect(rgb)
