"""Per-slot truth for a receiving peer connection: which 40 ms slots arrived, and the A/V offset of each.

Shared by bench/soak.py (its viewers decode everything), bench/whip.py and tests/test_whip.py (25
subscribers through Janus, which cannot all decode on two cores).

The sender stamps every slot (`StampingSink`, or `stamp_frame` / `stamp_audio` directly): its index
drawn into the video frame (with the instant it went out, and the index's complement as a check) and
played as two tones in its audio (k mod 16 and k/16 mod 16). A receiver identifies slots by their
media (RTP) timestamps, anchored by the stamps, and the A/V offset of slot k is what a browser syncs
by: each stream's RTP timestamp of slot k mapped to the sender's wall clock through that stream's
nearest RTCP sender report; video minus audio, in ms (positive: the picture of slot k is later than
its sound).

`RtpSlots` is the light receiver: it takes over the RTP path of a peer connection's receivers, so
nothing is depacketised into frames, jitter-buffered or decoded, except the few frames and audio
packets needed to anchor the timestamps to slot indices (`ANCHOR_VIDEO_FRAMES`, `ANCHOR_AUDIO_PACKETS`).
A video slot counts as received when its frame is complete: its marker packet arrived and every
sequence number from the previous frame's marker up to it did too.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from pcavs.constants import SAMPLE_RATE, SAMPLES_PER_FRAME

VIDEO_CLOCK, AUDIO_CLOCK = 90_000, 48_000
VIDEO_STEP, AUDIO_STEP = 3600, 1920          # RTP ticks per 40 ms slot
ANCHOR_VIDEO_FRAMES = 3                       # decoded stamps that must agree on the video anchor
ANCHOR_AUDIO_PACKETS = 12                     # decoded audio packets whose tones anchor the audio

# ---------------------------------------------------------------------------- the stamp
# Video: three rows of 16 bands (14 px each) at the top of the frame: slot index, emit instant (ms,
# mod 2^16), and the index's complement as a check.
BANDS, BAND_W, BAND_H = 16, 14, 16
TONES_LOW = [500.0 + 100 * i for i in range(16)]      # k mod 16
TONES_HIGH = [2300.0 + 100 * i for i in range(16)]    # (k // 16) mod 16


def stamp_frame(frame: np.ndarray, k: int, emit_ms: int) -> np.ndarray:
    out = np.array(frame, dtype=np.uint8, copy=True)
    words = (k & 0xFFFF, emit_ms & 0xFFFF, ~k & 0xFFFF)
    for row, word in enumerate(words):
        y = row * BAND_H
        for bit in range(BANDS):
            out[y:y + BAND_H, bit * BAND_W:(bit + 1) * BAND_W] = 225 if word >> bit & 1 else 30
    return out


def read_stamp(rgb: np.ndarray) -> tuple[int, int] | None:
    """(k mod 2^16, emit ms mod 2^16), or None when the check row disagrees (a damaged frame)."""
    words = []
    for row in range(3):
        y = row * BAND_H
        cells = rgb[y + 4:y + BAND_H - 4, :BANDS * BAND_W].reshape(BAND_H - 8, BANDS, BAND_W, 3)
        levels = cells[:, :, 4:BAND_W - 4].mean(axis=(0, 2, 3))
        words.append(sum(1 << bit for bit in range(BANDS) if levels[bit] > 128))
    k, emit, check = words
    return (k, emit) if (k ^ check) == 0xFFFF else None


def stamp_audio(k: int) -> np.ndarray:
    t = (k * SAMPLES_PER_FRAME + np.arange(SAMPLES_PER_FRAME)) / SAMPLE_RATE
    lo, hi = TONES_LOW[k % 16], TONES_HIGH[(k // 16) % 16]
    return (0.25 * np.sin(2 * np.pi * lo * t) + 0.25 * np.sin(2 * np.pi * hi * t)).astype(np.float32)


def read_tones(pcm: np.ndarray, rate: int) -> int:
    """k mod 256 from one decoded slot of audio."""
    spec = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)

    def pick(tones: list[float]) -> int:
        return int(np.argmax([spec[(freqs > f - 40) & (freqs < f + 40)].max() for f in tones]))
    return pick(TONES_LOW) + 16 * pick(TONES_HIGH)


class StampingSink:
    """Wraps a FrameSink: each slot's frame and audio carry the slot's index (see above)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.inner.open(width, height, fps, sample_rate)

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        emit_ms = int(time.monotonic() * 1000)
        self.inner.write(stamp_frame(frame, frame_index, emit_ms), stamp_audio(frame_index), frame_index)

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------- RTP timestamps → wall clock
def rtp_diff(a: int, b: int) -> int:
    """a − b on the 32-bit RTP timestamp circle."""
    return (a - b + (1 << 31)) % (1 << 32) - (1 << 31)


