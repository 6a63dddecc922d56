"""Studio sessions: what runs behind each browser of `stream.studio.StudioServer`.

A `StudioSession` is one session in the same structure as the CLI's run (pcavs_live/pipeline/builders.py): its
own identity (photo encoded once, on the process's one `RenderRuntime`), the browser's microphone as
its audio source (`BrowserAudioSource` → its own `AudioTimeline`), the browser's camera through its own
`PoseWorker` (or the photo's pose), `SessionOutput` as its sink, and the same `Scheduler`, on a thread
the session owns. Its renderer is a handle of the process's one `SharedRenderer`, so every session's
ready frame goes through one batched network pass.

A session is built by the CLI's own `SessionBuilder`, with the browser's parts given to it.

`StudioSessions` is the server's factory: it encodes identities (`AvatarFactory`: the bundled sample
with its landmark sidecar, or an uploaded photo through the landmark detector) and attaches sessions to
the shared renderer. `serve` wires the whole studio from a Config (`run_live.py serve`): on a GPU it
warms every render bucket up to `server.max_sessions` (`prepare_runtime`) before the first offer is
accepted, and every session's pose worker tracks the face through the one shared landmark model
(`pcavs.alignment.tracking`: the box detector runs only when the face is lost); the sessions' tracked
crops share FAN forwards (`pcavs.alignment.fan_batch.FanBatcher`) and their aligned crops share
pose-encoder passes (`PoseBatcher`).
"""
from __future__ import annotations

import asyncio
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
from pcavs.alignment import LandmarkDetector, load_landmark_sidecar, read_rgb, sidecar_path
from pcavs.alignment.fan_batch import BatchedLandmarkModel, FanBatcher, StagedLandmarkModel
from pcavs.mel import StreamingGain, StreamingMel
from pcavs_live.pipeline.builders import POSE_DETECT_MAX_SIDE, encode_identity
from pcavs_live.pipeline.engine_setup import PoseBatcher
from pcavs_live.pipeline.metrics import LiveMetrics
from pcavs_live.pipeline.options import Config
from pcavs_live.pipeline.session import RunOptions, Session, SessionBuilder
from pcavs_live.pipeline.shared_renderer import RendererClosed, SharedRenderer

log = logging.getLogger(__name__)

# (photo RGB or None for the sample, name) → (avatar, aligned 224² crop)
EncodeIdentity = Callable[[np.ndarray | None, str], tuple[object, np.ndarray]]


class AvatarFactory:
    """Photo → Avatar on the shared runtime (it runs the network `IdentityEncoder`; it is not one).
    The sample uses its landmark sidecar; uploads use the
    landmark detector (a photo without a face: `FaceNotFoundError`, one line for the page)."""

    def __init__(self, runtime, options, sample_photo: Path,
                 detector: Callable[[], LandmarkDetector] | None) -> None:
        self.runtime, self.options = runtime, options  # a RenderRuntime; None until serve has warmed it
        self.sample_photo = Path(sample_photo)
        self.detector = detector
        self._lock = threading.Lock()    # one detector and one identity pass at a time

    def __call__(self, photo: np.ndarray | None, name: str):
        if self.runtime is None:
            raise UserError("the studio is still loading its networks; try again in a few seconds")
        with self._lock:
            if photo is None:
                side = sidecar_path(self.sample_photo)
                landmarks = load_landmark_sidecar(side) if side.is_file() else None
                avatar, face = encode_identity(self.runtime, self.options, read_rgb(self.sample_photo), name,
                                               landmarks, self.detector)
            else:
                avatar, face = encode_identity(self.runtime, self.options, photo, name, None, self.detector)
            return avatar, face.image


