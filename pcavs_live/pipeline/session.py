"""Wiring one session from a Config: sources → features → engine → sinks.

`LiveSession` owns every resource it opens (audio source, pose worker and its camera, sinks, web server)
and closes them in reverse order, whatever fails in between. A real-time run goes through the live
`Scheduler`; a file rendered to files (not real time) through `OfflineRenderer`, where a pose video is
encoded frame by frame up front (`encode_pose_video`). `run_live.py` only parses arguments, builds a
Config, and runs a `LiveSession`.
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
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pcavs_live.common.errors import UserError
from capture.audio_sources import FileAudioSource, MicrophoneSource
from capture.looped_audio import LoopedAudioSource
from pcavs_live.cli.config import Config
from pcavs.alignment import (AlignedFace, FaceAlignmentDetector, LandmarkDetector, load_landmark_sidecar, read_rgb,
                             sidecar_path)
from pcavs.constants import FPS
from pcavs.device import resolve_device
from pcavs.engine import Avatar, encode_poses
from pcavs.mel import FixedGain, StreamingGain, StreamingMel, file_gain
from pcavs_live.pipeline.builders import (POSE_DETECT_MAX_SIDE, encode_identity, engine_options, make_runtime, make_scheduler,
                               start_live_pose)
from pcavs_live.pipeline.engine_setup import prepare_engine
from pcavs_live.pipeline.metrics import LiveMetrics, format_status_line
from pcavs_live.pipeline.offline import OfflineOptions, OfflineRenderer, SlotPose, sequence_pose
from pcavs_live.pipeline.scheduler import Renderer, RunSummary, SchedulerOptions
from pcavs_live.pipeline.timeline import AudioTimeline, model_frame_index
from stream.sinks import FrameSink

if TYPE_CHECKING:
    from capture.pose_sources import PoseWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices that are not part of the persistent config."""

    realtime: bool | None = None          # None: real time unless every output is a file
    max_seconds: float | None = None      # stop after this much output (previews, tests)
    status_interval_s: float = 1.0        # terminal status line period; 0 disables it
    ice_host_addresses: tuple[str, ...] | None = None  # WebRTC ICE addresses override (loopback tests)
    landmark_detector: object | None = None            # injected detector (tests); default face_alignment
    renderer: object | None = None                     # injected renderer (tests); default the PC-AVS avatar
    # Bench/test seams: build (renderer, placeholder frame) instead of loading the networks; wrap the
    # outputs (e.g. to stamp each slot's index into what viewers receive).
    build_renderer: Callable[[Config], tuple[Renderer, np.ndarray]] | None = None
    wrap_sink: Callable[[FrameSink], FrameSink] | None = None


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
    m = config.model
    options = engine_options(m.device, m.dtype, m.noise, m.noise_seed, m.mouth_weight)  # device checked here
    photo = Path(config.identity.photo)
    if not photo.is_file():
        raise UserError(f"identity photo {photo} not found", hint="pass --identity PATH to a photo of a face")
    rgb = read_rgb(photo)  # a damaged photo is named as such, before any model is loaded
    runtime = make_runtime(m.checkpoint_dir, options)
    side = sidecar_path(photo)
    landmarks = load_landmark_sidecar(side) if side.is_file() else None  # a sidecar needs no detector
    avatar, face = encode_identity(runtime, options, rgb, str(photo), landmarks, detector)
    return avatar, face, rgb


def build_audio(config: Config, realtime: bool):
    """The audio source and the mel front end with the configured level normalisation."""
    if config.audio.is_mic:
        device: str | int | None = config.audio.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        if config.audio.gain == "file":
            raise UserError("audio.gain = 'file' needs a whole file; a microphone uses 'running' or 'none'")
        source = MicrophoneSource(device)
        gain = StreamingGain() if config.audio.gain == "running" else FixedGain(1.0)
        return source, StreamingMel(gain)
    path = config.audio.file_path
    assert path is not None
    source = FileAudioSource(path, realtime=realtime)
    samples = source.audio
    if config.audio.gain == "none":
        gain = FixedGain(1.0)
    elif config.audio.gain == "file" or not realtime:
        gain = FixedGain(float(file_gain(samples)))  # exactly upstream's whole-file normalisation
    else:
        gain = StreamingGain()
    if config.audio.source == "sample" and realtime:
        # The bundled clip is seconds long: loop it so a live viewer opened later still sees the demo.
        return (LoopedAudioSource(lambda start_at: FileAudioSource.from_samples(samples, realtime=True,
                                                                                start_at=start_at)),
                StreamingMel(gain))
    return source, StreamingMel(gain)