def sender_wall(rtp: int, reports: list[tuple[float, int]], rate: int) -> float:
    """The sender's wall-clock time (s) of RTP timestamp `rtp`, from the nearest (NTP, RTP) sender report."""
    ntp, sr_rtp = min(reports, key=lambda r: abs(rtp_diff(rtp, r[1])))
    return ntp + rtp_diff(rtp, sr_rtp) / rate


def record_sender_reports(pc, reports: dict[str, list[tuple[float, int]]]) -> None:
    """Keep every RTCP sender report each receiver of `pc` gets, as (NTP time in s, RTP timestamp) per
    kind in `reports` (aiortc keeps only a summary)."""
    from aiortc.rtp import RtcpSrPacket

    for transceiver in pc.getTransceivers():
        receiver, kind = transceiver.receiver, transceiver.kind
        original = receiver._handle_rtcp_packet

        async def handle(packet, original=original, kind=kind) -> None:
            if isinstance(packet, RtcpSrPacket):
                ntp = packet.sender_info.ntp_timestamp
                reports.setdefault(kind, []).append(((ntp >> 32) + (ntp & 0xFFFFFFFF) / 2 ** 32,
                                                     packet.sender_info.rtp_timestamp))
            await original(packet)
        receiver._handle_rtcp_packet = handle


