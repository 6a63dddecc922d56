"""Test stand-ins for the studio: a cheap renderer that paints each avatar's colour (the colour of its
aligned photo), a landmark detector that 'finds' a face in any non-flat image, and an aiortc client
that sends a tone as its microphone and receives its avatar back."""
from __future__ import annotations

import asyncio
import fractions
import threading
import time

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from pcavs.alignment import FaceAligner, load_landmark_sidecar, read_rgb, sidecar_path
from pcavs_live.pipeline.shared_renderer import SharedRenderer
from pcavs_live.cli.config import load_config
from pcavs_live.pipeline.studio import StudioSessions
from stream.studio import StudioServer
from stream.webrtc import use_host_addresses
from tests.test_browser_viewer import REPO

LOOPBACK = ["127.0.0.1"]
SAMPLE = REPO / "assets" / "sample" / "astronaut.png"


class AnchorDetector:
    """Three anchor points at fixed fractions of the image; no face in a flat (uniform) image."""

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        if float(np.asarray(rgb).std()) < 2.0:
            return []
        h, w = rgb.shape[:2]
        return [np.array([[0.40 * w, 0.40 * h], [0.60 * w, 0.40 * h], [0.50 * w, 0.62 * h]])]


class ColourAvatar:
    """What the fake renderer needs of an Avatar: its colour (the aligned photo's mean) and pose_code
    (and the device the live pose path puts its worker stream on)."""

    device = "cpu"

    def __init__(self, aligned: np.ndarray) -> None:
        self.colour = aligned.reshape(-1, 3).mean(0).round().astype(np.uint8)
        self.pose_calls = 0

    def pose_code(self, crop) -> np.ndarray:
        self.pose_calls += 1
        return np.zeros(12, np.float32)


def encode_colour(photo: np.ndarray | None, name: str):
    """Real alignment (sidecar for the sample, the anchor detector for uploads), fake encoding."""
    aligner = FaceAligner(AnchorDetector())
    if photo is None:
        aligned = aligner.align_photo(read_rgb(SAMPLE), name, load_landmark_sidecar(sidecar_path(SAMPLE))).image
    else:
        aligned = aligner.align_photo(photo, name).image
    return ColourAvatar(aligned), aligned


class PaintRenderer:
    """render_rows stand-in: each row painted in its avatar's colour; counts calls and batch sizes."""

    def __init__(self, delay_s: float = 0.005) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, rows):
        with self.lock:
            self.calls.append(len(rows))
        time.sleep(self.delay_s)
        return [np.broadcast_to(r.avatar.colour, (224, 224, 3)).copy() for r in rows]


def start_studio(max_sessions: int = 4, lost_timeout_s: float = 3.0, connect_timeout_s: float = 20.0,
                 delay_s: float = 0.005, overrides: dict | None = None, **kwargs):
    """A running StudioServer on a free loopback port with the paint renderer; returns (server, paint,
    renderer). The caller stops both. `overrides`: more config keys (e.g. the [whip] endpoint)."""
    paint = PaintRenderer(delay_s)
    renderer = SharedRenderer(paint).start()
    factory = StudioSessions(encode_colour, renderer, load_config(None, {"pose.smoothing": 0.0, **(overrides or {})}),
                             pose_detector=AnchorDetector)
    srv = StudioServer(factory, port=0, ice_host_addresses=LOOPBACK, max_sessions=max_sessions,
                       lost_timeout_s=lost_timeout_s, connect_timeout_s=connect_timeout_s, **kwargs)
    srv.start()
    return srv, paint, renderer


def base(srv: StudioServer) -> str:
    return f"http://127.0.0.1:{srv.port}/"


class ToneTrack(AudioStreamTrack):
    """A microphone stand-in: 20 ms frames of a 220 Hz tone at 48 kHz, paced in real time; `pause()`
    stops sending without closing the connection (a lost network, as far as media goes)."""

    kind = "audio"

    def __init__(self, amplitude: float = 0.3) -> None:
        super().__init__()
        self.amplitude, self.paused = amplitude, False
        self._n, self._t0 = 0, None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._n += 1
        await asyncio.sleep(max(0.0, self._t0 + self._n * 0.02 - time.monotonic()))
        while self.paused:
            await asyncio.sleep(0.05)
        t = ((self._n - 1) * 960 + np.arange(960)) / 48000
        pcm = (self.amplitude * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = (self._n - 1) * 960
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


async def http(method: str, url: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.request(method, url, **kwargs) as r:
            return r.status, await r.json(content_type=None)


class Client:
    """An aiortc 'browser': creates a session (sample or photo bytes), sends the tone, receives video."""

    def __init__(self, srv: StudioServer) -> None:
        self.srv = srv
        self.pc: RTCPeerConnection | None = None
        self.session: dict | None = None
        self.tone = ToneTrack()
        self.frames: list[np.ndarray] = []
        self.audio_frames = 0

    async def create(self, photo: bytes | None = None, share: bool = False) -> tuple[int, dict]:
        url = base(self.srv) + "sessions" + ("?sample=1" if photo is None else "?") + ("&share=1" if share else "")
        status, body = await http("POST", url, data=photo or b"")
        if status == 201:
            self.session = body
        return status, body

    async def connect(self) -> None:
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(self.tone)
        pc.addTransceiver("video", direction="recvonly")
        tasks = []

        @pc.on("track")
        def on_track(track):
            tasks.append(asyncio.ensure_future(self._drain(track)))

        use_host_addresses(pc, LOOPBACK)
        await pc.setLocalDescription(await pc.createOffer())
        status, answer = await http("POST", base(self.srv) + f"sessions/{self.session['id']}/offer",
                                    json={"sdp": pc.localDescription.sdp, "type": "offer",
                                          "secret": self.session["secret"]})
        assert status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(**answer))

    async def _drain(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.frames.append(frame.to_ndarray(format="rgb24"))
                    del self.frames[:-5]
                else:
                    self.audio_frames += 1
        except MediaStreamError:
            pass

    async def wait_frames(self, timeout: float = 20.0, warm_up_s: float = 120.0) -> np.ndarray:
        """The newest frame, at most `timeout` s after the session's first frame went out (its own
        frames_out in /stats). The session renders only once warm: at load 10 on 2 cores its warm-up
        alone took longer than 20 s, so that wait is bounded apart (`warm_up_s`)."""
        deadline = time.monotonic() + warm_up_s
        while not self.frames and time.monotonic() < deadline:
            status, stats = await http("GET", base(self.srv) + f"sessions/{self.session['id']}/stats"
                                       f"?secret={self.session['secret']}")
            if status != 200 or stats.get("frames_out"):
                break                       # frames are going out (or the session ended: fail below)
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + timeout
        while not self.frames and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert self.frames, "no video frame came back"
        return self.frames[-1]

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))