class StudioSession:
    """One browser's session: built by `start`, torn down by `stop` (idempotent, from any thread)."""

    def __init__(self, avatar, placeholder: np.ndarray, renderer: SharedRenderer,
                 pose_detector: Callable[[], LandmarkDetector] | None, config: Config,
                 device: str | None, pose_batcher: PoseBatcher | None = None) -> None:
        self.avatar, self.placeholder = avatar, placeholder
        self.config = config
        self._pose_batcher = pose_batcher
        self.metrics = LiveMetrics()
        self._renderer = renderer
        self._pose_detector = pose_detector
        self._device = device
        self.handle = None
        self._source: BrowserAudioSource | None = None
        self._video: BrowserVideoSource | None = None
        self._session: Session | None = None
        self._share = None               # the RoomShare while this session shares to the room
        self._shares_started = 0         # shares this session has gone on air with (carried across toggles)
        self._builder: SessionBuilder | None = None   # makes each new share (`set_share`)
        self._worker: Worker | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self.end_reason: str | None = None

    def start(self, audio, video, loop: asyncio.AbstractEventLoop, sink, on_end: Callable[[str], None],
              share: bool = False) -> None:
        """Build and start the session; `share`: also publish it to the room (`[whip]`, a `RoomShare`).
        Sharing can be turned on and off while it runs (`set_share`): its sinks are built shareable."""
        with self._lock:
            if self._stopped or self._worker is not None:
                raise RuntimeError("a studio session starts once")
            self._source = BrowserAudioSource(audio, loop)
            detector = None
            if video is not None and self._pose_detector is not None:
                self._video = BrowserVideoSource(video, loop)
                detector = self._pose_detector()
            elif video is not None:
                log.info("no landmark detector for camera pose; using the photo's pose")
            self.handle = self._renderer.handle(self.avatar)
            builder = SessionBuilder(
                self.config, RunOptions(realtime=True, status_interval_s=0), landmark_detector=detector,
                avatar=(self.avatar, self.placeholder), renderer=self.handle,
                audio=(self._source, StreamingMel(StreamingGain())), sinks=sink, pose_frames=self._video,
                metrics=self.metrics, pose_batcher=self._pose_batcher, shares=("whip",) if share else (),
                shareable=True)
            self._session = session = builder.build()
            self._builder = builder
            self._share = builder.shares.get("whip")
            self._shares_started += self._share is not None
            self._worker = Worker(lambda: self._run(session, on_end), "studio-session", stopping=self._stop)
            self._worker.start()

    def set_share(self, on: bool) -> bool:
        """Go on air in the room (a new `RoomShare` added to the running session's sinks: a new WHIP
        resource) or off it (taken out of the sinks, then closed: the WHIP resource is DELETEd, which
        may take seconds, so not under the session's lock). Idempotent; from any thread but the
        session's own. Returns whether the session now shares. Raises RuntimeError before `start`."""
        with self._lock:
            session = self._session
            if self._stopped or session is None or self._builder is None:
                raise RuntimeError("the session is not running")
            if on == (self._share is not None):
                return on
            if on:
                share = self._builder.share("whip")
                # RoomShare.open returns at once (it connects on its own thread); False: the session's
                # sinks have already closed (its run ended), and the share was closed with nothing sent
                if not session.add_sink(share):
                    return False
                self._share = share
                self._shares_started += 1
                return True
            share, self._share = self._share, None
        session.remove_sink(share)               # no write to it is in flight from here
        share.close()
        return False

    def _run(self, session: Session, on_end: Callable[[str], None]) -> None:
        reason = "the browser's audio ended"
        try:
            summary = session.run(self._stop)
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
        """Seconds since the browser's audio last arrived (since the session began reading it when none
        has yet). 0 while the session warms up: its audio is read only once the renderer is warm, which
        on a loaded machine took longer than the lost-connection timeout (the session was ended as lost
        while the browser was sending)."""
        source = self._source
        if source is None:
            return 0.0
        last = source.last_frame_at if source.last_frame_at is not None else source.reading_since
        return 0.0 if last is None else time.monotonic() - last

    def stats(self) -> dict:
        snap = self.metrics.snapshot()
        if self.handle is not None:
            snap.update(self.handle.stats())
        if self._source is not None:
            snap["audio_chunks_dropped"] = self._source.dropped_chunks
            snap["audio_nonfinite_samples"] = self._source.nonfinite_samples
        worker = None if self._session is None else self._session.pose_worker
        if worker is not None:
            snap["pose_frames_processed"] = worker.frames_processed
            snap["pose_frames_busy"] = worker.frames_busy
        # the share_* counters are the current share's (each share starts from zero); `share_count`
        # (how many times this session went on air) is carried across toggles
        share = self._share
        if share is not None:
            snap.update(share.status())
        elif self._shares_started:
            snap["share_state"] = "off"
        if self._shares_started:
            snap["share_count"] = self._shares_started
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
        if self._session is not None:
            self._session.close()        # the pose worker
        if self._source is not None:
            self._source.stop()
        if self._video is not None:
            self._video.close()
        # Free the session's slot in the identity bank and drop every reference to its tensors: the
        # caching allocator reuses them for the next session. No gc.collect() (GIL held for the whole
        # heap) and no torch.cuda.empty_cache() (a device-wide sync, and an allocator assert if it
        # overlapped another thread's graph capture) on a stop.
        close = getattr(self.avatar, "close", None)
        if close is not None:
            close()
        self.avatar = self.handle = self._source = self._video = self._session = self._worker = self._share = None
        self._builder = None
        self.placeholder = None