# ---------------------------------------------------------------------------- the light receiver
class RtpSlots:
    """One peer connection's received slots from RTP alone (see the module notes). `attach(pc)` once its
    transceivers exist (after setRemoteDescription for an answerer, after addTransceiver for an offerer).
    `stamped=False`: the sender does not stamp its slots; nothing is decoded and slots are counted from
    the first video frame's timestamp (slot 0), so order and coverage hold but no A/V offset."""

    def __init__(self, stamped: bool = True) -> None:
        self.stamped = stamped
        self.video: list[tuple[int, int, bool, float]] = []     # (seq, RTP timestamp, marker, arrived)
        self.audio: list[tuple[int, float]] = []                # (RTP timestamp, arrived)
        self.sender_reports: dict[str, list[tuple[float, int]]] = {"video": [], "audio": []}
        self.video_stamps: list[tuple[int, int]] = []            # (RTP timestamp, k mod 2^16) decoded
        self.audio_tones: list[tuple[int, int]] = []             # (RTP timestamp, k mod 256) decoded
        self._pending: dict[int, list[tuple[int, bytes]]] = {}  # RTP ts → (seq, VP8 payload) until anchored
        self._video_decoder = None
        self._audio_decoder = None

    def attach(self, pc) -> None:
        record_sender_reports(pc, self.sender_reports)
        for transceiver in pc.getTransceivers():
            handler = self._on_video if transceiver.kind == "video" else self._on_audio

            async def handle(packet, arrival_time_ms: int = 0, handler=handler) -> None:
                handler(packet)
            transceiver.receiver._handle_rtp_packet = handle

    # ------------------------------------------------------------------ packets (the loop's thread)
    def _on_video(self, packet) -> None:
        if packet.payload_type >= 96 and not packet.payload:      # padding-only probes
            return
        self.video.append((packet.sequence_number, packet.timestamp, bool(packet.marker), time.monotonic()))
        if not self.stamped or len(self.video_stamps) >= ANCHOR_VIDEO_FRAMES:
            return
        self._pending.setdefault(packet.timestamp, []).append((packet.sequence_number, packet.payload))
        if packet.marker:
            self._decode_video(packet.timestamp)

    def _decode_video(self, ts: int) -> None:
        from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
        from aiortc.jitterbuffer import JitterFrame
        parts = sorted(self._pending.pop(ts, []))
        for old in [t for t in self._pending if rtp_diff(t, ts) < 0]:
            del self._pending[old]
        if self._video_decoder is None:
            self._video_decoder = Vp8Decoder()
        try:
            frames = self._video_decoder.decode(JitterFrame(b"".join(vp8_depayload(p) for _, p in parts), ts))
        except Exception:  # noqa: BLE001 - not decodable yet (no key frame so far): wait for the next
            return
        for frame in frames:
            stamp = read_stamp(frame.to_ndarray(format="rgb24"))
            if stamp is not None:
                self.video_stamps.append((ts, stamp[0]))
        if len(self.video_stamps) >= ANCHOR_VIDEO_FRAMES:
            self._pending.clear()
            self._video_decoder = None

    def _on_audio(self, packet) -> None:
        self.audio.append((packet.timestamp, time.monotonic()))
        if not self.stamped or len(self.audio_tones) >= ANCHOR_AUDIO_PACKETS:
            return
        from aiortc.codecs.opus import OpusDecoder
        from aiortc.jitterbuffer import JitterFrame
        if self._audio_decoder is None:
            self._audio_decoder = OpusDecoder()
        for frame in self._audio_decoder.decode(JitterFrame(packet.payload, packet.timestamp)):
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32)
            self.audio_tones.append((packet.timestamp, read_tones(pcm, frame.sample_rate)))
        if len(self.audio_tones) >= ANCHOR_AUDIO_PACKETS:
            self._audio_decoder = None

    # ------------------------------------------------------------------ analysis (after the run)
    def video_anchor(self) -> tuple[int, int] | None:
        """(RTP timestamp, slot index) that the decoded stamps agree on (by majority), or None; unstamped:
        (the first frame's timestamp, 0)."""
        if not self.stamped:
            return (self.video[0][1], 0) if self.video else None
        if not self.video_stamps:
            return None
        ts0 = self.video_stamps[0][0]
        votes = [(k - round(rtp_diff(ts, ts0) / VIDEO_STEP)) % 65536 for ts, k in self.video_stamps]
        return ts0, statistics.mode(votes)

    def video_slot(self, ts: int) -> int | None:
        anchor = self.video_anchor()
        return None if anchor is None else anchor[1] + round(rtp_diff(ts, anchor[0]) / VIDEO_STEP)

    def video_slots(self) -> list[int]:
        """The slots whose frame arrived complete, in the order their last packet arrived."""
        anchor = self.video_anchor()
        if anchor is None:
            return []
        frames: dict[int, dict] = {}
        last = None
        unwrapped = 0
        for seq, ts, marker, arrived in self.video:
            unwrapped = seq if last is None else unwrapped + ((seq - last + 32768) % 65536 - 32768)
            last = seq
            f = frames.setdefault(ts, {"seqs": set(), "end": None, "arrived": arrived})
            f["seqs"].add(unwrapped)
            if marker:
                f["end"], f["arrived"] = unwrapped, arrived
        by_slot = sorted((self.video_slot(ts), f) for ts, f in frames.items())
        complete: list[tuple[float, int]] = []
        previous_end = None
        for k, f in by_slot:
            end = f["end"]
            if end is not None:
                start = min(f["seqs"]) if previous_end is None else previous_end + 1
                if f["seqs"] >= set(range(start, end + 1)):
                    complete.append((f["arrived"], k))
            previous_end = end
        return [k for _, k in sorted(complete)]

    def audio_base(self) -> tuple[int, int] | None:
        """(RTP timestamp, slot index) of the first audio packet: its slot number in RTP steps anchored by
        the tones (mod 256), the wrap resolved by the video slot arriving at the same time."""
        if not self.audio or not self.audio_tones or self.video_anchor() is None:
            return None
        ts0, arrived0 = self.audio[0]
        offset = statistics.mode([(code - round(rtp_diff(ts, ts0) / AUDIO_STEP)) % 256
                                  for ts, code in self.audio_tones])
        near = min(self.video, key=lambda v: abs(v[3] - arrived0))
        nearest = self.video_slot(near[1])
        base = nearest + (offset - nearest) % 256
        if base - nearest > 128:
            base -= 256
        return ts0, base

    def audio_slots(self) -> dict[int, int]:
        """slot index → the RTP timestamp of its audio packet, for every slot whose audio arrived."""
        base = self.audio_base()
        if base is None:
            return {}
        ts0, k0 = base
        return {k0 + round(rtp_diff(ts, ts0) / AUDIO_STEP): ts for ts, _ in self.audio}

    def av_offsets_ms(self) -> list[float]:
        """For every slot received on both tracks: (video time − audio time) of that slot on the sender's
        clock, each from its own stream's nearest RTCP sender report (the mapping a browser syncs by)."""
        anchor = self.video_anchor()
        audio = self.audio_slots()
        if anchor is None or not audio or not all(self.sender_reports.get(k) for k in ("video", "audio")):
            return []
        ts_v0, k_v0 = anchor
        out = []
        for k in self.video_slots():
            if k in audio:
                ts_v = (ts_v0 + (k - k_v0) * VIDEO_STEP) % (1 << 32)
                out.append(1000 * (sender_wall(ts_v, self.sender_reports["video"], VIDEO_CLOCK)
                                   - sender_wall(audio[k], self.sender_reports["audio"], AUDIO_CLOCK)))
        return out


async def watch_direct(url: str, host_addresses: list[str]):
    """A light viewer of the built-in server (`POST {url}offer`): returns (peer connection, RtpSlots)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from stream.webrtc.ice import use_host_addresses
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    slots = RtpSlots()
    slots.attach(pc)
    use_host_addresses(pc, host_addresses)
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
            answer = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"offer refused: {answer}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, slots
