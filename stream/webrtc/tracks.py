"""The two source tracks, and the relay that hands every item of them to every viewer.

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
mis-timed. One packet per slot avoids that and saves one encoder per viewer.

Video is VP8-encoded once per session, too (`SharedVideoEncoder`): aiortc would give every viewer's
sender its own encoder, and that per-viewer encoding was most of the server's CPU at 8 viewers and what
fell behind under load (bench/viewers.py). aiortc's senders take ready packets (they only packetise
them), so every viewer gets the same encoded frames. A viewer must start on a key frame: one that joins
asks the encoder for one and skips the delta frames before it; one whose queue overflowed (its
decoder would see a broken reference chain) drops its backlog and does the same; a viewer's picture-
loss reports (RTCP PLI/FIR) ask the shared encoder for a key frame as well.

One source, many viewers
------------------------
`ViewerRelay` reads each source track once and gives every viewer its own proxy with its own small
queue. aiortc's `MediaRelay` offers either an unbounded queue per viewer or a single slot that the
next item overwrites; with the single slot a viewer whose video encoder was busy when two items came
close together (after any hiccup of the event loop) silently lost one. Here a viewer loses an item
only when its own queue (`VIEWER_QUEUE`, one second) is full, i.e. when that viewer cannot keep up;
the loss is counted per viewer (`ViewerTrack.dropped`, next to `ViewerTrack.delivered`), reported
in `/stats` and logged when the viewer leaves or the server stops, and never touches the other viewers.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack, VideoStreamTrack

from pcavs.constants import FPS, SAMPLE_RATE
from stream.webrtc.buffer import LatestBuffer

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
VIEWER_QUEUE = FPS          # items each viewer may fall behind (one second) before it loses its oldest


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


class SharedVideoEncoder(MediaStreamTrack):
    """The source video track encoded once, for every viewer: VP8 `av.Packet`s (pts on the 90 kHz
    clock), with aiortc's own encoder settings at its default bitrate. Encoding runs in the loop's
    default executor, as aiortc's does, so the loop is never held by it. `request_keyframe` makes the
    next frame a key frame (a viewer joined or lost a picture)."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, bitrate: int = 500_000) -> None:
        super().__init__()
        self._source = source
        self.bitrate = bitrate
        self._codec: av.CodecContext | None = None
        self._keyframe = True
        self.frames_encoded = 0
        self.keyframes = 0

    def request_keyframe(self) -> None:
        self._keyframe = True

    def _open(self, width: int, height: int) -> av.CodecContext:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.bit_rate = self.bitrate
        codec.gop_size = 3000           # key frames on request (joins, losses), not on a timer
        codec.qmin, codec.qmax = 2, 56
        codec.options = {"bufsize": str(self.bitrate), "cpu-used": "-6", "deadline": "realtime",
                         "lag-in-frames": "0", "minrate": str(self.bitrate), "maxrate": str(self.bitrate),
                         "noise-sensitivity": "4", "overshoot-pct": "15", "partitions": "0",
                         "static-thresh": "1", "undershoot-pct": "100"}   # aiortc's Vp8Encoder's, CBR
        codec.thread_count = 1
        return codec

    def _encode(self, frame: av.VideoFrame, keyframe: bool) -> av.Packet | None:
        if self._codec is None or (self._codec.width, self._codec.height) != (frame.width, frame.height):
            self._codec = self._open(frame.width, frame.height)
            keyframe = True
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in self._codec.encode(frame))
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts = packet.dts = frame.pts
        packet.time_base = frame.time_base
        packet.is_keyframe = keyframe or (data[0] & 1) == 0   # VP8 frame tag: bit 0 clear = key frame
        return packet

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        while True:
            frame = await self._source.recv()
            keyframe, self._keyframe = self._keyframe, False
            packet = await loop.run_in_executor(None, self._encode, frame, keyframe)
            if packet is not None:
                self.frames_encoded += 1
                self.keyframes += packet.is_keyframe
                return packet

    def stop(self) -> None:
        self._source.stop()
        super().stop()


