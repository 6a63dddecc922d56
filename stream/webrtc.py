"""Browser viewer: the avatar's video and voice over WebRTC (aiohttp signalling + aiortc media).

Shape of the thing
------------------
`WebRTCServer` owns one thread running one asyncio loop; aiohttp serves the page (`web/`), `POST /offer`
(SDP offer in, answer out), `GET /stats` and `GET /health` on it, and every viewer's
RTCPeerConnection lives there too. `WebRTCSink` is the FrameSink the scheduler writes to: it only
drops each frame + its 40 ms of audio into two small bounded buffers and returns, so a slow network
or a stuck browser can never hold up the render loop.

One source, many viewers: the buffers feed one video and one audio *source track*; every viewer gets
`MediaRelay` proxies of them (`buffered=False`: a proxy holds at most the latest item, so a slow
viewer loses frames instead of growing a queue). Nothing in this module can grow without bound:
the sink-side buffers are `deque(maxlen=...)` that drop the oldest item.

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

ICE on loopback
---------------
aioice leaves 127.0.0.1 out of its host candidates, so a viewer on the same machine can only connect
through the LAN address, and on a machine with no LAN address not at all. `ice_host_addresses`
(e.g. ["127.0.0.1"]) makes this server gather host candidates on exactly those addresses; see
`use_host_addresses`, which applies it to one RTCPeerConnection at a time (nothing global).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fractions
import ipaddress
import json
import logging
import secrets
import socket
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import av
import numpy as np
from aiohttp import web
from aiortc import (RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender,
                    RTCSessionDescription)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from common.errors import UserError
from pcavs.constants import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

DEFAULT_WEB_ROOT = Path(__file__).resolve().parent / "web"
VIDEO_CLOCK = 90_000
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class ServerError(UserError):
    """The viewer server cannot start (port taken, bad host); one line saying what to pass instead."""


# --------------------------------------------------------------------------- ICE hook
def use_host_addresses(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Make `pc` gather ICE host candidates on exactly `addresses` instead of aioice's choice
    (every interface except loopback).

    Call it after the transceivers exist (after `addTransceiver`/`setRemoteDescription`) and before
    `setLocalDescription`, which is when aiortc gathers; it covers the ICE transports of the
    transceivers present at the call, not ones added later. The hook is the narrowest one aioice offers:
    `Connection.gather_candidates` asks its own `get_component_candidates(component, addresses)` for
    the sockets to open, so we wrap that method *on this pc's Connection objects only*, substituting
    the address list. No module attribute is touched, so other peer connections in the process,
    and other threads, are unaffected. The one private name used is aiortc's
    `RTCIceGatherer._connection` (the aioice Connection), present since aiortc 1.0.
    """
    fixed = [str(a) for a in addresses]
    seen: set[int] = set()
    gatherers = [t.receiver.transport.transport.iceGatherer for t in pc.getTransceivers()]
    if pc.sctp is not None:
        gatherers.append(pc.sctp.transport.transport.iceGatherer)
    for gatherer in gatherers:
        if id(gatherer) in seen:
            continue
        seen.add(id(gatherer))
        if gatherer.state != "new":
            raise RuntimeError("use_host_addresses must be called before ICE gathering starts")
        connection = gatherer._connection
        original = connection.get_component_candidates

        async def on_fixed_addresses(component: int, addresses: list[str], timeout: int = 5,
                                     _original=original) -> list:
            return await _original(component=component, addresses=list(fixed), timeout=timeout)

        connection.get_component_candidates = on_fixed_addresses


