"""The input registries: what drives the mouth (`AUDIO_INPUTS`) and the head pose (`POSE_INPUTS`).

One entry per word of `audio.source` / `pose.source` (plus "file" / "video" for a path), each saying how
its source is built and what it needs from the machine; the session builder and the doctor read these
tables instead of testing the words themselves. Adding an input is one entry here and its word in
`pcavs_live.pipeline.options` (tests/test_outputs.py keeps the two equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pcavs_live.common.errors import UserError
from pcavs_live.pipeline.options import AUDIO_KEYWORDS, POSE_KEYWORDS, AudioConfig, PoseConfig

if TYPE_CHECKING:
    from capture.audio_sources import AudioSource
    from capture.pose_sources import FrameSource
    from pcavs.mel import StreamingMel


# --------------------------------------------------------------------------- audio
@dataclass(frozen=True)
class AudioInput:
    name: str                      # "sample", "mic", or "file" for a path
    device: bool                   # a live device (doctor checks the microphones; its clock is real time)
    build: Callable[[AudioConfig, bool], tuple["AudioSource", "StreamingMel"]]  # (section, realtime)


def _mic(audio: AudioConfig, realtime: bool):
    from capture.audio_sources import MicrophoneSource
    from pcavs.mel import FixedGain, StreamingGain, StreamingMel
    device: str | int | None = audio.device
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    if audio.gain == "file":
        raise UserError("audio.gain = 'file' needs a whole file; a microphone uses 'running' or 'none'")
    gain = StreamingGain() if audio.gain == "running" else FixedGain(1.0)
    return MicrophoneSource(device), StreamingMel(gain)


def _file(audio: AudioConfig, realtime: bool, loop: bool = False):
    from capture.audio_sources import FileAudioSource
    from capture.looped_audio import LoopedAudioSource
    from pcavs.mel import FixedGain, StreamingGain, StreamingMel, file_gain
    path = audio.file_path
    assert path is not None
    source = FileAudioSource(path, realtime=realtime)
    samples = source.audio
    if audio.gain == "none":
        gain = FixedGain(1.0)
    elif audio.gain == "file" or not realtime:
        # exactly upstream's whole-file normalisation, of the finite samples (the silence standing in
        # for non-finite ones is left out of the level)
        gain = FixedGain(float(file_gain(samples, source.nonfinite_samples)))
    else:
        gain = StreamingGain()
    if loop and realtime:
        # The bundled clip is seconds long: loop it so a live viewer opened later still sees the demo.
        return (LoopedAudioSource(lambda start_at: FileAudioSource.from_samples(samples, realtime=True,
                                                                                start_at=start_at)),
                StreamingMel(gain))
    return source, StreamingMel(gain)


AUDIO_INPUTS: dict[str, AudioInput] = {i.name: i for i in (
    AudioInput("sample", device=False, build=lambda audio, realtime: _file(audio, realtime, loop=True)),
    AudioInput("mic", device=True, build=_mic),
    AudioInput("file", device=False, build=_file),
)}


def audio_input(audio: AudioConfig) -> AudioInput:
    """The registry entry of `audio.source` (a path is "file")."""
    return AUDIO_INPUTS[audio.source if audio.source in AUDIO_KEYWORDS else "file"]


# --------------------------------------------------------------------------- pose
@dataclass(frozen=True)
class PoseInput:
    name: str                      # "still", "none", "webcam", or "video" for a path
    needs_detector: bool           # a landmark detector runs on its frames (doctor: the face weights)
    # The live frames (a started source the pose worker reads), None for the photo's own pose.
    frames: Callable[[PoseConfig], "FrameSource"] | None
    sequence: bool = False         # offline, every frame is encoded up front (a file: exact, repeatable)


def _webcam(pose: PoseConfig):
    from capture.pose_sources import WebcamSource
    return WebcamSource(pose.webcam_index)


def _video(pose: PoseConfig):
    from capture.pose_sources import VideoFileSource
    return VideoFileSource(Path(pose.source), realtime=True, ping_pong=True)


POSE_INPUTS: dict[str, PoseInput] = {i.name: i for i in (
    PoseInput("still", needs_detector=False, frames=None),   # the photo's own head pose (reference pose)
    PoseInput("none", needs_detector=False, frames=None),
    PoseInput("webcam", needs_detector=True, frames=_webcam),
    PoseInput("video", needs_detector=True, frames=_video, sequence=True),
)}


def pose_input(pose: PoseConfig) -> PoseInput:
    """The registry entry of `pose.source` (a path is "video")."""
    return POSE_INPUTS[pose.source if pose.source in POSE_KEYWORDS else "video"]
