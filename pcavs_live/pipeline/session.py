"""A session is built, then run: `SessionBuilder(config).build()` → a `Session(audio, renderer, sinks, pose)`.

The builder turns a Config into a session's parts: the identity (`build_avatar`), the audio input and its
timeline (`pcavs_live.pipeline.inputs.AUDIO_INPUTS`), the sinks (`pcavs_live.pipeline.outputs.OUTPUTS`),
the pose (a live pose worker, or offline a pose video encoded frame by frame up front) and the
renderer. Any part can be given to the builder instead (its constructor arguments): tests inject a
renderer or a landmark detector, and each studio session (`pcavs_live.pipeline.studio`) passes the
browser's tracks, its shared-renderer handle and its outgoing tracks, so the CLI's one run and every
studio session are built by the same code and run by the same `Session.run`.

A `Session` owns everything that was opened for it (web server, pose worker and its camera, sinks) and
closes it in reverse order (`close()`, or the `with` block); a build that fails closes what it had opened.
A real-time session runs the live `Scheduler`; a file rendered to files (not real time) the
`OfflineRenderer`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from pcavs_live.common.errors import UserError
from pcavs.alignment import (AlignedFace, FaceAlignmentDetector, LandmarkDetector, load_landmark_sidecar, read_rgb,
                             sidecar_path)
from pcavs.constants import FPS
from pcavs.device import resolve_device
from pcavs.engine import Avatar, encode_poses
from pcavs_live.pipeline.builders import (POSE_DETECT_MAX_SIDE, encode_identity, engine_options, make_runtime,
                                          make_scheduler, start_live_pose)
from pcavs_live.pipeline.engine_setup import PoseBatcher, prepare_engine
from pcavs_live.pipeline.inputs import audio_input, pose_input
from pcavs_live.pipeline.metrics import LiveMetrics, format_status_line
from pcavs_live.pipeline.offline import OfflineOptions, OfflineRenderer, SlotPose, sequence_pose
from pcavs_live.pipeline.options import Config
from pcavs_live.pipeline.outputs import OUTPUTS, OutputContext, build_sink, build_sinks, is_live, prepare_outputs
from pcavs_live.pipeline.scheduler import Renderer, RunSummary, SchedulerOptions
from pcavs_live.pipeline.timeline import AudioTimeline, model_frame_index
from stream.sinks import FanOutSink, FrameSink

if TYPE_CHECKING:
    from capture.audio_sources import AudioSource
    from capture.pose_sources import FrameSource
    from pcavs.mel import StreamingMel

log = logging.getLogger(__name__)

LivePose = Callable[[], Union[np.ndarray, None]]   # real time: the newest pose code (or None: the photo's)


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices that are not part of the persistent config."""

    realtime: bool | None = None          # None: real time when any output is live (`outputs.is_live`)
    max_seconds: float | None = None      # stop after this much output (previews, tests)
    status_interval_s: float = 1.0        # terminal status line period; 0 disables it


class StatusPrinter:
    """Prints the compact status line at most once per interval, from the scheduler's own thread. With a
    known length (offline rendering of a file) the line starts with a progress bar and an ETA."""

    def __init__(self, metrics: LiveMetrics, interval_s: float, stream=sys.stderr,
                 total_frames: int | None = None) -> None:
        self._metrics, self._interval, self._stream = metrics, interval_s, stream
        self._total = total_frames
        self._last = 0.0
        self._started = time.monotonic()
        self._tty = hasattr(stream, "isatty") and stream.isatty()

    def progress(self, done: int) -> str:
        """'[#####.....]  50% 82/164 frames, ETA 41 s' for a known total, else ''."""
        if not self._total:
            return ""
        frac = min(1.0, done / self._total)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        elapsed = time.monotonic() - self._started
        eta = f"ETA {elapsed / frac - elapsed:.0f} s" if frac > 0 else "ETA -"
        return f"[{bar}] {frac:4.0%} {done}/{self._total} frames, {eta} | "

    def __call__(self, frame_index: int) -> None:
        now = time.monotonic()
        last_frame = self._total is not None and frame_index + 1 >= self._total
        if self._interval <= 0 or (now - self._last < self._interval and not last_frame):
            return
        self._last = now
        line = self.progress(frame_index + 1) + format_status_line(self._metrics.snapshot())
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
            self._stream.flush()
        else:
            log.info(line)


