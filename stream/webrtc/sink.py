"""The FrameSink side of the viewer: what the scheduler writes frames to."""
from __future__ import annotations

import numpy as np

from stream.webrtc.server import WebRTCServer


class WebRTCSink:
    """FrameSink feeding a running `WebRTCServer`. Opening and closing the sink does not start or
    stop the server (its owner does that, so the page stays up between sessions)."""

    def __init__(self, server: WebRTCServer) -> None:
        self.server = server
        self._open = False

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.server.configure(fps, sample_rate)
        self._open = True

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if not self._open:
            raise RuntimeError("WebRTCSink.write called before open()")
        self.server.push(frame, audio, frame_index)

    def close(self) -> None:
        self._open = False