class ViewerTrack(MediaStreamTrack):
    """One viewer's proxy of a source track (made by `ViewerRelay.subscribe`): the items in order,
    from a queue of at most `capacity` that drops (and counts) its oldest when this viewer falls
    behind. Lives on the server's event loop."""

    def __init__(self, relay: "ViewerRelay", source: MediaStreamTrack, capacity: int) -> None:
        super().__init__()
        self.kind = source.kind
        self._relay: ViewerRelay | None = relay
        self._source = source
        self._capacity = capacity
        self._queue: deque = deque()
        self._ready = asyncio.Event()
        self._ended = False
        # Encoded video (`SharedVideoEncoder`) must start on a key frame: deltas before it are skipped.
        self._encoded = isinstance(source, SharedVideoEncoder)
        self._await_keyframe = self._encoded
        self._count_skipped = False   # deltas skipped after an overflow are losses; before the first, not
        self.delivered = 0
        self.dropped = 0

    def _put(self, item: object | None) -> None:
        """From the relay's reader: the next item, or None at the end of the source."""
        if item is None:
            self._ended = True
        elif self._encoded:
            self._put_encoded(item)
        else:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
        self._ready.set()

    def _put_encoded(self, packet) -> None:
        if len(self._queue) >= self._capacity:
            # Dropping one delta frame would break the chain the decoder needs: drop the backlog
            # (this viewer is a second behind anyway) and restart on the next key frame.
            self.dropped += len(self._queue)
            self._queue.clear()
            self._await_keyframe = self._count_skipped = True
            self._source.request_keyframe()
        if self._await_keyframe:
            if not packet.is_keyframe:
                self.dropped += self._count_skipped
                return
            self._await_keyframe = self._count_skipped = False
        self._queue.append(packet)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._relay is not None:
            self._relay._start(self)
        while not self._queue:
            if self._ended:
                self.stop()
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        self.delivered += 1
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        if self._relay is not None:
            self._relay._stop(self)
            self._relay = None
        self._queue.clear()


class ViewerRelay:
    """Fans each source track out to any number of viewers (see the module notes): one reader task per
    source, started by its first `subscribe` (so on the event loop) and running until the source ends,
    hands every item to every viewer that has started reading. Reading on while nobody watches keeps
    the sink-side buffer drained, so a new viewer starts with the present, not a backlog."""

    def __init__(self, capacity: int = VIEWER_QUEUE) -> None:
        self.capacity = capacity
        self._viewers: dict[MediaStreamTrack, set[ViewerTrack]] = {}
        self._readers: dict[MediaStreamTrack, asyncio.Task] = {}

    def subscribe(self, track: MediaStreamTrack, buffered: bool = False) -> ViewerTrack:
        """A new viewer's proxy of `track`. `buffered` is accepted for `MediaRelay`'s signature and
        ignored: every viewer gets its bounded queue."""
        if track not in self._readers:
            self._viewers[track] = set()
            self._readers[track] = asyncio.ensure_future(self._read(track))
        return ViewerTrack(self, track, self.capacity)

    def _start(self, viewer: ViewerTrack) -> None:
        viewers = self._viewers.get(viewer._source)
        if viewers is None:          # the source has ended
            viewer._put(None)
            return
        if viewer not in viewers and viewer._encoded:
            viewer._source.request_keyframe()    # a joining viewer starts on the next frame
        viewers.add(viewer)

    def _stop(self, viewer: ViewerTrack) -> None:
        viewers = self._viewers.get(viewer._source)
        if viewers is not None and viewer in viewers:
            viewers.discard(viewer)   # (its counts are logged by the server, per viewer, when it leaves)

    async def _read(self, source: MediaStreamTrack) -> None:
        while True:
            try:
                item = await source.recv()
            except MediaStreamError:
                item = None
            for viewer in list(self._viewers[source]):
                viewer._put(item)
            if item is None:
                break
        del self._viewers[source]
        del self._readers[source]
