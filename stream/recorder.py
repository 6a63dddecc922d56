"""Session recording: the exact stream the viewers got, as an mp4 (H.264 + AAC) via PyAV.

Timestamps come from the frame index, not from the wall clock: the scheduler hands over one frame
per 40 ms slot (repeating the last frame when the generator fell behind), together with that slot's
audio, so frame k is at k/fps seconds and its audio starts at k * sample_rate/fps samples. Writing
what we get with those timestamps keeps picture and sound locked together in the file no matter how
irregularly `write` is called.

Encoding runs synchronously in `write` (the caller's thread): at 224x224, libx264 "veryfast" costs
about a millisecond per frame, which is not worth a thread of its own.
"""
from __future__ import annotations

import fractions
import logging
from pathlib import Path

import av
import numpy as np

from pcavs_live.common.errors import UserError
from pcavs.constants import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)


class RecorderError(UserError):
    """The recording cannot be written (path, codec); one line naming the file."""


def _pick_video_codec() -> str:
    """libx264 when PyAV's bundled FFmpeg has it (the pip wheels do), else FFmpeg's native mpeg4."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RecorderError("PyAV's FFmpeg has neither a libx264 nor an mpeg4 encoder; reinstall av from PyPI")


class Mp4Recorder:
    """FrameSink writing H.264 (yuv420p) video + AAC audio into `path`.

    The first written frame index becomes t=0 (with the scheduler that is frame 0). A jump in the
    frame index (not produced by the scheduler, which repeats frames instead) leaves a gap in the video
    and is filled with silence in the audio, so the two tracks never drift apart.
    """

    def __init__(self, path: str | Path, video_bitrate: int | None = None, crf: int = 20,
                 audio_bitrate: int = 64_000) -> None:
        self.path = Path(path)
        self.crf = crf
        self.video_bitrate = video_bitrate
        self.audio_bitrate = audio_bitrate
        self._container: av.container.OutputContainer | None = None
        self._vstream = None
        self._astream = None
        self._resampler: av.AudioResampler | None = None
        self._fps = FPS
        self._rate = SAMPLE_RATE
        self._first_index: int | None = None
        self._next_index = 0
        self._audio_samples = 0         # samples handed to the resampler so far (= next input pts)
        self._audio_out_pts = 0         # samples encoded so far, in the encoder's rate
        self.frames_written = 0

    # ------------------------------------------------------------------ FrameSink
    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        if width % 2 or height % 2:
            raise RecorderError(f"cannot record {width}x{height} to {self.path}: H.264 yuv420p needs even sizes")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(self.path), mode="w", format="mp4")
        except (OSError, av.error.FFmpegError) as exc:
            raise RecorderError(f"cannot create recording {self.path}: {' '.join(str(exc).split())}") from None
        self._fps, self._rate = fps, sample_rate
        codec = _pick_video_codec()
        options = {"crf": str(self.crf), "preset": "veryfast"} if codec == "libx264" else {}
        vstream = container.add_stream(codec, rate=fps, options=options)
        vstream.width, vstream.height = width, height
        vstream.pix_fmt = "yuv420p"
        vstream.codec_context.time_base = fractions.Fraction(1, fps)
        if self.video_bitrate:
            vstream.codec_context.bit_rate = self.video_bitrate
        elif codec != "libx264":
            vstream.codec_context.bit_rate = 2_000_000   # mpeg4 has no CRF; pick a visually clean rate

        astream = container.add_stream("aac", rate=self._aac_rate(sample_rate))
        astream.layout = "mono"
        astream.codec_context.bit_rate = self.audio_bitrate
        astream.codec_context.time_base = fractions.Fraction(1, astream.codec_context.sample_rate)
        # AAC wants planar float in fixed 1024-sample frames; the resampler does both (and the rate,
        # should the encoder not take ours).
        enc = astream.codec_context
        self._resampler = av.AudioResampler(format=enc.format.name if enc.format else "fltp", layout="mono",
                                            rate=enc.sample_rate, frame_size=enc.frame_size or 1024)
        self._container, self._vstream, self._astream = container, vstream, astream
        self._first_index = None
        self._audio_samples = self._audio_out_pts = 0
        self.frames_written = 0
        log.info("recording %dx%d@%d (%s + aac) to %s", width, height, fps, codec, self.path)

    @staticmethod
    def _aac_rate(rate: int) -> int:
        supported = av.codec.Codec("aac", "w").audio_rates or ()
        return rate if not supported or rate in supported else 48000

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if self._container is None:
            raise RecorderError(f"Mp4Recorder.write called before open() ({self.path})")
        if self._first_index is None:
            self._first_index = self._next_index = frame_index
        if frame_index < self._next_index:
            log.warning("recorder: frame %d arrived after %d; ignored", frame_index, self._next_index - 1)
            return
        spf = self._rate // self._fps
        # Audio first, up to the end of this slot; a skipped slot becomes silence.
        gap = (frame_index - self._next_index) * spf
        if gap:
            self._encode_audio(np.zeros(gap, np.float32))
        self._encode_audio(np.asarray(audio, np.float32).reshape(-1))

        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
        vf = vf.reformat(format="yuv420p")
        vf.pts = frame_index - self._first_index
        vf.time_base = fractions.Fraction(1, self._fps)
        for packet in self._vstream.encode(vf):
            self._container.mux(packet)
        self._next_index = frame_index + 1
        self.frames_written += 1

    def close(self) -> None:
        container, self._container = self._container, None
        if container is None:
            return
        try:
            # Flush both encoders: x264 holds back its look-ahead frames and AAC its last partial frame;
            # without this the file would be short by a few frames.
            for packet in self._vstream.encode(None):
                container.mux(packet)
            for rframe in self._resampler.resample(None):
                self._encode_resampled(rframe, container)
            for packet in self._astream.encode(None):
                container.mux(packet)
        finally:
            container.close()
            if not self.frames_written:  # an mp4 without a frame plays nothing: leave no file behind
                self.path.unlink(missing_ok=True)
        if self.frames_written:  # (no frames: the caller says so, in one line)
            log.info("recording finished: %d frames in %s", self.frames_written, self.path)

    # ------------------------------------------------------------------ audio helpers
    def _encode_audio(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        af = av.AudioFrame.from_ndarray(np.clip(samples, -1.0, 1.0)[None, :], format="flt", layout="mono")
        af.sample_rate = self._rate
        af.pts = self._audio_samples
        af.time_base = fractions.Fraction(1, self._rate)
        self._audio_samples += len(samples)
        for rframe in self._resampler.resample(af):
            self._encode_resampled(rframe, self._container)

    def _encode_resampled(self, rframe: av.AudioFrame, container) -> None:
        # Timestamps by sample count: continuous by construction, in the encoder's own rate.
        rframe.pts = self._audio_out_pts
        rframe.time_base = fractions.Fraction(1, self._astream.codec_context.sample_rate)
        self._audio_out_pts += rframe.samples
        for packet in self._astream.encode(rframe):
            container.mux(packet)