class LiveSession:
    """Everything one run opens, closed in reverse order by `close()` (or the `with` block)."""

    def __init__(self, config: Config, run: RunOptions = RunOptions()) -> None:
        self.config, self.run_options = config, run
        self.metrics = LiveMetrics()
        self._stack = contextlib.ExitStack()
        self._landmarks: FaceAlignmentDetector | None = None
        self.server = None
        self.realtime = run.realtime if run.realtime is not None else \
            any(t != "file" for t in config.output.targets)
        self.live = threading.Event()   # set once the loop runs: from then on a stop request is prompt

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ pieces
    def _detector(self, device: str, detect_max_side: int | None) -> LandmarkDetector:
        """The injected detector, else ONE face_alignment model (loaded on first use) shared by the
        photo and the pose worker."""
        if self.run_options.landmark_detector is not None:
            return self.run_options.landmark_detector  # type: ignore[return-value]
        if self._landmarks is None:
            self._landmarks = FaceAlignmentDetector(device=device)
        return self._landmarks.with_detect_max_side(detect_max_side)

    def _sinks(self, face: AlignedFace | None, photo: np.ndarray | None):
        """The configured outputs; `face` and `photo` (None with an injected renderer) for paste framing."""
        from stream.framing import FramedSink, SharedFramer, make_framer, size_for
        from stream.sinks import FanOutSink
        output = self.config.output
        framers: dict[tuple[int, int], SharedFramer] = {}  # one per size, shared by the outputs of that size

        def framed(sink, target: str):
            size = size_for(output.size, target)
            if size is None:
                return sink
            if size not in framers:
                paste = output.framing == "paste" and face is not None and photo is not None
                framers[size] = SharedFramer(make_framer("paste" if paste else "fit", size,
                                                         photo if paste else None,
                                                         face.matrix if paste else None))
            return FramedSink(sink, framers[size])

        vmic = None
        if "vmic" in output.targets:
            from stream.vmic import VirtualMicSink
            vmic = VirtualMicSink(device=self.config.vmic.device, preroll_ms=self.config.vmic.preroll_ms)
        sinks = []
        for target in output.targets:
            if target == "file":
                from stream.recorder import Mp4Recorder
                path = Path(output.file)
                path.parent.mkdir(parents=True, exist_ok=True)
                sinks.append(framed(Mp4Recorder(path), target))
            elif target == "vcam":
                from stream.vcam import VirtualCameraSink
                cam = VirtualCameraSink(device=self.config.vcam.device, backend=self.config.vcam.backend)
                if vmic is not None:  # the voice leaves the microphone playout_delay_s after release
                    from stream.delay import DelayedSink
                    cam = DelayedSink(cam, lambda mic=vmic: mic.playout_delay_s)
                sinks.append(framed(cam, target))  # framed here, in the scheduler's thread
            elif target == "vmic":
                sinks.append(vmic)
            elif target == "webrtc":
                from stream.webrtc import WebRTCSink
                self.start_server()
                sinks.append(framed(WebRTCSink(self.server), target))
        return FanOutSink(sinks)

    def _voice_lead_notice(self) -> Callable[[int], None] | None:
        """`--out vcam` without `--out vmic`: tell the user once that the call hears the voice early."""
        targets = self.config.output.targets
        if "vcam" not in targets or "vmic" in targets:
            return None
        from stream.vmic import VoiceLeadNotice
        return VoiceLeadNotice(lambda: self.metrics.snapshot().get("latency_ms_median"),  # type: ignore[arg-type]
                               from_microphone=self.config.audio.is_mic)

    def start_server(self) -> None:
        """Bind and start the viewer server when "webrtc" is an output (once). `run` calls it first, so
        that a port in use is reported at once, not after the networks have been loaded."""
        if "webrtc" not in self.config.output.targets or self.server is not None:
            return
        from stream.webrtc import WebRTCServer, ice_servers
        s = self.config.server
        hosts = self.run_options.ice_host_addresses
        server = WebRTCServer(host=s.host, port=s.port, token=s.token, stats=self.metrics.snapshot,
                              ice_servers=ice_servers(s.stun_url, s.turn_url, s.turn_username, s.turn_credential),
                              ice_host_addresses=s.ice_host_addresses if hosts is None else hosts)
        server.start()
        self._stack.callback(server.stop)
        self.server = server

    def _live_pose(self, avatar: Avatar) -> tuple[PoseWorker, Callable[[], np.ndarray | None]] | None:
        """The live pose path (webcam, or a video played in real time back and forth): the started worker
        and the per-frame pose callback; None for the photo's own pose."""
        source_kind = self.config.pose.source
        if source_kind in ("still", "none"):
            return None  # the photo's own head pose (reference pose)
        from capture.pose_sources import VideoFileSource, WebcamSource
        if source_kind == "webcam":
            frames = WebcamSource(self.config.pose.webcam_index)
        else:
            frames = VideoFileSource(self.config.pose.video_path, realtime=True, ping_pong=True)
        self._stack.callback(frames.close)
        worker, latest = start_live_pose(frames, avatar, self._detector(avatar.device, POSE_DETECT_MAX_SIDE),
                                         self.config.pose.smoothing, self.config.pose.rate_hz, self.metrics)
        self._stack.callback(worker.stop)
        return worker, latest

    def _pose_sequence(self, avatar: Avatar, slots: int | None) -> SlotPose:
        """Offline pose from a video: every frame's code up front (`slots`: how many will be rendered, if
        known), slot t → the model's frame t's code."""
        from capture.pose_sources import encode_pose_video
        numbering = self.config.timing.upstream_frame_numbering
        sequence = encode_pose_video(
            self.config.pose.video_path, self._detector(avatar.device, detect_max_side=POSE_DETECT_MAX_SIDE),
            encode=lambda crops: encode_poses(avatar.networks, crops),
            frames_needed=None if slots is None else model_frame_index(slots, numbering))
        return sequence_pose(sequence, numbering, self.metrics)

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        self.start_server()
        injected = self.run_options.build_renderer
        face: AlignedFace | None = None
        photo: np.ndarray | None = None
        if injected is not None:
            avatar, placeholder = injected(self.config)
        else:
            avatar, face, photo = build_avatar(
                self.config, lambda: self._detector(resolve_device(self.config.model.device), detect_max_side=None))
            placeholder = face.image
        source, mel = build_audio(self.config, self.realtime)
        sink = self._sinks(face, photo)
        if self.run_options.wrap_sink is not None:
            sink = self.run_options.wrap_sink(sink)
        max_frames = None if self.run_options.max_seconds is None else int(self.run_options.max_seconds * FPS)
        duration = getattr(source, "duration_s", None)
        total = None if self.realtime or duration is None else math.ceil(duration * FPS)
        if total is not None and max_frames is not None:
            total = min(total, max_frames)
        timeline = AudioTimeline(mel, upstream_frame_numbering=self.config.timing.upstream_frame_numbering)
        checks = [getattr(source, "check_health", lambda: None)]
        hooks = [h for h in (StatusPrinter(self.metrics, self.run_options.status_interval_s, total_frames=total),
                             self._voice_lead_notice()) if h is not None]

        def on_frame(k: int) -> None:
            for hook in hooks:
                hook(k)

        renderer = self.run_options.renderer or avatar
        if injected is None:  # before the clock starts: every batch size in use, cudnn autotuning set by us
            prepare_engine(avatar, (1,) if self.realtime else range(1, OfflineOptions().batch_size + 1),
                           self.metrics)

        if self.realtime:
            live_pose = None if injected is not None else self._live_pose(avatar)
            pose = None if live_pose is None else live_pose[1]
            checks = ([] if live_pose is None else [live_pose[0].check]) + checks
            scheduler = make_scheduler(source, timeline, renderer, sink, placeholder=placeholder, pose=pose,
                                       metrics=self.metrics,
                                       options=SchedulerOptions(max_frames=max_frames),
                                       health_checks=checks, on_frame=on_frame)
            return self._running(lambda: scheduler.run(stop))

        if injected is not None:
            slot_pose = None
        elif self.config.pose.video_path is not None:
            slot_pose: SlotPose | None = self._pose_sequence(avatar, total)
        else:
            live_pose = self._live_pose(avatar)  # a webcam (or none) feeding a file
            slot_pose = None if live_pose is None else repeat_latest(live_pose[1])
            checks = ([] if live_pose is None else [live_pose[0].check]) + checks
        offline = OfflineRenderer(source, timeline, renderer, sink,
                                  frame_size=(placeholder.shape[1], placeholder.shape[0]), pose=slot_pose,
                                  metrics=self.metrics, options=OfflineOptions(max_frames=max_frames),
                                  health_checks=checks, on_frame=on_frame)
        return self._running(lambda: offline.run(stop))

    def _running(self, loop: Callable[[], RunSummary]) -> RunSummary:
        """`live` is set while the loop runs: a stop request is then answered by the loop itself."""
        self.live.set()
        try:
            return loop()
        finally:
            self.live.clear()



def repeat_latest(latest: Callable[[], np.ndarray | None]) -> SlotPose:
    """A live pose source (webcam) feeding an offline render: its latest code for every slot."""
    def codes(slots: Sequence[int]) -> np.ndarray | None:
        code = latest()
        return None if code is None else np.repeat(np.asarray(code, np.float32)[None], len(slots), 0)
    return codes

