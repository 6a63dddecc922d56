"""The two source tracks every viewer's proxies read: video frames and Opus audio on one timeline.

Timing and lip sync
-------------------
Both tracks take their timestamps from the frame index: video frame k has pts k*3600 on the 90 kHz
RTP video clock, and slot k's audio starts at k*640 on the 16 kHz audio clock (RTP reads it as
k*1920 at 48 kHz). The browser aligns the two RTP clocks through aiortc's RTCP sender reports, which
pair each stream's latest RTP timestamp with the wall-clock time it was sent; since frame k and its
audio are released in the same instant, both reports say "slot k is now" and the page plays them in
step. Both senders share one CNAME and one MediaStream id, which is what makes Chrome sync them.

Audio is Opus-encoded once here, in 40 ms packets (one per video frame) at 16 kHz, and handed to
aiortc as ready packets. Why not give aiortc PCM: its Opus encoder cuts audio into 20 ms packets but
stamps every packet produced by one `recv()` with the same RTP timestamp, so a 40 ms slot would be
mis-timed; and with `buffered=False` relays, two 20 ms frames released together would overwrite each
other. One packet per slot avoids both and saves one encoder per viewer.
"""
from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from pcavs.constants import FPS, SAMPLE_RATE
from stream.webrtc.buffer import LatestBuffer

VIDEO_CLOCK = 90_000
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class LiveVideoTrack(VideoStreamTrack):
    """The source video track: frames from the sink, pts = frame_index * 90000/fps (90 kHz clock)."""

    def __init__(self, buffer: LatestBuffer) -> None:
        super().__init__()
        self._buffer = buffer
        self.fps = FPS

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame_index, rgb = await self._buffer.get()
        await asyncio.sleep(0)  # let the relay's consumers take the previous item before the next one
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = frame_index * (VIDEO_CLOCK // self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame

    def stop(self) -> None:
        self._buffer.close()
        super().stop()


class LiveAudioTrack(AudioStreamTrack):
    """The source audio track: each slot's samples Opus-encoded into one 40 ms packet whose pts is
    frame_index * samples_per_frame on the input-rate clock, minus the encoder's constant 6.5 ms
    look-ahead (so the packet lands where its samples belong), also across dropped slots."""

    def __init__(self, buffer: LatestBuffer) -> None:
        super().__init__()
        self._buffer = buffer
        self.sample_rate = SAMPLE_RATE
        self.fps = FPS
        self._encoder: av.CodecContext | None = None
        self._encoder_key: tuple[int, int] | None = None
        self._pts_offset: int | None = None

    def _ensure_encoder(self) -> av.CodecContext:
        key = (self.sample_rate, self.fps)
        if self._encoder is None or self._encoder_key != key:
            spf = self.sample_rate // self.fps
            duration_ms = 1000 * spf / self.sample_rate
            if duration_ms not in (2.5, 5, 10, 20, 40, 60):
                raise ValueError(f"Opus cannot carry {duration_ms} ms slots; use 25 fps (40 ms)")
            enc = av.CodecContext.create("libopus", "w")
            enc.sample_rate = self.sample_rate
            enc.format = "s16"
            enc.layout = "mono"
            enc.time_base = fractions.Fraction(1, self.sample_rate)
            enc.bit_rate = 32_000
            enc.options = {"application": "voip", "frame_duration": f"{duration_ms:g}"}
            enc.open()
            self._encoder, self._encoder_key = enc, key
            self._pts_offset = None
        return self._encoder

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            frame_index, samples = await self._buffer.get()
            await asyncio.sleep(0)  # as in the video track: no back-to-back overwrite in the relay
            encoder = self._ensure_encoder()
            pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)[None, :]
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = frame_index * pcm.shape[1]
            frame.time_base = fractions.Fraction(1, self.sample_rate)
            packets = encoder.encode(frame)
            if packets:  # libopus returns exactly one packet per full frame
                packet = packets[-1]
                # FFmpeg numbers Opus packets by counting samples, so after dropped slots its pts
                # would fall behind the video's. Re-anchor on the frame index, keeping the
                # encoder's constant look-ahead offset (measured on its first packet).
                if self._pts_offset is None:
                    self._pts_offset = packet.pts - frame.pts
                packet.pts = packet.dts = frame.pts + self._pts_offset
                packet.time_base = fractions.Fraction(1, self.sample_rate)
                return packet

    def stop(self) -> None:
        self._buffer.close()
        super().stop()