class StudioSessions:
    """The server's session factory: one `SharedRenderer` and one avatar factory for all sessions; each
    session's pose smoothing and rate come from `config.pose`."""

    def __init__(self, encode: EncodeIdentity, renderer: SharedRenderer, config: Config,
                 pose_detector: Callable[[], LandmarkDetector] | None = None, device: str | None = None,
                 pose_batcher: PoseBatcher | None = None, landmarks: SharedLandmarkModel | None = None) -> None:
        self.encode, self.renderer, self.config = encode, renderer, config
        self.pose_detector, self.device, self.pose_batcher = pose_detector, device, pose_batcher
        self.landmarks = landmarks

    def room(self) -> dict:
        """The studio's "share to room" setting: `enabled`, `reason` (why not), `viewer_url` ([whip])."""
        whip = self.config.whip
        reason = None if whip.endpoint else ("the server has no WHIP endpoint: set whip.endpoint in its config "
                                             "(README: An audience through an SFU)")
        return {"enabled": reason is None, "reason": reason, "viewer_url": whip.viewer_url or None}

    def create(self, photo: np.ndarray | None, name: str) -> StudioSession:
        avatar, aligned = self.encode(photo, name)
        return StudioSession(avatar, aligned, self.renderer, self.pose_detector, self.config, self.device,
                             pose_batcher=self.pose_batcher)

    def stats(self) -> dict:
        """The renderer's, and the shared pose path's: FAN batches (`pose_fan_*`, with the crops
        dropped on a full queue and the waits timed out) and pose-encoder batches."""
        out = dict(self.renderer.stats())
        if self.landmarks is not None:
            out.update(self.landmarks.stats())
        if self.pose_batcher is not None:
            out.update(self.pose_batcher.stats())
        return out


class SharedLandmarkModel:
    """The process's one landmark model (face_alignment's SFD + FAN), loaded on first use and shared by
    the identity encoder (boxes at full size) and every session's pose worker (`max_side`:
    `POSE_DETECT_MAX_SIDE`). What it hands out keeps the model's two stages (`face_boxes`,
    `landmarks_in_boxes`), so each session's pose worker tracks its face (`tracking_detector`) and runs
    the box detector only when the face is lost. No studio-wide lock around a session's frame.

    `for_pose` is what a session's pose worker gets: when the model's FAN stage splits
    (`pcavs.alignment.fan_batch.StagedLandmarkModel`), its FAN goes through the one `FanBatcher` of
    the model, so sessions' tracked crops share FAN forwards; `stats()` has the batcher's counters."""

    def __init__(self, load: Callable[[], object], fan_batch: int = 64, fan_pending: int = 256,
                 fan_timeout_s: float = 2.0, fan_window_s: float = 0.0,
                 fan_buckets: tuple[int, ...] | None = None) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._model: object | None = None
        self._fan_options = dict(max_batch=fan_batch, max_pending=fan_pending, timeout_s=fan_timeout_s,
                                 window_s=fan_window_s, buckets=fan_buckets)
        self.fan_batcher: FanBatcher | None = None

    def _loaded(self) -> object:
        with self._lock:      # loaded once, by the first caller
            if self._model is None:
                model = self._load()
                if isinstance(model, StagedLandmarkModel):
                    self.fan_batcher = FanBatcher(model.fan_heatmaps, **self._fan_options)
                self._model = model
            return self._model

    def __call__(self, max_side: int | None = None):
        model = self._loaded()
        resize = getattr(model, "with_detect_max_side", None)
        return model if resize is None else resize(max_side)

    def for_pose(self, max_side: int | None = None):
        """A session pose worker's model: FAN through the shared batcher when the model allows it."""
        model = self(max_side)
        if self.fan_batcher is None or not isinstance(model, StagedLandmarkModel):
            return model
        return BatchedLandmarkModel(model, self.fan_batcher)

    def stats(self) -> dict[str, object]:
        return {} if self.fan_batcher is None else self.fan_batcher.stats()

    def warm_up(self, sessions: int) -> list[int]:
        """Load the model now and run FAN once at every batch size `sessions` sessions' crops can
        form (on a GPU: cuDNN autotunes those shapes before the first offer). Returns the sizes run."""
        self._loaded()
        if self.fan_batcher is None:
            return []
        return self.fan_batcher.warm_up(sessions, np.full((3, 256, 256), 0.5, np.float32))


