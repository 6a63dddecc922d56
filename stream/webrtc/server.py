"""The viewer server: one thread and event loop owning the aiohttp app and every viewer's peer.

`WebRTCServer` owns one thread running one asyncio loop; aiohttp serves the page (`stream/web/`),
`POST /offer` (SDP offer in, answer out), `GET /ice` (the STUN/TURN servers, for the page's own
peer connection), `GET /stats` and `GET /health` on it, and every viewer's RTCPeerConnection lives
there too. Frames come in from the sink's thread through `push`, which only
puts them into two small bounded buffers (buffer.py) and returns.

One source, many viewers: the buffers feed one video and one audio *source track* (tracks.py); every
viewer gets `ViewerRelay` proxies of them (tracks.py: each with its own bounded queue, so a slow
viewer loses its own frames instead of growing a queue). Nothing here can grow without bound: the
sink-side buffers drop their oldest item, viewers are capped by `max_viewers` (an offer takes its
slot before negotiating, so concurrent offers cannot overshoot), request bodies are capped at
`MAX_OFFER_BYTES`, and a peer that never connects is dropped after `connect_timeout_s`.

Whatever a client sends gets a status and a one-line reason (`{"error": ...}`), never a traceback.
"""
from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import errno
import ipaddress
import json
import logging
import secrets
import socket
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from aiohttp import web
from aiortc import (RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender,
                    RTCSessionDescription)

from pcavs_live.common.errors import UserError
from stream.webrtc.buffer import LatestBuffer
from stream.webrtc.ice import (ice_server_as_json, unusable_host_address, unusable_ice_server,
                               use_host_addresses)
from stream.webrtc.tracks import (OPUS_RATES, VIDEO_CLOCK, LiveAudioTrack, LiveVideoTrack, SharedVideoEncoder,
                                  ViewerRelay, ViewerTrack)

log = logging.getLogger(__name__)

DEFAULT_WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# An SDP offer with its candidates is a few KiB; anything far larger is not an offer.
MAX_OFFER_BYTES = 64 * 1024