def build_avatar(config: Config, detector: Callable[[], LandmarkDetector]
                 ) -> tuple[Avatar, AlignedFace, np.ndarray]:
    """Load the networks and encode the identity once. Returns the avatar, the aligned photo (its 224²
    crop doubles as the placeholder frame before the first generated one, its matrix places the generated
    face back into the photo for output.framing = "paste") and the photo itself (RGB uint8, read once).
    `detector` is only called when the photo has no landmark sidecar."""
    options = engine_options(config.model)  # device checked here
    photo = Path(config.identity.photo)
    if not photo.is_file():
        raise UserError(f"identity photo {photo} not found", hint="pass --identity PATH to a photo of a face")
    rgb = read_rgb(photo)  # a damaged photo is named as such, before any model is loaded
    runtime = make_runtime(config.model, options)
    side = sidecar_path(photo)
    landmarks = load_landmark_sidecar(side) if side.is_file() else None  # a sidecar needs no detector
    avatar, face = encode_identity(runtime, options, rgb, str(photo), landmarks, detector)
    return avatar, face, rgb


class Session:
    """A built session, ready to run: its audio (source + timeline), renderer, sinks and pose. `pose` is a
    `LivePose` for a real-time run, a `SlotPose` offline, or None for the photo's own pose. Owns `stack`
    (what was opened for it), closed by `close()`."""

    def __init__(self, audio: "AudioSource", renderer: Renderer | Avatar, sinks: FrameSink,
                 pose: LivePose | SlotPose | None, *, timeline: AudioTimeline, placeholder: np.ndarray,
                 metrics: LiveMetrics, realtime: bool = True, max_frames: int | None = None,
                 health_checks: Sequence[Callable[[], None]] = (), on_frame: Callable[[int], None] | None = None,
                 stack: contextlib.ExitStack | None = None, server: object | None = None,
                 live: threading.Event | None = None, pose_worker: object | None = None,
                 recorder: object | None = None, fanout: FanOutSink | None = None) -> None:
        self.audio, self.renderer, self.sinks, self.pose = audio, renderer, sinks, pose
        self.fanout = fanout              # the sinks' FanOutSink when sinks may come and go (`add_sink`)
        self.timeline, self.placeholder, self.metrics = timeline, placeholder, metrics
        self.realtime, self.max_frames = realtime, max_frames
        self.health_checks, self.on_frame = list(health_checks), on_frame
        self.server = server              # the viewer server, when "webrtc" is an output
        self.pose_worker = pose_worker    # the live pose worker, if one runs (its counters are the session's)
        self.recorder = recorder          # the mp4 output, when there is one (its frames_written: the "wrote" line)
        self.live = live or threading.Event()  # set while the loop runs: a stop request is then prompt
        self._stack = stack or contextlib.ExitStack()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def add_sink(self, sink: FrameSink) -> bool:
        """Another output for the running session (any thread; the studio's "share to room" going on air):
        it gets every slot from the next one on, the other sinks lose or repeat none. Needs a session
        built with `shares` or `shareable`."""
        if self.fanout is None:
            raise RuntimeError("this session was not built to add sinks (SessionBuilder(shareable=True))")
        return self.fanout.add(sink)

    def remove_sink(self, sink: FrameSink) -> bool:
        """Take an added sink out again (any thread); the caller closes it."""
        return self.fanout is not None and self.fanout.remove(sink)

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        """The live scheduler (real time) or the offline renderer, until the audio ends, `max_frames`, or `stop`."""
        if self.realtime:
            loop = make_scheduler(self.audio, self.timeline, self.renderer, self.sinks, placeholder=self.placeholder,
                                  pose=self.pose, metrics=self.metrics,  # type: ignore[arg-type]
                                  options=SchedulerOptions(max_frames=self.max_frames),
                                  health_checks=self.health_checks, on_frame=self.on_frame)
        else:
            loop = OfflineRenderer(self.audio, self.timeline, self.renderer, self.sinks,
                                   frame_size=(self.placeholder.shape[1], self.placeholder.shape[0]),
                                   pose=self.pose, metrics=self.metrics,  # type: ignore[arg-type]
                                   options=OfflineOptions(max_frames=self.max_frames),
                                   health_checks=self.health_checks, on_frame=self.on_frame)
        self.live.set()
        try:
            return loop.run(stop)
        finally:
            self.live.clear()