FAN_WINDOW_S = 0.004   # the studio's FanBatcher window on a GPU (`pcavs.alignment.fan_batch`)


@dataclass(frozen=True)
class ServeOptions:
    ice_host_addresses: tuple[str, ...] | None = None  # override (loopback tests)
    landmark_detector: object | None = None            # injected detector (tests); default face_alignment
    lost_timeout_s: float = 5.0


def studio_parts(config: Config, landmark_detector: object | None = None,
                 ) -> tuple[StudioSessions, Callable[[], None]]:
    """The studio's pieces, as one process (`serve`) or one cluster worker (`pcavs_live.cluster`) runs
    them: one landmark model, one `SharedRenderer`, the `StudioSessions` factory. Returns the factory and
    `load`, which loads the networks, warms the runtime up for `server.max_sessions` rows (on a GPU also
    the landmark network's FAN batch sizes, `SharedLandmarkModel.warm_up`) and starts the renderer;
    until it has run, offers are refused ("still loading"), so no CUDA graph is captured while
    sessions wait. The caller stops `factory.renderer`."""
    from pcavs.device import configure_cudnn
    from pcavs.alignment import LandmarkModelUnavailable
    from pcavs.engine import render_sessions
    from pcavs.runtime import DEFAULT_BUCKETS
    from pcavs_live.pipeline.builders import engine_options, make_runtime
    from pcavs_live.pipeline.engine_setup import prepare_runtime

    opts = engine_options(config.model)

    def load_detector():
        if landmark_detector is not None:
            return landmark_detector
        from pcavs.alignment import FaceAlignmentDetector
        model = FaceAlignmentDetector(device=opts.device)
        configure_cudnn(opts.device)  # importing face_alignment set it behind our back
        return model

    # On a GPU a FAN forward is a few ms: a 4 ms window lets the sessions' pose frames meet in one batch,
    # padded to the render buckets so cuDNN autotunes a few shapes (warmed in `load`).
    cuda = opts.device.startswith("cuda")
    detector = SharedLandmarkModel(load_detector, fan_window_s=FAN_WINDOW_S if cuda else 0.0,
                                   fan_buckets=DEFAULT_BUCKETS if cuda else None)
    renderer = SharedRenderer(render_sessions)
    factory = StudioSessions(AvatarFactory(None, opts, Path(config.identity.photo), detector), renderer, config,
                             pose_detector=lambda: detector.for_pose(POSE_DETECT_MAX_SIDE), device=opts.device,
                             pose_batcher=PoseBatcher(), landmarks=detector)

    def load() -> None:
        if cuda:
            try:
                sizes = detector.warm_up(config.server.max_sessions)
                log.info("landmark network warmed up for batch sizes %s", sizes)
            except LandmarkModelUnavailable as exc:   # said again to the first session that needs it
                log.warning("%s", exc)
        runtime = make_runtime(config.model, opts)
        prepare_runtime(runtime, config.server.max_sessions)
        factory.encode.runtime = runtime  # from here offers are accepted
        renderer.start()

    return factory, load


def serve(config: Config, options: ServeOptions = ServeOptions(), stop: threading.Event | None = None,
          ready: Callable[[object], None] | None = None) -> int:
    """Start the studio server, then load and warm the networks (`studio_parts`), run until `stop`.
    A port in use is reported before the networks load."""
    from pcavs_live.pipeline.outputs.webrtc import ice_servers_for
    from stream.studio import StudioServer

    stop = stop or threading.Event()
    s = config.server
    hosts = options.ice_host_addresses
    factory, load = studio_parts(config, options.landmark_detector)
    server = StudioServer(factory, host=s.host, port=s.port, token=s.token, max_sessions=s.max_sessions,
                          ice_servers=ice_servers_for(s),
                          ice_host_addresses=s.ice_host_addresses if hosts is None else hosts,
                          lost_timeout_s=options.lost_timeout_s)
    server.start()               # a port in use is reported before the networks load
    try:
        load()
        print(f"studio: open {server.url}  (up to {s.max_sessions} sessions)", file=sys.stderr, flush=True)
        if config.whip.endpoint:
            print(f"studio: a session can share to the room at {config.whip.endpoint}"
                  + (f"; room viewers open {config.whip.viewer_url}" if config.whip.viewer_url else ""),
                  file=sys.stderr, flush=True)
        if ready is not None:
            ready(server)
        stop.wait()
    finally:
        server.stop()
        factory.renderer.stop()
    return 0
