"""One session's outgoing media: the FrameSink its scheduler writes to, and the tracks its peers read.

Each studio session has its own pair of source tracks (stream/webrtc/tracks.py) fed by its own bounded
buffers (stream/webrtc/buffer.py), and its own `MediaRelay`: the owner's peer connection and the share
link's viewers get proxies of *this session's* tracks only, which is what keeps sessions' streams
apart. The audio is the session's own slot audio (the owner's voice, delayed to match the frames).
"""
from __future__ import annotations

import asyncio

import numpy as np
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from stream.webrtc.buffer import LatestBuffer
from stream.webrtc.tracks import OPUS_RATES, VIDEO_CLOCK, LiveAudioTrack, LiveVideoTrack


class SessionOutput:
    """FrameSink (write from the scheduler's thread, never blocks) + this session's tracks. Create it and
    call `stop` on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer_frames: int = 3) -> None:
        self._video_buf = LatestBuffer(loop, buffer_frames)
        self._audio_buf = LatestBuffer(loop, buffer_frames)
        self.video = LiveVideoTrack(self._video_buf)
        self.audio = LiveAudioTrack(self._audio_buf)
        self._relay = MediaRelay()
        self.frames_written = 0

    @property
    def dropped(self) -> int:
        """Frames the buffer discarded because no peer was reading them."""
        return self._video_buf.dropped

    def subscribe(self) -> tuple[MediaStreamTrack, MediaStreamTrack]:
        """A (video, audio) pair of proxies for one peer (a slow peer loses frames, never queues them)."""
        return (self._relay.subscribe(self.video, buffered=False),
                self._relay.subscribe(self.audio, buffered=False))

    # FrameSink
    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        if sample_rate not in OPUS_RATES or VIDEO_CLOCK % fps:
            raise ValueError(f"WebRTC needs Opus rates {OPUS_RATES} and a frame rate dividing 90000")
        self.video.fps = fps
        self.audio.fps, self.audio.sample_rate = fps, sample_rate

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        self._video_buf.put((frame_index, np.array(frame, dtype=np.uint8, order="C", copy=True)))
        self._audio_buf.put((frame_index, np.array(audio, dtype=np.float32, copy=True).reshape(-1)))
        self.frames_written += 1

    def close(self) -> None:
        """The scheduler is done; the tracks end with `stop` (the server's loop), with the session."""

    def stop(self) -> None:
        """Event loop only: end both tracks (and so every proxy)."""
        self.video.stop()
        self.audio.stop()