# --------------------------------------------------------------------------- buffers and tracks
class _LatestBuffer:
    """Bounded hand-over from the sink's thread to the server's loop: `put` from any thread, `get`
    on the loop. When full, the oldest item is dropped (counted in `dropped`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxlen: int) -> None:
        self._loop = loop
        self._items: deque = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._event = asyncio.Event()       # only touched on the loop
        self._wake_pending = False
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:            # loop already closed: the server is gone, drop silently
                pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._event.set()

    def close(self) -> None:
        """Loop thread only: wake the reader so it sees the end."""
        with self._lock:
            self._closed = True
            self._items.clear()
        self._event.set()

    async def get(self) -> Any:
        while True:
            with self._lock:
                if self._closed:
                    raise MediaStreamError
                if self._items:
                    return self._items.popleft()
                self._event.clear()
            await self._event.wait()


class LiveVideoTrack(VideoStreamTrack):
    """The source video track: frames from the sink, pts = frame_index * 90000/fps (90 kHz clock)."""

    def __init__(self, buffer: _LatestBuffer) -> None:
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

    def __init__(self, buffer: _LatestBuffer) -> None:
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


# --------------------------------------------------------------------------- server
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebRTCServer:
    """The viewer web server and its WebRTC peers, on a thread and event loop this object owns.

    `token`: shared secret a viewer must send with its offer (and /stats). Required for any
    non-loopback `host`: when missing there, one is generated and logged with the URL to open.
    `stats`: called (on the server thread) for `GET /stats`; should be cheap and thread-safe.
    `ice_servers`: STUN URLs (or aiortc RTCIceServer objects, for TURN credentials) for viewers
    behind NAT; default none (LAN/loopback viewing, and no
    outgoing STUN queries on offline machines).
    `ice_host_addresses`: gather ICE host candidates on exactly these addresses (see
    `use_host_addresses`); ["127.0.0.1"] makes same-machine viewing work without any LAN interface.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 stats: Callable[[], dict] | None = None,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 web_root: str | Path = DEFAULT_WEB_ROOT, ice_host_addresses: Sequence[str] | None = None,
                 max_viewers: int = 8, connect_timeout_s: float = 30.0, buffer_frames: int = 3) -> None:
        self.host, self._requested_port = host, port
        token = token or None               # "" (the config file's "no token") means none
        if token is None and not _is_loopback(host):
            token = secrets.token_urlsafe(16)
            self._token_generated = True
        else:
            self._token_generated = False
        self.token = token
        self._stats = stats or (lambda: {})
        self._ice_servers = [u if isinstance(u, RTCIceServer) else RTCIceServer(urls=u) for u in ice_servers or []]
        self.web_root = Path(web_root)
        self.ice_host_addresses = list(ice_host_addresses) if ice_host_addresses else None
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self.buffer_frames = buffer_frames
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._peers: set[RTCPeerConnection] = set()
        self._relay: MediaRelay | None = None
        self._video_buf: _LatestBuffer | None = None
        self._audio_buf: _LatestBuffer | None = None
        self._video: LiveVideoTrack | None = None
        self._audio: LiveAudioTrack | None = None
        self._index_offset = 0      # added to the sink's frame_index: keeps pts increasing across sessions
        self._next_index = 0

    # ------------------------------------------------------------------ lifecycle (caller's thread)
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("WebRTCServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 15.0) -> None:
        if self._thread is not None:
            raise RuntimeError("WebRTCServer.start called twice")
        if not (self.web_root / "index.html").is_file():
            raise ServerError(f"viewer page {self.web_root / 'index.html'} is missing; reinstall pcavs-live")
        sock = self._bind()
        self._port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop, sock, ready),
                                        name="webrtc-server", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout)
        except BaseException:
            self.stop()
            raise
        if self._token_generated:
            anywhere = " with this machine's address for the host" if self.host in ("0.0.0.0", "::") else ""
            log.warning("viewer server is reachable from the network; open %s%s (token generated for "
                        "this session; pass --token to choose one)", self.url, anywhere)
        else:
            log.info("viewer: open %s", self.url)

    def _bind(self) -> socket.socket:
        port = self._requested_port
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ServerError(f"cannot resolve server host '{self.host}' ({exc.strerror}); pass --host "
                              "with an address of this machine, e.g. 127.0.0.1") from None
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
            sock.bind(addr)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {self.host} is already in use (another pcavs-live?); "
                                  f"pass --port with a free port, e.g. --port {port + 1}") from None
            if exc.errno == errno.EACCES:
                raise ServerError(f"not allowed to listen on port {port}; pass --port 1024 or higher") from None
            raise ServerError(f"cannot listen on {self.host}:{port} ({exc.strerror}); pass --host/--port "
                              "with an address and port of this machine") from None
        return sock

    def stop(self, timeout: float = 15.0) -> None:
        """Close every peer, stop the web server and the loop, join the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive() and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception as exc:
                log.warning("viewer server shutdown was not clean: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.error("viewer server thread did not stop within %.0f s", timeout)
        self._thread = None
        self._loop = None

    # ------------------------------------------------------------------ the loop thread
    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
             ready: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._startup(loop, sock))
            except BaseException as exc:
                sock.close()
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
        finally:
            # Whatever is still pending (aiortc's per-peer tasks, aiohttp handlers) gets cancelled
            # and awaited, and aiortc's encoders running in the default executor are joined.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    async def _startup(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._video_buf = _LatestBuffer(loop, self.buffer_frames)
        self._audio_buf = _LatestBuffer(loop, self.buffer_frames)
        self._video = LiveVideoTrack(self._video_buf)
        self._audio = LiveAudioTrack(self._audio_buf)
        self._relay = MediaRelay()
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get("/", self._handle_index)
        app.router.add_post("/offer", self._handle_offer)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        app.router.add_static("/static/", self.web_root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        for track in (self._video, self._audio):
            if track is not None:
                track.stop()
        peers = list(self._peers)
        self._peers.clear()
        if peers:
            await asyncio.wait_for(asyncio.gather(*(pc.close() for pc in peers), return_exceptions=True), 10)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ frames (sink's thread)
    def configure(self, fps: int, sample_rate: int) -> None:
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"WebRTC audio must be one of {OPUS_RATES} Hz, got {sample_rate}")
        if VIDEO_CLOCK % fps:
            raise ValueError(f"WebRTC video needs a frame rate dividing 90000, got {fps}")
        if not self.running or self._video is None or self._audio is None:
            raise RuntimeError("start the WebRTCServer before opening its sink")
        self._video.fps = fps
        self._audio.fps, self._audio.sample_rate = fps, sample_rate
        # A new session restarts at frame 0; viewers that stay connected must see time go on, not
        # back (encoders and jitter buffers expect increasing timestamps), so continue after the last.
        self._index_offset = self._next_index

    def push(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        """Hand one frame and its slot's audio to the viewers (thread-safe, never blocks)."""
        if self._video_buf is None or self._audio_buf is None:
            return
        index = frame_index + self._index_offset
        self._next_index = index + 1
        self._video_buf.put((index, np.array(frame, dtype=np.uint8, order="C", copy=True)))
        self._audio_buf.put((index, np.array(audio, dtype=np.float32, copy=True).reshape(-1)))

    @property
    def dropped(self) -> int:
        """Frames the sink-side buffer discarded because nobody was reading (e.g. no viewer)."""
        return 0 if self._video_buf is None else self._video_buf.dropped

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    # ------------------------------------------------------------------ HTTP
    def _authorised(self, presented: object) -> bool:
        if self.token is None:
            return True
        return isinstance(presented, str) and secrets.compare_digest(presented.encode(), self.token.encode())

    async def _handle_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.web_root / "index.html", headers={"Cache-Control": "no-cache"})

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "viewers": len(self._peers)})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        token = request.query.get("token") or request.headers.get("X-Token")
        if not self._authorised(token):
            return _error(403, "missing or wrong token")
        try:
            snap = dict(self._stats())
        except Exception as exc:
            log.warning("stats callback failed: %s", exc, exc_info=True)
            return _error(500, f"stats unavailable: {exc}")
        snap.setdefault("viewers", len(self._peers))
        return web.Response(text=json.dumps(snap, default=_jsonable), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _handle_offer(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object {sdp, type, token}")
        if not self._authorised(body.get("token")):
            return _error(403, "missing or wrong token")
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if not isinstance(sdp, str) or not sdp.strip():
            return _error(400, "'sdp' (the offer's SDP text) is missing")
        if kind != "offer":
            return _error(400, f"'type' must be \"offer\", got {kind!r}")
        if len(self._peers) >= self.max_viewers:
            return _error(503, f"too many viewers (max {self.max_viewers})")

        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        try:
            answer = await asyncio.wait_for(self._negotiate(pc, sdp), 20)
        except Exception as exc:
            await pc.close()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if "send parameters" in reason:   # aiortc's words for "no codec in common"
                reason += " (this server sends VP8 or H.264 video and Opus audio)"
            log.info("rejected offer from %s: %s", request.remote, reason)
            return _error(400, f"cannot use this offer: {reason}")
        self._watch(pc)
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    async def _negotiate(self, pc: RTCPeerConnection, sdp: str) -> RTCSessionDescription:
        assert self._relay is not None and self._video is not None and self._audio is not None
        # Our transceivers exist before the offer is applied, so the offer's m-lines bind to them and
        # the codec preference (Opus only: we send ready-made Opus packets) takes part in negotiation.
        video_t = pc.addTransceiver(self._relay.subscribe(self._video, buffered=False), direction="sendonly")
        audio_t = pc.addTransceiver(self._relay.subscribe(self._audio, buffered=False), direction="sendonly")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        audio_t.setCodecPreferences(opus)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if video_t.mid is None and audio_t.mid is None:
            raise ValueError("the offer asks for neither video nor audio")
        if self.ice_host_addresses:
            use_host_addresses(pc, self.ice_host_addresses)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription

    def _watch(self, pc: RTCPeerConnection) -> None:
        """Track the peer until it closes or fails; also give up on one that never connects."""
        self._peers.add(pc)
        loop = asyncio.get_running_loop()

        async def drop(reason: str) -> None:
            if pc in self._peers:
                self._peers.discard(pc)
                log.info("viewer left (%s); %d watching", reason, len(self._peers))
            expiry.cancel()
            await pc.close()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                log.info("viewer connected; %d watching", len(self._peers))
            elif state in ("failed", "closed"):
                await drop(state)

        def expire() -> None:
            if pc.connectionState != "connected":
                asyncio.ensure_future(drop("did not connect in time"))

        expiry = loop.call_later(self.connect_timeout_s, expire)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _jsonable(value: object) -> object:
    """numpy scalars and the like, as they come out of metrics."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


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