class SessionBuilder:
    """Config (+ any parts given instead) → `Session`. `prepare()` binds what must fail early (the viewer's
    port) before the networks load; `build()` does the rest. Every argument after `run` replaces one part:

    * `landmark_detector` — the face detector for the photo and the pose frames (default: one
      face_alignment model, loaded on first use, shared by both).
    * `avatar` — (avatar, placeholder frame): an identity already encoded (studio), or any renderer with
      its placeholder (tests, benches); the networks are then not loaded here.
    * `renderer` — what renders the frames (default: the avatar itself; the studio: a shared-renderer handle).
    * `audio` — (source, mel front end) instead of `audio.source` (the studio: the browser's microphone).
    * `sinks` — where frames go instead of `output.targets` (the studio: the browser's outgoing tracks);
      `wrap_sink` wraps whatever sinks were built (benches stamp each slot's index).
    * `shares` — registry outputs that also get the frames beside `sinks`, each built and opened in the
      background (`stream.whip.RoomShare`: a failure is a status line, never the session's end): the
      studio's "share to room" is `shares=("whip",)`. The built shares are `builder.shares` by name.
      `shareable=True` builds the same fan-out without any: `builder.share(name)` makes a new `RoomShare`
      (a new output, so a new WHIP resource, each time) that `Session.add_sink` puts on air while the
      session runs, and `Session.remove_sink` takes off.
    * `pose_frames` — live frames for the pose worker instead of `pose.source` (the studio: the browser's camera).
    * `ice_host_addresses` — the viewer's ICE addresses (loopback tests); `metrics` — the session's metrics.
    * `pose_batcher` — encodes several sessions' pose crops in one pass (the studio's `PoseBatcher`).
    """

    def __init__(self, config: Config, run: RunOptions = RunOptions(), *,
                 landmark_detector: LandmarkDetector | None = None,
                 avatar: tuple[Avatar | object, np.ndarray] | None = None,
                 renderer: Renderer | None = None,
                 audio: tuple["AudioSource", "StreamingMel"] | None = None,
                 sinks: FrameSink | None = None,
                 wrap_sink: Callable[[FrameSink], FrameSink] | None = None,
                 pose_frames: "FrameSource | None" = None,
                 ice_host_addresses: tuple[str, ...] | None = None,
                 metrics: LiveMetrics | None = None,
                 pose_batcher: "PoseBatcher | None" = None,
                 shares: Sequence[str] = (), shareable: bool = False) -> None:
        self.config, self.run_options = config, run
        self._share_names = tuple(shares)
        self._shareable = shareable or bool(self._share_names)
        self._framing: tuple[AlignedFace | None, np.ndarray | None] = (None, None)   # for shares' framing
        self.shares: dict[str, object] = {}
        self._pose_batcher = pose_batcher
        self._landmark_detector, self._avatar, self._renderer = landmark_detector, avatar, renderer
        self._audio, self._sinks, self._wrap_sink, self._pose_frames = audio, sinks, wrap_sink, pose_frames
        self.metrics = metrics or LiveMetrics()
        self.realtime = run.realtime if run.realtime is not None else (sinks is not None or is_live(config))
        self.live = threading.Event()    # the built session's: from when its loop runs, a stop request is prompt
        self._stack = contextlib.ExitStack()
        self._outputs = OutputContext(config, self.metrics, self._stack, OUTPUTS, ice_host_addresses)
        self._landmarks: FaceAlignmentDetector | None = None
        self._pose_worker: object | None = None
        self._built: Session | None = None

    @property
    def server(self):
        """The viewer server once prepared (None without a "webrtc" output)."""
        return self._outputs.server

    def prepare(self) -> None:
        """Bind and start what the outputs need before the networks load (a port in use is said at once)."""
        if self._sinks is None:
            prepare_outputs(self._outputs)

    def close(self) -> None:
        """Close what was opened: what `prepare` opened, or the built session (which owns the rest)."""
        self._stack.close()
        if self._built is not None:
            self._built.close()

    def __enter__(self) -> "SessionBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> Session:
        try:
            return self._build()
        except BaseException:
            self._stack.close()
            raise

    # ------------------------------------------------------------------ the parts
    def _detector(self, device: str, detect_max_side: int | None) -> LandmarkDetector:
        """The injected detector, else ONE face_alignment model (loaded on first use) shared by the
        photo and the pose worker."""
        if self._landmark_detector is not None:
            return self._landmark_detector
        if self._landmarks is None:
            self._landmarks = FaceAlignmentDetector(device=device)
        return self._landmarks.with_detect_max_side(detect_max_side)

    def _voice_lead_notice(self) -> Callable[[int], None] | None:
        """`--out vcam` without `--out vmic`: tell the user once that the call hears the voice early."""
        targets = self.config.output.targets
        if self._sinks is not None or "vcam" not in targets or "vmic" in targets:
            return None
        from stream.vmic import VoiceLeadNotice
        return VoiceLeadNotice(lambda: self.metrics.snapshot().get("latency_ms_median"),  # type: ignore[arg-type]
                               from_microphone=audio_input(self.config.audio).device)

    def _live_pose(self, avatar: Avatar) -> tuple[Callable[[], None], LivePose] | None:
        """The live pose path (a camera, or a video played in real time back and forth): the started
        worker's health check and the per-frame pose callback; None for the photo's own pose."""
        frames = self._pose_frames
        if frames is None:
            make_frames = pose_input(self.config.pose).frames
            if make_frames is None:
                return None
            frames = make_frames(self.config.pose)
            self._stack.callback(frames.close)
        pose = self.config.pose
        worker, latest = start_live_pose(frames, avatar, self._detector(avatar.device, POSE_DETECT_MAX_SIDE),
                                         pose.smoothing, pose.rate_hz, self.metrics,
                                         pose_batcher=self._pose_batcher)
        self._stack.callback(worker.stop)
        self._pose_worker = worker
        return worker.check, latest

    def _pose_sequence(self, avatar: Avatar, slots: int | None) -> SlotPose:
        """Offline pose from a video: every frame's code up front (`slots`: how many will be rendered, if
        known), slot t → the model's frame t's code."""
        from capture.pose_sources import encode_pose_video
        numbering = self.config.timing.upstream_frame_numbering
        sequence = encode_pose_video(
            Path(self.config.pose.source), self._detector(avatar.device, detect_max_side=POSE_DETECT_MAX_SIDE),
            encode=lambda crops: encode_poses(avatar.networks, crops),
            frames_needed=None if slots is None else model_frame_index(slots, numbering))
        return sequence_pose(sequence, numbering, self.metrics)

    def share(self, name: str):
        """A new `RoomShare` of the output `name` ("whip"): it builds its sink (framed) on its own thread
        when it opens, from an output context of its own, so every share is a new output (a new WHIP
        resource) and none reuses a closed one."""
        from stream.whip import RoomShare
        if name not in OUTPUTS:
            raise ValueError(f"no output named {name!r} to share to")
        face, photo = self._framing
        ctx = OutputContext(self.config, self.metrics, contextlib.ExitStack(), OUTPUTS,
                            self._outputs.ice_host_addresses)
        viewer_url = self.config.whip.viewer_url if name == "whip" else None
        return RoomShare(lambda: build_sink(ctx, name, face, photo), viewer_url=viewer_url)

    def _build_shares(self) -> list[FrameSink]:
        """The `shares` outputs, each a `RoomShare` (`share`)."""
        for name in self._share_names:
            self.shares[name] = self.share(name)
        return list(self.shares.values())

    def _build(self) -> Session:
        self.prepare()
        face: AlignedFace | None = None
        photo: np.ndarray | None = None
        if self._avatar is not None:
            avatar, placeholder = self._avatar
        else:
            avatar, face, photo = build_avatar(
                self.config, lambda: self._detector(resolve_device(self.config.model.device), detect_max_side=None))
            placeholder = face.image
        source, mel = self._audio if self._audio is not None else \
            audio_input(self.config.audio).build(self.config.audio, self.realtime)
        # NaN/inf input samples the source turned into silence (one warning line when it happened); a
        # looped bundled sample has none
        self.metrics.watch("audio_nonfinite_samples", lambda: getattr(source, "nonfinite_samples", 0))
        sink = self._sinks if self._sinks is not None else build_sinks(self._outputs, face, photo)
        self._framing = (face, photo)
        fanout = FanOutSink([sink, *self._build_shares()]) if self._shareable else None
        sink = fanout or sink
        if self._wrap_sink is not None:
            sink = self._wrap_sink(sink)
        max_s = self.run_options.max_seconds
        max_frames = None if max_s is None else int(max_s * FPS)
        duration = getattr(source, "duration_s", None)
        total = None if self.realtime or duration is None else math.ceil(duration * FPS)
        if total is not None and max_frames is not None:
            total = min(total, max_frames)
        timeline = AudioTimeline(mel, upstream_frame_numbering=self.config.timing.upstream_frame_numbering)
        checks = [getattr(source, "check_health", lambda: None)]
        hooks = [h for h in (StatusPrinter(self.metrics, self.run_options.status_interval_s, total_frames=total)
                             if self.run_options.status_interval_s > 0 else None,
                             self._voice_lead_notice()) if h is not None]

        def on_frame(k: int) -> None:
            for hook in hooks:
                hook(k)

        renderer = self._renderer or avatar
        networks_here = self._avatar is None
        if networks_here:  # before the clock starts: every batch size in use, cudnn autotuning set by us
            prepare_engine(avatar, (1,) if self.realtime else range(1, OfflineOptions().batch_size + 1),
                           self.metrics)

        pose: LivePose | SlotPose | None = None
        # A renderer given with its placeholder is not an Avatar: no pose worker for it unless frames are given.
        if isinstance(avatar, Avatar) or self._pose_frames is not None:
            if not self.realtime and pose_input(self.config.pose).sequence and self._pose_frames is None:
                pose = self._pose_sequence(avatar, total)
            else:
                live_pose = self._live_pose(avatar)  # real time, or a webcam feeding a file
                if live_pose is not None:
                    checks.insert(0, live_pose[0])
                    pose = live_pose[1] if self.realtime else repeat_latest(live_pose[1])

        stack, self._stack = self._stack, contextlib.ExitStack()  # the session owns what was opened
        self._built = Session(source, renderer, sink, pose, timeline=timeline, placeholder=placeholder, metrics=self.metrics,
                       realtime=self.realtime, max_frames=max_frames, health_checks=checks, on_frame=on_frame if hooks else None,
                       stack=stack, server=self.server, live=self.live, pose_worker=self._pose_worker,
                       recorder=self._outputs.built("file"), fanout=fanout)
        return self._built


def repeat_latest(latest: LivePose) -> SlotPose:
    """A live pose source (webcam) feeding an offline render: its latest code for every slot."""
    def codes(slots: Sequence[int]) -> np.ndarray | None:
        code = latest()
        return None if code is None else np.repeat(np.asarray(code, np.float32)[None], len(slots), 0)
    return codes
