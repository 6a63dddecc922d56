"""Browser tracks as sources: a remote audio track becomes 16 kHz mono chunks on one continuous
timeline (drops counted and visible as gaps), a remote video track the newest frame only."""
from __future__ import annotations

import asyncio
import fractions
import threading

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack

from capture.browser_tracks import BrowserAudioSource, BrowserVideoSource
from tests.studio_support import ToneTrack


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    th.join(5)
    loop.close()


def test_audio_track_becomes_16k_chunks_on_one_timeline(loop):
    tone = ToneTrack(amplitude=0.3)
    src = BrowserAudioSource(tone, loop)
    src.start()
    chunks = []
    while sum(len(c.samples) for c in chunks) < 16000:        # one second
        chunk = src.read(2.0)
        assert chunk is not None
        chunks.append(chunk)
    src.stop()
    starts = [c.start_sample for c in chunks]
    assert starts[0] == 0
    assert all(b == a + len(c.samples) for a, b, c in zip(starts, starts[1:], chunks))   # no gap
    audio = np.concatenate([c.samples for c in chunks])[2000:]
    assert audio.dtype == np.float32 and abs(np.abs(audio).max() - 0.3) < 0.03
    spectrum = np.abs(np.fft.rfft(audio[:8000]))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 220) <= 2             # still a 220 Hz tone at 16 kHz
    assert src.dropped_chunks == 0 and src.last_frame_at is not None


def test_a_reader_that_falls_behind_loses_the_oldest_audio_counted_and_visible(loop):
    tone = ToneTrack()
    src = BrowserAudioSource(tone, loop, max_queue_ms=40)     # room for two 20 ms chunks
    src.start()
    while src.frames_received < 20:
        threading.Event().wait(0.05)
    chunk = src.read(1.0)
    assert src.dropped_chunks > 0
    assert chunk.start_sample > 0                             # the gap shows on the timeline
    tone.stop()                                               # the browser's track ends
    while src.read(1.0) is not None:
        pass
    assert src.finished
    src.stop()


class Frames(VideoStreamTrack):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def recv(self):
        if self.n >= 30:
            raise MediaStreamError
        await asyncio.sleep(0.005)
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), self.n, np.uint8), format="rgb24")
        frame.pts, frame.time_base = self.n, fractions.Fraction(1, 25)
        self.n += 1
        return frame


def test_video_track_gives_the_pose_worker_the_newest_frame_only(loop):
    src = BrowserVideoSource(Frames(), loop)
    src.start()
    while not src._closed:                    # let the whole (short) track arrive unread
        threading.Event().wait(0.02)
    rgb, captured_at = src.read()
    assert rgb.shape == (48, 64, 3) and int(rgb[0, 0, 0]) == 29   # the newest one
    assert src.frames_received == 30 and src.frames_dropped == 29
    assert src.read() is None                 # ended
    src.close()
