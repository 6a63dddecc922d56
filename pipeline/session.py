"""Wiring one live session from a Config: sources → features → engine → sinks.

`LiveSession` owns every resource it opens (audio source, pose worker and its camera, sinks, web server)
and closes them in reverse order, whatever fails in between. `run_live.py` only parses arguments,
builds a Config, and runs a `LiveSession`.
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
from typing import Callable

import numpy as np
import torch

from common.errors import UserError
from capture.audio_sources import FileAudioSource, MicrophoneSource
from capture.looped_audio import LoopedAudioSource
from cli.config import Config
from pcavs.alignment import (FaceAligner, FaceAlignmentDetector, LandmarkDetector, load_landmark_sidecar,
                             read_rgb, sidecar_path)
from pcavs.checkpoints import load_networks
from pcavs.device import resolve_device, resolve_device_and_dtype
from pcavs.engine import Avatar, EngineOptions
from pcavs.mel import FixedGain, StreamingGain, StreamingMel, file_gain
from pcavs.preprocess import to_network_input
from pipeline.engine_setup import prepare_engine, start_live_pose
from pipeline.metrics import LiveMetrics, format_status_line
from pipeline.scheduler import RunSummary, Scheduler, SchedulerOptions
from pcavs.constants import FPS
from pipeline.timeline import AudioTimeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Per-run choices that are not part of the persistent config."""

    realtime: bool | None = None          # None: real time unless every output is a file
    max_seconds: float | None = None      # stop after this much output (previews, tests)
    status_interval_s: float = 1.0        # terminal status line period; 0 disables it
    ice_host_addresses: tuple[str, ...] | None = None  # WebRTC ICE addresses override (loopback tests)
    landmark_detector: object | None = None            # injected detector (tests); default face_alignment


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


def build_avatar(config: Config, detector: Callable[[], LandmarkDetector]) -> tuple[Avatar, np.ndarray]:
    """Load the networks and encode the identity once. Returns the avatar and the aligned photo (224²
    RGB uint8), which doubles as the placeholder frame before the first generated one. `detector` is
    only called when the photo has no landmark sidecar."""
    device, dtype = resolve_device_and_dtype(config.model.device, config.model.dtype)  # before any checkpoint is read
    if dtype != torch.float32 and device == "cpu":
        log.warning("%s on the CPU runs on PyTorch's reference kernels (~35x slower than float32 on CPUs "
                    "without native half-precision convolutions); it is meant for GPUs", config.model.dtype)
    photo = Path(config.identity.photo)
    if not photo.is_file():
        raise UserError(f"identity photo {photo} not found", hint="pass --identity PATH to a photo of a face")
    rgb = read_rgb(photo)  # a damaged photo is named as such, before any model is loaded
    networks = load_networks(config.model.checkpoint_dir, device=device, dtype=dtype)
    side = sidecar_path(photo)
    aligner = FaceAligner(None if side.is_file() else detector())  # a sidecar needs no detector
    landmarks = load_landmark_sidecar(side) if side.is_file() else None
    aligned = aligner.align_photo(rgb, name=str(photo), landmarks=landmarks).image
    options = EngineOptions(device=device, dtype=dtype, noise=config.model.noise,
                            noise_seed=config.model.noise_seed, mouth_weight=config.model.mouth_weight)
    return Avatar(networks, to_network_input(aligned), options), aligned


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
        return LoopedAudioSource(lambda: FileAudioSource.from_samples(samples, realtime=True)), StreamingMel(gain)
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

    def _sinks(self):
        from stream.sinks import FanOutSink
        sinks = []
        for target in self.config.output.targets:
            if target == "file":
                from stream.recorder import Mp4Recorder
                path = Path(self.config.output.file)
                path.parent.mkdir(parents=True, exist_ok=True)
                sinks.append(Mp4Recorder(path))
            elif target == "vcam":
                from stream.vcam import VirtualCameraSink
                sinks.append(VirtualCameraSink(device=self.config.vcam.device, backend=self.config.vcam.backend))
            elif target == "webrtc":
                from stream.webrtc import WebRTCSink
                self.start_server()
                sinks.append(WebRTCSink(self.server))
        return FanOutSink(sinks)

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

    def _pose(self, avatar: Avatar) -> tuple[Callable[[], np.ndarray | None] | None,
                                                                     list[Callable[[], None]]]:
        source_kind = self.config.pose.source
        if source_kind in ("still", "none"):
            return None, []  # the photo's own head pose (reference pose)
        from capture.pose_sources import VideoFileSource, WebcamSource
        if source_kind == "webcam":
            frames = WebcamSource(self.config.pose.webcam_index)
        else:
            frames = VideoFileSource(self.config.pose.video_path, realtime=self.realtime, loop=True)
        self._stack.callback(frames.close)
        # SFD at full size costs ~4 s per webcam frame on a CPU; 320 px is plenty for one close face.
        worker, latest = start_live_pose(frames, avatar, self._detector(avatar.device, detect_max_side=320),
                                         self.config.pose.smoothing, self.config.pose.rate_hz, self.metrics)
        self._stack.callback(worker.stop)
        return latest, [worker.check]

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        self.start_server()
        avatar, aligned = build_avatar(
            self.config, lambda: self._detector(resolve_device(self.config.model.device), detect_max_side=None))
        source, mel = build_audio(self.config, self.realtime)
        pose, checks = self._pose(avatar)
        prepare_engine(avatar, (1,) if self.realtime else range(1, SchedulerOptions().batch_size + 1), self.metrics)
        sink = self._sinks()
        max_frames = None if self.run_options.max_seconds is None else int(self.run_options.max_seconds * FPS)
        duration = getattr(source, "duration_s", None)
        total = None if self.realtime or duration is None else math.ceil(duration * FPS)
        if total is not None and max_frames is not None:
            total = min(total, max_frames)
        checks = checks + [getattr(source, "check_health", lambda: None)]
        scheduler = Scheduler(source, AudioTimeline(mel), avatar, sink, placeholder=aligned, pose=pose,
                              metrics=self.metrics,
                              options=SchedulerOptions(realtime=self.realtime, max_frames=max_frames),
                              health_checks=checks,
                              on_frame=StatusPrinter(self.metrics, self.run_options.status_interval_s,
                                                     total_frames=total))
        return scheduler.run(stop)