class ServerError(UserError):
    """The viewer server cannot start (port taken, bad host); one line saying what to pass instead."""


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
    `ice_servers`: STUN URLs (or aiortc RTCIceServer objects, for TURN credentials; see
    `ice.ice_servers`) for viewers behind NAT, at most one STUN and one TURN server (all aiortc uses);
    default none (LAN/loopback viewing, and no outgoing STUN queries on offline machines). The page
    is given the same servers (`GET /ice`) for its own side of the connection.
    `ice_host_addresses`: gather ICE host candidates on exactly these addresses (see
    `use_host_addresses`); ["127.0.0.1"] makes same-machine viewing work without any LAN interface.
    Unusable ICE settings are a `ServerError` from `start()`, not offers that fail later.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 stats: Callable[[], dict] | None = None,
                 ice_servers: Sequence[str | RTCIceServer] | None = None,
                 web_root: str | Path = DEFAULT_WEB_ROOT, ice_host_addresses: Sequence[str] | None = None,
                 max_viewers: int = 8, connect_timeout_s: float = 30.0, buffer_frames: int = 25,
                 shared_video_encoder: bool = True) -> None:
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
        self.shared_video_encoder = shared_video_encoder   # False: aiortc's encoder per viewer (bench)
        self._video_out: SharedVideoEncoder | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._peers: set[RTCPeerConnection] = set()
        self._negotiating = 0       # offers holding a viewer slot while their answer is being made
        self._viewer_ids = 0        # numbers the viewers in /stats and the log, in order of arrival
        self._viewer_tracks: dict[RTCPeerConnection, tuple[int, ViewerTrack, ViewerTrack]] = {}
        self._relay: ViewerRelay | None = None
        self._video_buf: LatestBuffer | None = None
        self._audio_buf: LatestBuffer | None = None
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
        self._check_ice_settings()
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

    def _check_ice_settings(self) -> None:
        for address in self.ice_host_addresses or []:
            reason = unusable_host_address(address)
            if reason:
                raise ServerError(reason, hint="set server.ice_host_addresses to addresses of this machine, "
                                  'e.g. ["127.0.0.1"], or to [] for every non-loopback interface')
        for server in self._ice_servers:
            reason = unusable_ice_server(server)
            if reason:
                raise ServerError(reason, hint="fix server.stun_url / server.turn_url in your config")
        for scheme in ("stun", "turn"):
            urls = [u for s in self._ice_servers for u in ice_server_as_json(s)["urls"] if u.startswith(scheme)]
            if len(urls) > 1:
                raise ServerError(f"aiortc uses one {scheme.upper()} server, got {len(urls)}: {', '.join(urls)}")

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
        self._video_buf = LatestBuffer(loop, self.buffer_frames)
        self._audio_buf = LatestBuffer(loop, self.buffer_frames)
        self._video = LiveVideoTrack(self._video_buf)
        self._audio = LiveAudioTrack(self._audio_buf)
        if self.shared_video_encoder:     # VP8 encoded once for every viewer (tracks.py)
            self._video_out = SharedVideoEncoder(self._video)
        self._relay = ViewerRelay()
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self._handle_index)
        app.router.add_post("/offer", self._handle_offer)
        app.router.add_get("/ice", self._handle_ice)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/health", self._handle_health)
        await self._serve_app(app, sock)

    async def _serve_app(self, app: web.Application, sock: socket.socket) -> None:
        """Static files under /static/ and the app on the already-bound socket (subclasses add their routes
        first)."""
        app.router.add_static("/static/", self.web_root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        for pc in list(self._viewer_tracks):  # what each viewer got, also when the server stops first
            self._log_viewer(pc, "server stopping")
        for track in (self._video_out, self._video, self._audio):
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

    def viewer_stats(self) -> list[dict[str, int]]:
        """Per viewer (in order of arrival): video and audio items sent, and lost from that viewer's own
        one-second queue (`ViewerTrack.dropped`) when it fell behind, e.g. when the loop was starved.
        Read on the server's loop (/stats, shutdown)."""
        return [_viewer_counts(*entry) for entry in self._viewer_tracks.values()]

    def _log_viewer(self, pc: RTCPeerConnection, why: str) -> None:
        entry = self._viewer_tracks.pop(pc, None)
        if entry is None:
            return
        c = _viewer_counts(*entry)
        lost = c["video_dropped"] + c["audio_dropped"]
        (log.warning if lost else log.info)(
            "viewer %d (%s): video %d sent, %d dropped; audio %d sent, %d dropped", c["viewer"], why,
            c["video_sent"], c["video_dropped"], c["audio_sent"], c["audio_dropped"])

    @property
    def peer_count(self) -> int:
        """Viewers answered and not yet gone (connected, or still connecting)."""
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
        snap.setdefault("viewer_streams", self.viewer_stats())
        return web.Response(text=json.dumps(snap, default=_jsonable), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _handle_ice(self, request: web.Request) -> web.Response:
        token = request.query.get("token") or request.headers.get("X-Token")
        if not self._authorised(token):            # TURN credentials are as private as the stream
            return _error(403, "missing or wrong token")
        return web.json_response({"iceServers": [ice_server_as_json(s) for s in self._ice_servers]},
                                 headers={"Cache-Control": "no-store"})

    async def _read_json(self, request: web.Request) -> object:
        """The request body as JSON, or the error response saying why not (size, charset, syntax)."""
        too_large = _error(413, f"request body is larger than {MAX_OFFER_BYTES // 1024} KiB; "
                                "an offer is a few KiB of SDP")
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return too_large
        try:
            raw = await request.read()             # also stops a chunked body at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return too_large
        charset = request.charset or "utf-8"
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            codec = None
        if codec not in ("utf-8", "ascii"):
            return _error(400, f"unsupported charset {charset[:40]!r} in Content-Type; send UTF-8 JSON")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _error(400, "request body is not UTF-8 text")
        except RecursionError:
            return _error(400, "request body is JSON nested too deeply; send {sdp, type, token}")
        except ValueError as exc:
            return _error(400, f"request body is not JSON: {exc}")

    async def _handle_offer(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object {sdp, type, token}")
        if not self._authorised(body.get("token")):
            return _error(403, "missing or wrong token")
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if not isinstance(sdp, str) or not sdp.strip():
            return _error(400, "'sdp' (the offer's SDP text) is missing")
        if kind != "offer":
            return _error(400, f"'type' must be \"offer\", got {kind!r}")
        # The slot is taken before the first await and given back in `finally`; `_watch` counts the
        # peer in the same step (no await in between), so answered + negotiating never exceeds the cap.
        if len(self._peers) + self._negotiating >= self.max_viewers:
            return _error(503, f"too many viewers (max {self.max_viewers})")
        self._negotiating += 1
        try:
            pc = RTCPeerConnection(self.rtc_configuration())
            try:
                answer = await asyncio.wait_for(self._negotiate(pc, sdp), 20)
            except Exception as exc:
                self._viewer_tracks.pop(pc, None)
                await pc.close()
                reason = " ".join(str(exc).split()) or type(exc).__name__
                if "send parameters" in reason:   # aiortc's words for "no codec in common"
                    video = "VP8" if self._video_out is not None else "VP8 or H.264"
                    reason += f" (this server sends {video} video and Opus audio)"
                log.info("rejected offer from %s: %s", request.remote, reason)
                return _error(400, f"cannot use this offer: {reason}")
            except BaseException:                 # cancelled (the server is stopping): no stray peer
                self._viewer_tracks.pop(pc, None)
                await pc.close()
                raise
        finally:
            self._negotiating -= 1
        self._watch(pc)
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    def rtc_configuration(self) -> RTCConfiguration:
        """What every viewer's RTCPeerConnection is made with (the configured STUN/TURN servers)."""
        return RTCConfiguration(iceServers=list(self._ice_servers))

    async def _negotiate(self, pc: RTCPeerConnection, sdp: str) -> RTCSessionDescription:
        assert self._relay is not None and self._video is not None and self._audio is not None
        # Our transceivers exist before the offer is applied, so the offer's m-lines bind to them and
        # the codec preference (Opus only: we send ready-made Opus packets) takes part in negotiation.
        shared = self._video_out
        video = self._relay.subscribe(shared if shared is not None else self._video)
        audio = self._relay.subscribe(self._audio)
        video_t = pc.addTransceiver(video, direction="sendonly")
        audio_t = pc.addTransceiver(audio, direction="sendonly")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        audio_t.setCodecPreferences(opus)
        if shared is not None:
            # The shared stream is VP8: offer nothing else, and let this viewer's picture-loss reports
            # (aiortc's sender would force a key frame in its own encoder, which it does not use here)
            # ask the shared encoder for one.
            vp8 = [c for c in RTCRtpSender.getCapabilities("video").codecs
                   if c.mimeType.lower() in ("video/vp8", "video/rtx")]
            video_t.setCodecPreferences(vp8)
            video_t.sender._send_keyframe = shared.request_keyframe
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if video_t.mid is None and audio_t.mid is None:
            raise ValueError("the offer asks for neither video nor audio")
        if self.ice_host_addresses:
            use_host_addresses(pc, self.ice_host_addresses)
        await pc.setLocalDescription(await pc.createAnswer())
        self._viewer_ids += 1
        self._viewer_tracks[pc] = (self._viewer_ids, video, audio)
        return pc.localDescription

    def _watch(self, pc: RTCPeerConnection) -> None:
        """Track the peer until it closes or fails; also give up on one that never connects."""
        self._peers.add(pc)
        loop = asyncio.get_running_loop()

        async def drop(reason: str) -> None:
            if pc in self._peers:
                self._peers.discard(pc)
                log.info("viewer left (%s); %d watching", reason, len(self._peers))
            self._log_viewer(pc, f"left: {reason}")
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


def _viewer_counts(viewer: int, video: ViewerTrack, audio: ViewerTrack) -> dict[str, int]:
    return {"viewer": viewer, "video_sent": video.delivered, "video_dropped": video.dropped,
            "audio_sent": audio.delivered, "audio_dropped": audio.dropped}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _jsonable(value: object) -> object:
    """numpy scalars and the like, as they come out of metrics."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
